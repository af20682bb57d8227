//! E2B path rules (envd's `ExpandAndResolve`, rpc.md §3.1), shared by Process.Start's cwd and
//! every filesystem RPC.
//!
//! Pure byte-string work: no filesystem access, no symlink resolution, no containment checks. A
//! Linux path is bytes, not always UTF-8, and `/files` can name any (an RPC's `string` cannot).
//! Deliberate envd compatibility (rpc.md §7): relative paths are relative to the user's home,
//! not to the default workdir; absolute paths are returned as given, not cleaned.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use crate::users::User;

/// Why a request path could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// `~name/...`: only the requesting user's own home can be expanded.
    #[error("cannot expand user-specific home dir in '{path}'")]
    UserHome { path: String },
}

/// Resolves a request path for `user`:
/// - `""` -> `default_workdir` if set, else the user's home;
/// - leading `~` followed by nothing, `/` or `\` -> the user's home joined with the rest, cleaned;
///   `~name` -> [`PathError::UserHome`];
/// - absolute -> as is (not cleaned);
/// - relative -> `home.join(path)`, cleaned lexically.
pub fn resolve(path: impl AsRef<OsStr>, user: &User, default_workdir: Option<&Path>) -> Result<PathBuf, PathError> {
    let path = match path.as_ref().as_bytes() {
        b"" => match default_workdir {
            Some(workdir) => workdir.as_os_str().as_bytes(),
            None => return Ok(user.home.clone()),
        },
        path => path,
    };
    let home = user.home.as_os_str().as_bytes();
    if let Some(rest) = path.strip_prefix(b"~") {
        if !(rest.is_empty() || rest.starts_with(b"/") || rest.starts_with(b"\\")) {
            return Err(PathError::UserHome { path: String::from_utf8_lossy(path).into_owned() });
        }
        return Ok(clean(&[home, b"/", rest].concat()));
    }
    if path.starts_with(b"/") {
        return Ok(PathBuf::from(OsStr::from_bytes(path)));
    }
    Ok(clean(&[home, b"/", path].concat()))
}

/// Lexical cleaning like Go's `filepath.Clean`: collapses `//`, drops `.`, resolves `..` against
/// the preceding element (never above `/` for rooted paths).
fn clean(path: &[u8]) -> PathBuf {
    let rooted = path.starts_with(b"/");
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => match parts.last() {
                Some(&last) if last != b".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(b".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join(&b'/');
    let path = match (rooted, joined.is_empty()) {
        (true, _) => [b"/", joined.as_slice()].concat(),
        (false, true) => b".".to_vec(),
        (false, false) => joined,
    };
    PathBuf::from(OsStr::from_bytes(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: PathBuf::from("/home/user"),
            shell: PathBuf::from("/bin/bash"),
        }
    }

    fn r(path: &str, workdir: Option<&str>) -> Result<PathBuf, PathError> {
        resolve(path, &user(), workdir.map(Path::new))
    }

    #[test]
    fn empty_uses_workdir_then_home() {
        assert_eq!(r("", Some("/work")).unwrap(), PathBuf::from("/work"));
        assert_eq!(r("", None).unwrap(), PathBuf::from("/home/user"));
    }

    #[test]
    fn tilde_expands_to_home_and_is_cleaned() {
        assert_eq!(r("~", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/a/../b", None).unwrap(), PathBuf::from("/home/user/b"));
    }

    #[test]
    fn tilde_user_is_rejected() {
        let err = r("~root/x", None).unwrap_err();
        assert_eq!(err.to_string(), "cannot expand user-specific home dir in '~root/x'");
    }

    #[test]
    fn absolute_is_kept_verbatim() {
        assert_eq!(r("/a/../b/", None).unwrap(), PathBuf::from("/a/../b/"));
    }

    #[test]
    fn relative_is_joined_to_home_not_workdir() {
        assert_eq!(r("x/./y", Some("/work")).unwrap(), PathBuf::from("/home/user/x/y"));
        assert_eq!(r("../../..", None).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn clean_matches_go() {
        assert_eq!(clean(b"a//b/./c/.."), PathBuf::from("a/b"));
        assert_eq!(clean(b"../a"), PathBuf::from("../a"));
        assert_eq!(clean(b""), PathBuf::from("."));
        assert_eq!(clean(b"/.."), PathBuf::from("/"));
    }

    /// A name that is not UTF-8 keeps its bytes, relative or absolute.
    #[test]
    fn paths_are_bytes() {
        let name = OsStr::from_bytes(b"caf\xe9/../\xff.txt");
        let expected = PathBuf::from(OsStr::from_bytes(b"/home/user/\xff.txt"));
        assert_eq!(resolve(name, &user(), None).unwrap(), expected);
        let absolute = OsStr::from_bytes(b"/tmp/\xfe");
        assert_eq!(resolve(absolute, &user(), None).unwrap().as_os_str(), absolute);
    }
}
