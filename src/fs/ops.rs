//! Path operations behind `filesystem.Filesystem` (rpc.md §5.1–5.5). All blocking: callers run
//! them in `spawn_blocking`.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;

use super::entry::{EntryInfo, Names, entry_info, entry_info_with};
use super::{FsError, Owner, clean};

/// `Stat`: describes `path` without following a final symlink; `path` is echoed as given.
pub fn stat(path: &Path) -> Result<EntryInfo, FsError> {
    entry_info(path)
}

/// Most a `list_dir` result may hold, in bytes of its strings plus [`ENTRY_OVERHEAD`] per
/// entry (roughly its protobuf size). A listing is one unary response, so it cannot be streamed;
/// without a bound, `ListDir("/", depth = 1000)` on a large disk holds every entry of the machine
/// in memory (several times over while encoding) before anything is sent. 64 MiB is the largest
/// response the Connect layer translates (`connect::MAX_RESPONSE_MESSAGE_BYTES`): a bigger listing
/// could not reach a Connect client anyway, so it fails early with [`FsError::ListingTooLarge`].
pub const LIST_DIR_MAX_BYTES: usize = 64 << 20;

/// Per-entry share of [`LIST_DIR_MAX_BYTES`] besides the strings: numbers, timestamp, tags.
const ENTRY_OVERHEAD: usize = 64;

/// `ListDir`: the entries under `requested` down to `depth` levels (0 means 1), in lexical
/// pre-order, the directory itself excluded.
///
/// `requested` may be (or pass through) a symlink: it is resolved to find the directory, but
/// every returned `path` is spelled under the cleaned `requested`. Symlinks inside are listed,
/// never descended into. Entries that vanish during the walk are skipped. A listing larger than
/// [`LIST_DIR_MAX_BYTES`] is [`FsError::ListingTooLarge`].
pub fn list_dir(requested: &Path, depth: u32) -> Result<Vec<EntryInfo>, FsError> {
    list_dir_within(requested, depth, LIST_DIR_MAX_BYTES)
}

fn list_dir_within(requested: &Path, depth: u32, max_bytes: usize) -> Result<Vec<EntryInfo>, FsError> {
    let depth = depth.max(1);
    let resolved = fs::canonicalize(requested).map_err(|e| match errno(&e) {
        Some(Errno::ENOENT) => FsError::NotFound { path: requested.to_path_buf() },
        Some(Errno::ELOOP) => FsError::CyclicSymlink { path: requested.to_path_buf() },
        _ => FsError::from_io("resolve symlinks in", requested, e),
    })?;
    let meta = fs::metadata(&resolved).map_err(|e| FsError::from_io("stat", &resolved, e))?;
    if !meta.is_dir() {
        return Err(FsError::NotADirectory { path: resolved });
    }

    let mut names = Names::default();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    // Explicit stack instead of recursion: nesting depth is whatever the disk holds, and this
    // runs on a blocking-pool thread with a modest stack.
    // `bytes` counts the entries listed plus, for every name read but not visited yet, its
    // share of the entry it will become ([`reserved`]): a huge directory fails while being read,
    // not after its names are all in memory.
    let too_large = || FsError::ListingTooLarge { path: requested.to_path_buf(), depth, limit: max_bytes };
    let mut stack = vec![Level { real: resolved.clone(), shown: clean(requested), depth: 1, names: Vec::new() }];
    match read_sorted(&resolved, &mut bytes, max_bytes) {
        Ok(Some(names)) => stack[0].names = names,
        Ok(None) => return Err(too_large()),
        Err(e) => return Err(FsError::from_io("read directory", &resolved, e)),
    }
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.pop() else {
            stack.pop();
            continue;
        };
        bytes -= reserved(&name);
        let real = level.real.join(&name);
        let shown = level.shown.join(&name);
        let child_depth = level.depth + 1;
        let mut info = match entry_info_with(&real, &mut names) {
            Ok(info) => info,
            Err(FsError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        info.path = shown.to_string_lossy().into_owned();
        bytes += approx_size(&info);
        if bytes > max_bytes {
            return Err(too_large());
        }
        let descend = child_depth <= depth && !info.is_symlink && info.kind == super::FileKind::Directory;
        out.push(info);
        if descend {
            match read_sorted(&real, &mut bytes, max_bytes) {
                Ok(Some(names)) => stack.push(Level { real, shown, depth: child_depth, names }),
                Ok(None) => return Err(too_large()),
                Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
                Err(e) => return Err(FsError::from_io("read directory", &real, e)),
            }
        }
    }
    Ok(out)
}

/// What `info` adds to a listing, for [`LIST_DIR_MAX_BYTES`].
fn approx_size(info: &EntryInfo) -> usize {
    let strings = [&info.name, &info.path, &info.permissions, &info.owner, &info.group];
    let metadata: usize = info.metadata.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    ENTRY_OVERHEAD
        + strings.iter().map(|s| s.len()).sum::<usize>()
        + info.symlink_target.as_ref().map_or(0, String::len)
        + metadata
}

/// One directory being walked by [`list_dir`].
struct Level {
    real: PathBuf,
    shown: PathBuf,
    /// Depth of this directory's children (the listed root's children are at 1).
    depth: u32,
    /// Child names not yet visited, sorted descending so `pop` yields them in order.
    names: Vec<OsString>,
}

/// Directory entries sorted like Go's `os.ReadDir` (bytewise), reversed for popping. Upload
/// temporaries in flight are left out, as watchers leave them out: until its rename, an
/// upload is invisible, then it is the target.
///
/// Every name adds [`reserved`] to `bytes`; `None` as soon as that passes `max_bytes`.
fn read_sorted(dir: &Path, bytes: &mut usize, max_bytes: usize) -> io::Result<Option<Vec<OsString>>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if super::is_upload_temp(&name) {
            continue;
        }
        *bytes += reserved(&name);
        if *bytes > max_bytes {
            return Ok(None);
        }
        names.push(name);
    }
    names.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok(Some(names))
}

/// The least a name read by [`read_sorted`] will add to the listing as an entry (its name and
/// the overhead; [`approx_size`] is at least that), charged before it is visited.
fn reserved(name: &OsStr) -> usize {
    ENTRY_OVERHEAD + name.len()
}

/// `MakeDir`: creates `path` and any missing parents (0755 before umask, owned by `owner`).
/// An existing directory is [`FsError::AlreadyExists`], an existing non-directory
/// [`FsError::NotADirectory`]; existing parents are left as they are.
pub fn make_dir(path: &Path, owner: Owner) -> Result<EntryInfo, FsError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(FsError::AlreadyExists { path: path.to_path_buf() }),
        Ok(_) => return Err(FsError::NotADirectory { path: path.to_path_buf() }),
        Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
        // ENOTDIR (a parent is a file) and friends: envd reports these as internal errors.
        Err(e) => return Err(FsError::Io { op: "stat", path: path.to_path_buf(), source: e }),
    }
    ensure_dirs(path, owner)?;
    entry_info(path)
}

/// `Move`: renames `source` to `destination` (replacing a file or an empty directory there),
/// creating the destination's missing parents for `owner` first. No "move into directory".
pub fn rename(source: &Path, destination: &Path, owner: Owner) -> Result<EntryInfo, FsError> {
    if let Some(parent) = destination.parent() {
        ensure_dirs(parent, owner)?;
    }
    fs::rename(source, destination).map_err(|e| match errno(&e) {
        Some(Errno::ENOENT) => FsError::NotFound { path: source.to_path_buf() },
        _ => FsError::from_io("rename", source, e),
    })?;
    entry_info(destination)
}

/// `Remove`: deletes `path` recursively (a symlink itself, not its target). A missing path is
/// success. Paths ending in `.` are refused with EINVAL before anything is deleted (Go's
/// `os.RemoveAll` does the same; `rmdir("x/.")` would fail only after emptying `x`).
///
/// Trailing slashes are dropped first, as Go's `os.RemoveAll` does (it removes the base name
/// from its parent): the kernel follows a symlink spelled `link/`, so without that `link/`
/// would empty the link's target and then fail to `rmdir` the link, and `x/./` would empty `x`.
///
/// Callers decide which paths must never be removed: an empty request path resolves to the
/// user's home, which envd deletes without a second thought.
pub fn remove(path: &Path) -> Result<(), FsError> {
    let mut bytes = path.as_os_str().as_bytes();
    while bytes.len() > 1 && bytes.ends_with(b"/") {
        bytes = &bytes[..bytes.len() - 1];
    }
    if bytes == b"." || bytes.ends_with(b"/.") {
        return Err(FsError::Io {
            op: "remove",
            path: path.to_path_buf(),
            source: io::Error::from_raw_os_error(Errno::EINVAL as i32),
        });
    }
    let target = Path::new(OsStr::from_bytes(bytes));
    let result = match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(target),
        Ok(_) => fs::remove_file(target),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(Errno::ENOENT) => Ok(()),
        Err(e) => Err(FsError::from_io("remove", path, e)),
    }
}

/// `mkdir -p` the way envd's `EnsureDirs` does it: walks every prefix of `dir` from `/` (the
/// path is taken as rooted and `..` is applied lexically as it is met); each missing directory
/// is created 0755 (before umask) and chowned to `owner`, also when a concurrent creator won
/// the race; existing directories are not touched; an existing non-directory prefix is
/// [`FsError::ParentNotDirectory`].
pub fn ensure_dirs(dir: &Path, owner: Owner) -> Result<(), FsError> {
    let mut current = PathBuf::from("/");
    for component in dir.components() {
        match component {
            Component::Normal(name) => current.push(name),
            Component::ParentDir => {
                current.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
        }
        match fs::metadata(&current) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return Err(FsError::ParentNotDirectory { path: current }),
            Err(e) if errno(&e) == Some(Errno::ENOENT) => {}
            Err(e) => return Err(FsError::from_io("stat", &current, e)),
        }
        match fs::DirBuilder::new().mode(0o755).create(&current) {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(Errno::EEXIST) => {}
            Err(e) => return Err(FsError::from_io("create directory", &current, e)),
        }
        std::os::unix::fs::chown(&current, Some(owner.uid), Some(owner.gid))
            .map_err(|e| FsError::from_io("change the owner of", &current, e))?;
    }
    Ok(())
}

fn errno(err: &io::Error) -> Option<Errno> {
    err.raw_os_error().map(Errno::from_raw)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    use super::*;
    use crate::fs::FileKind;

    fn me() -> Owner {
        Owner { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() }
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        // root/{a.txt, b/{c.txt, d/{e.txt}}, link-b -> b, z.txt}
        fs::write(root.join("a.txt"), b"a").unwrap();
        fs::create_dir_all(root.join("b/d")).unwrap();
        fs::write(root.join("b/c.txt"), b"c").unwrap();
        fs::write(root.join("b/d/e.txt"), b"e").unwrap();
        symlink(root.join("b"), root.join("link-b")).unwrap();
        fs::write(root.join("z.txt"), b"z").unwrap();
        (dir, root)
    }

    fn rel(root: &Path, entries: &[EntryInfo]) -> Vec<String> {
        entries.iter().map(|e| e.path.strip_prefix(&format!("{}/", root.display())).unwrap().to_owned()).collect()
    }

    #[test]
    fn list_dir_depth_one_is_sorted_and_excludes_root() {
        let (_dir, root) = tree();
        let entries = list_dir(&root, 0).unwrap();
        assert_eq!(rel(&root, &entries), ["a.txt", "b", "link-b", "z.txt"]);
        let link = &entries[2];
        assert!(link.is_symlink);
        assert_eq!(link.kind, FileKind::Directory);
    }

    #[test]
    fn list_dir_is_preorder_and_never_descends_symlinks() {
        let (_dir, root) = tree();
        let entries = list_dir(&root, 10).unwrap();
        assert_eq!(rel(&root, &entries), ["a.txt", "b", "b/c.txt", "b/d", "b/d/e.txt", "link-b", "z.txt"]);
        let two = list_dir(&root, 2).unwrap();
        assert_eq!(rel(&root, &two), ["a.txt", "b", "b/c.txt", "b/d", "link-b", "z.txt"]);
    }

    #[test]
    fn list_dir_through_a_symlink_spells_paths_under_the_request() {
        let (_dir, root) = tree();
        let requested = root.join("link-b/./");
        let entries = list_dir(&requested, 1).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, [format!("{}/link-b/c.txt", root.display()), format!("{}/link-b/d", root.display())]);
    }

    #[test]
    fn list_dir_errors() {
        let (_dir, root) = tree();
        assert!(matches!(list_dir(&root.join("missing"), 1), Err(FsError::NotFound { .. })));
        assert!(matches!(list_dir(&root.join("a.txt"), 1), Err(FsError::NotADirectory { .. })));
        symlink(root.join("loop2"), root.join("loop1")).unwrap();
        symlink(root.join("loop1"), root.join("loop2")).unwrap();
        assert!(matches!(list_dir(&root.join("loop1"), 1), Err(FsError::CyclicSymlink { .. })));
        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(list_dir(&empty, 3).unwrap().is_empty());
        fs::write(empty.join(".x.guestd-upload-0123456789abcdef"), b"in flight").unwrap();
        assert!(list_dir(&empty, 1).unwrap().is_empty(), "upload temporaries are not listed");
    }

    #[test]
    fn list_dir_larger_than_its_bound_fails_naming_the_limit() {
        let (_dir, root) = tree();
        let all = list_dir(&root, 10).unwrap();
        let size: usize = all.iter().map(approx_size).sum();
        assert_eq!(list_dir_within(&root, 10, size).unwrap(), all, "exactly at the bound is fine");
        let err = list_dir_within(&root, 10, size - 1).unwrap_err();
        assert!(matches!(&err, FsError::ListingTooLarge { path, depth: 10, .. } if *path == root), "{err:?}");
        assert!(err.to_string().contains(&format!("{} bytes", size - 1)), "{err}");
        // A directory whose names alone exceed the bound fails while it is read.
        let err = list_dir_within(&root, 1, ENTRY_OVERHEAD).unwrap_err();
        assert!(matches!(err, FsError::ListingTooLarge { depth: 1, .. }), "{err:?}");
    }

    #[test]
    fn stat_echoes_the_path_and_reports_missing() {
        let (_dir, root) = tree();
        let path = root.join("b/../a.txt");
        let info = stat(&path).unwrap();
        assert_eq!(info.path, path.to_str().unwrap());
        assert_eq!(info.name, "a.txt");
        assert!(matches!(stat(&root.join("nope")), Err(FsError::NotFound { .. })));
    }

    #[test]
    fn make_dir_creates_parents_and_refuses_existing() {
        let (_dir, root) = tree();
        let path = root.join("x/y/z");
        let info = make_dir(&path, me()).unwrap();
        assert_eq!(info.kind, FileKind::Directory);
        assert_eq!(info.name, "z");
        let mode = fs::metadata(root.join("x")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o022, 0o755 & !0o022, "0755 before umask");
        assert!(matches!(make_dir(&path, me()), Err(FsError::AlreadyExists { .. })));
        assert!(matches!(make_dir(&root.join("a.txt"), me()), Err(FsError::NotADirectory { .. })));
        assert!(matches!(make_dir(&root.join("a.txt/sub"), me()), Err(FsError::Io { op: "stat", .. })));
        // A symlink to a directory counts as an existing directory (stat follows links).
        assert!(matches!(make_dir(&root.join("link-b"), me()), Err(FsError::AlreadyExists { .. })));
    }

    #[test]
    fn ensure_dirs_reports_a_file_in_the_way() {
        let (_dir, root) = tree();
        let err = ensure_dirs(&root.join("a.txt/inner"), me()).unwrap_err();
        assert!(matches!(&err, FsError::ParentNotDirectory { path } if *path == root.join("a.txt")), "{err:?}");
        assert_eq!(err.to_string(), format!("path is a file: {}", root.join("a.txt").display()));
    }

    #[test]
    fn ensure_dirs_chowns_only_what_it_creates_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping ensure_dirs_chowns_only_what_it_creates_as_root: needs root to chown");
            return;
        }
        let (_dir, root) = tree();
        let owner = Owner { uid: 4321, gid: 4322 };
        ensure_dirs(&root.join("new/deeper"), owner).unwrap();
        for dir in [root.join("new"), root.join("new/deeper")] {
            let meta = fs::metadata(&dir).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4321, 4322), "{}", dir.display());
        }
        assert_eq!(fs::metadata(&root).unwrap().uid(), 0, "existing parents keep their owner");
    }

    #[test]
    fn rename_replaces_and_creates_parents() {
        let (_dir, root) = tree();
        let info = rename(&root.join("a.txt"), &root.join("new/dir/a2.txt"), me()).unwrap();
        assert_eq!(info.path, root.join("new/dir/a2.txt").to_str().unwrap());
        assert_eq!(fs::read(root.join("new/dir/a2.txt")).unwrap(), b"a");
        assert!(!root.join("a.txt").exists());
        rename(&root.join("z.txt"), &root.join("b/c.txt"), me()).unwrap();
        assert_eq!(fs::read(root.join("b/c.txt")).unwrap(), b"z", "an existing file is replaced");
        let err = rename(&root.join("missing"), &root.join("m2"), me()).unwrap_err();
        assert!(matches!(&err, FsError::NotFound { path } if *path == root.join("missing")));
        // No "move into directory" semantics: a non-empty directory destination is an error.
        fs::write(root.join("f"), b"f").unwrap();
        assert!(matches!(rename(&root.join("f"), &root.join("b"), me()), Err(FsError::Io { .. })));
    }

    #[test]
    fn remove_is_recursive_idempotent_and_spares_link_targets() {
        let (_dir, root) = tree();
        remove(&root.join("link-b")).unwrap();
        assert!(root.join("b/d/e.txt").exists(), "removing a link leaves its target");
        remove(&root.join("b")).unwrap();
        assert!(!root.join("b").exists());
        remove(&root.join("a.txt")).unwrap();
        assert!(!root.join("a.txt").exists());
        remove(&root.join("does-not-exist")).unwrap();
        fs::create_dir(root.join("keep")).unwrap();
        fs::write(root.join("keep/f"), b"x").unwrap();
        assert!(matches!(remove(&root.join("keep/.")), Err(FsError::Io { op: "remove", .. })));
        assert!(root.join("keep/f").exists(), "nothing deleted for a path ending in '.'");
        assert!(matches!(remove(&root.join("keep/./")), Err(FsError::Io { op: "remove", .. })));
        assert!(root.join("keep/f").exists(), "nothing deleted for a path ending in './'");
        remove(&PathBuf::from(format!("{}/keep//", root.display()))).unwrap();
        assert!(!root.join("keep").exists(), "a directory spelled with trailing slashes is removed");
    }

    #[test]
    fn remove_of_a_link_spelled_with_a_trailing_slash_removes_only_the_link() {
        let (_dir, root) = tree();
        let path = PathBuf::from(format!("{}/link-b/", root.display()));
        let result = remove(&path);
        assert!(root.join("b/d/e.txt").exists(), "the link's target was emptied ({result:?})");
        assert!(root.join("b/c.txt").exists(), "the link's target was emptied ({result:?})");
        result.unwrap();
        assert!(fs::symlink_metadata(root.join("link-b")).is_err(), "the link itself is gone, as with envd");
    }
}
