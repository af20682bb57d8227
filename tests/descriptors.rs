//! Wire-contract check against the real E2B Python SDK (test tier 3).
//!
//! The pinned `e2b` package embeds the serialized `FileDescriptorProto` of envd's
//! `process/process.proto` and `filesystem/filesystem.proto` (`_DESC = file_desc(b'...')` in
//! `e2b/envd/{process,filesystem}/*_pb.py`). This test pulls those bytes out with the test venv's
//! python, decodes them with prost-types and compares them, fact by fact, with the descriptor set
//! guestd compiles from `proto/` (`guestd::proto::FILE_DESCRIPTOR_SET`): messages (nested ones and
//! map entries included), fields (number, type, type name, label, JSON name, proto3 `optional`,
//! oneof membership), enums and their values, services and their methods' shapes.
//!
//! The message and field sets must be equal: an extra guestd field is as wrong as a missing one,
//! because the SDK's JSON codec would never send or read it.
//!
//! Needs `GUESTD_TEST_PYTHON` = the python of `scripts/sdk-venv.sh`; `scripts/test-sdk.sh` sets it.

use std::collections::BTreeMap;
use std::process::Command;

use base64::Engine as _;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet, ServiceDescriptorProto,
};

/// Packages whose contract guestd shares with envd.
const PACKAGES: [&str; 2] = ["process", "filesystem"];

/// Prints `<module path> <base64 FileDescriptorProto>` per SDK module, plus the installed e2b
/// version. The literal is read with `ast` rather than by importing the module, so nothing of
/// the SDK runs and the bytes are exactly those in the file.
const EXTRACT_PY: &str = r#"
import ast, base64, importlib.metadata, importlib.util, pathlib
print("e2b-version", importlib.metadata.version("e2b"))
root = pathlib.Path(importlib.util.find_spec("e2b").submodule_search_locations[0])
for rel in ("envd/process/process_pb.py", "envd/filesystem/filesystem_pb.py"):
    tree = ast.parse((root / rel).read_text(encoding="utf-8"))
    found = []
    for node in tree.body:
        if (isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "_DESC" for t in node.targets)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "file_desc"):
            found.append(ast.literal_eval(node.value.args[0]))
    if len(found) != 1:
        raise SystemExit(f"{rel}: expected one `_DESC = file_desc(b'...')`, found {len(found)}")
    print(rel, base64.b64encode(found[0]).decode())
"#;

fn sdk_descriptors() -> (String, Vec<FileDescriptorProto>) {
    let python = std::env::var("GUESTD_TEST_PYTHON").unwrap_or_default();
    assert!(
        !python.is_empty(),
        "GUESTD_TEST_PYTHON is not set. This test compares guestd's proto descriptors with the \
         ones inside the pinned E2B Python SDK and needs the SDK test venv: run it through \
         `scripts/test-sdk.sh`, or `GUESTD_TEST_PYTHON=$(scripts/sdk-venv.sh) cargo test --test descriptors`."
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(EXTRACT_PY)
        .output()
        .unwrap_or_else(|e| panic!("cannot run GUESTD_TEST_PYTHON={python}: {e}"));
    assert!(
        out.status.success(),
        "{python} failed to extract the SDK descriptors ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("extractor output is UTF-8");
    let mut version = String::new();
    let mut files = Vec::new();
    for line in stdout.lines() {
        let (key, value) = line.split_once(' ').expect("`<key> <value>` lines");
        if key == "e2b-version" {
            version = value.to_owned();
            continue;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .unwrap_or_else(|e| panic!("{key}: bad base64: {e}"));
        let file = FileDescriptorProto::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("{key}: not a FileDescriptorProto: {e}"));
        files.push(file);
    }
    assert_eq!(files.len(), 2, "expected the process and filesystem descriptors, got {stdout}");
    (version, files)
}

fn pinned_e2b_version() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/requirements.txt");
    let text = std::fs::read_to_string(path).expect("tests/sdk/requirements.txt");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("e2b=="))
        .expect("an `e2b==` pin in tests/sdk/requirements.txt")
        .to_owned()
}

/// proto3 JSON name when the descriptor carries none: lowerCamelCase of the field name.
fn default_json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Flattens the contract of the given files into `key -> value` facts, so that two descriptor
/// sets compare as two maps and every difference prints as one readable line.
#[derive(Default)]
struct Facts(BTreeMap<String, String>);

impl Facts {
    fn add(&mut self, key: String, value: String) {
        let prev = self.0.insert(key.clone(), value);
        assert!(prev.is_none(), "duplicate descriptor element {key}");
    }

    fn file(&mut self, f: &FileDescriptorProto) {
        let pkg = f.package();
        self.add(format!("file {pkg}"), format!("name={} syntax={} deps={:?}", f.name(), f.syntax(), f.dependency));
        for m in &f.message_type {
            self.message(&format!(".{pkg}"), m);
        }
        for e in &f.enum_type {
            self.enumeration(&format!(".{pkg}"), e);
        }
        for s in &f.service {
            self.service(pkg, s);
        }
    }

    fn message(&mut self, scope: &str, m: &DescriptorProto) {
        let full = format!("{scope}.{}", m.name());
        let map_entry = m.options.as_ref().is_some_and(|o| o.map_entry());
        let oneofs: Vec<&str> = m.oneof_decl.iter().map(|o| o.name()).collect();
        self.add(format!("message {full}"), format!("map_entry={map_entry} oneofs={oneofs:?}"));
        for f in &m.field {
            let raw_type = f.r#type.unwrap_or(0);
            let ty =
                Type::try_from(raw_type).map_or_else(|_| format!("type#{raw_type}"), |t| t.as_str_name().to_owned());
            let raw_label = f.label.unwrap_or(0);
            let label = Label::try_from(raw_label)
                .map_or_else(|_| format!("label#{raw_label}"), |l| l.as_str_name().to_owned());
            let oneof = f.oneof_index.map(|i| oneofs.get(i as usize).copied().unwrap_or("<bad oneof index>"));
            let json = f.json_name.clone().unwrap_or_else(|| default_json_name(f.name()));
            self.add(
                format!("field {full}.{}", f.name()),
                format!(
                    "number={} {ty} {label} type_name={:?} json_name={json} proto3_optional={} oneof={oneof:?}",
                    f.number(),
                    f.type_name(),
                    f.proto3_optional(),
                ),
            );
        }
        for nested in &m.nested_type {
            self.message(&full, nested);
        }
        for e in &m.enum_type {
            self.enumeration(&full, e);
        }
    }

    fn enumeration(&mut self, scope: &str, e: &EnumDescriptorProto) {
        let full = format!("{scope}.{}", e.name());
        self.add(format!("enum {full}"), String::new());
        for v in &e.value {
            self.add(format!("enum-value {full}.{}", v.name()), format!("number={}", v.number()));
        }
    }

    fn service(&mut self, pkg: &str, s: &ServiceDescriptorProto) {
        let full = format!("{pkg}.{}", s.name());
        self.add(format!("service {full}"), String::new());
        for m in &s.method {
            self.add(
                format!("method /{full}/{}", m.name()),
                format!(
                    "input={} output={} client_streaming={} server_streaming={}",
                    m.input_type(),
                    m.output_type(),
                    m.client_streaming(),
                    m.server_streaming()
                ),
            );
        }
    }
}

fn facts_of<'a>(files: impl IntoIterator<Item = &'a FileDescriptorProto>) -> Facts {
    let mut facts = Facts::default();
    for f in files {
        if PACKAGES.contains(&f.package()) {
            facts.file(f);
        }
    }
    facts
}

#[test]
fn guestd_proto_matches_e2b_python_sdk_descriptors() {
    let (version, sdk_files) = sdk_descriptors();
    let pinned = pinned_e2b_version();
    assert_eq!(
        version, pinned,
        "GUESTD_TEST_PYTHON has e2b {version}, tests/sdk/requirements.txt pins {pinned}; \
         rebuild the venv with scripts/sdk-venv.sh"
    );

    let guestd_set = FileDescriptorSet::decode(guestd::proto::FILE_DESCRIPTOR_SET)
        .expect("guestd::proto::FILE_DESCRIPTOR_SET decodes");
    let sdk = facts_of(&sdk_files);
    let ours = facts_of(&guestd_set.file);

    for pkg in PACKAGES {
        assert!(
            sdk.0.contains_key(&format!("file {pkg}")),
            "the SDK descriptors lack package {pkg}; the extractor is broken"
        );
    }
    // A sanity floor so a broken extractor cannot make the comparison vacuous.
    assert!(sdk.0.len() > 150, "only {} facts from the SDK descriptors", sdk.0.len());

    let mut diff = Vec::new();
    let keys: std::collections::BTreeSet<&String> = sdk.0.keys().chain(ours.0.keys()).collect();
    for key in keys {
        match (sdk.0.get(key), ours.0.get(key)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => diff.push(format!("  ~ {key}\n      e2b:    {a}\n      guestd: {b}")),
            (Some(a), None) => diff.push(format!("  - {key}  (missing in guestd; e2b: {a})")),
            (None, Some(b)) => diff.push(format!("  + {key}  (only in guestd: {b})")),
            (None, None) => unreachable!(),
        }
    }
    assert!(
        diff.is_empty(),
        "guestd's proto/ differs from the descriptors in e2b=={version} \
         ({} differences; `-` = e2b has it, guestd not; `+` = guestd only; `~` = both, different):\n{}",
        diff.len(),
        diff.join("\n")
    );
    eprintln!("{} descriptor facts identical to e2b=={version}", sdk.0.len());
}
