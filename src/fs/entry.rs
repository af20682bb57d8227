//! [`EntryInfo`]: envd's description of one path (rpc.md §3.2), computed from `lstat`.
//!
//! Deliberate envd compatibility: a symlink reports its *target's* kind and permission bits
//! (a dangling one reports [`FileKind::Other`] and mode 0), `symlink_target` is the fully
//! resolved path (or the link's own path when resolution fails), while `size`, `permissions`,
//! `owner` and `group` describe the link itself.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use nix::unistd::{Gid, Group, Uid, User};

use super::{FsError, metadata};

/// The kind envd reports: for a symlink, the kind of what it points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    /// Fifo, socket, device, or a dangling/looping symlink (envd's `FILE_TYPE_UNSPECIFIED`).
    Other,
}

/// One path as envd describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    /// Base name (Go's `Lstat().Name()`: trailing slashes ignored, `/` for the root).
    pub name: String,
    pub kind: FileKind,
    /// The path as the caller spelled it (after resolution); `list_dir` rewrites it.
    pub path: String,
    /// `lstat` size: link text length for symlinks, fs-reported size for directories.
    pub size: i64,
    /// `st_mode & 0o777`; the target's for symlinks, 0 when dangling.
    pub mode: u32,
    /// Go's `os.FileMode.String()` of the `lstat` mode, e.g. `-rw-r--r--`, `Lrwxrwxrwx`.
    pub permissions: String,
    /// User name of the `lstat` uid, else the decimal uid.
    pub owner: String,
    /// Group name of the `lstat` gid, else the decimal gid.
    pub group: String,
    /// `lstat` mtime with nanoseconds; `None` iff it is exactly the epoch.
    pub modified: Option<SystemTime>,
    /// Fully resolved target for symlinks (the link's own path if resolution fails).
    pub symlink_target: Option<String>,
    pub is_symlink: bool,
    /// `user.e2b.<key>` xattrs (read through symlinks), prefix stripped.
    pub metadata: BTreeMap<String, String>,
}

/// Describes `path` without following a final symlink (rpc.md §3.2).
pub fn entry_info(path: &Path) -> Result<EntryInfo, FsError> {
    entry_info_with(path, &mut Names::default())
}

/// [`entry_info`] with a name cache, so listing a directory reads passwd/group once per id.
pub(crate) fn entry_info_with(path: &Path, names: &mut Names) -> Result<EntryInfo, FsError> {
    let meta = fs::symlink_metadata(path).map_err(|e| FsError::from_io("stat", path, e))?;
    let file_type = meta.file_type();
    let (kind, mode, symlink_target) = if file_type.is_symlink() {
        match fs::canonicalize(path) {
            Ok(target) => {
                let (kind, mode) = match fs::metadata(&target) {
                    Ok(t) => (kind_of(&t.file_type()), t.mode() & 0o777),
                    Err(_) => (FileKind::Other, 0),
                };
                (kind, mode, Some(target.to_string_lossy().into_owned()))
            }
            Err(_) => (FileKind::Other, 0, Some(path.to_string_lossy().into_owned())),
        }
    } else {
        (kind_of(&file_type), meta.mode() & 0o777, None)
    };
    let modified = match (meta.mtime(), meta.mtime_nsec()) {
        (0, 0) => None,
        (secs, nanos) => Some(epoch_offset(secs, nanos)),
    };
    Ok(EntryInfo {
        name: base_name(path),
        kind,
        path: path.to_string_lossy().into_owned(),
        size: meta.size() as i64,
        mode,
        permissions: permissions_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified,
        symlink_target,
        is_symlink: file_type.is_symlink(),
        metadata: metadata::read(path),
    })
}

fn kind_of(file_type: &fs::FileType) -> FileKind {
    if file_type.is_file() {
        FileKind::File
    } else if file_type.is_dir() {
        FileKind::Directory
    } else {
        FileKind::Other
    }
}

fn epoch_offset(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// Go's `filepath.Base` as `os.Lstat` names entries: trailing slashes dropped, `/` stays `/`.
pub(crate) fn base_name(path: &Path) -> String {
    let mut bytes = path.as_os_str().as_bytes();
    while bytes.len() > 1 && bytes.ends_with(b"/") {
        bytes = &bytes[..bytes.len() - 1];
    }
    if bytes.len() > 1
        && let Some(slash) = bytes.iter().rposition(|&b| b == b'/')
    {
        bytes = &bytes[slash + 1..];
    }
    String::from_utf8_lossy(bytes).into_owned()
}

/// Go's `os.FileMode.String()` for a Linux `st_mode`: type/flag letters in Go's order
/// `d a l T L D p S u g c t ?` (only `d L D p S u g c t` occur on Linux), `-` if none, then
/// the nine `rwx` bits. Not `ls -l`: setuid shows as a leading `u`, not as an `s`.
pub fn permissions_string(st_mode: u32) -> String {
    const S_IFMT: u32 = 0o170_000;
    let kind = st_mode & S_IFMT;
    let mut out = String::with_capacity(12);
    if kind == 0o040_000 {
        out.push('d');
    }
    if kind == 0o120_000 {
        out.push('L');
    }
    if kind == 0o060_000 || kind == 0o020_000 {
        out.push('D');
    }
    if kind == 0o010_000 {
        out.push('p');
    }
    if kind == 0o140_000 {
        out.push('S');
    }
    if st_mode & 0o4000 != 0 {
        out.push('u');
    }
    if st_mode & 0o2000 != 0 {
        out.push('g');
    }
    if kind == 0o020_000 {
        out.push('c');
    }
    if st_mode & 0o1000 != 0 {
        out.push('t');
    }
    if out.is_empty() {
        out.push('-');
    }
    for (i, letter) in "rwxrwxrwx".chars().enumerate() {
        out.push(if st_mode & (1 << (8 - i)) != 0 { letter } else { '-' });
    }
    out
}

/// uid/gid → name cache for one operation. Nothing outlives the call: users created later are
/// seen by the next request, as everywhere else in guestd (see `crate::users`).
#[derive(Default)]
pub(crate) struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| match User::from_uid(Uid::from_raw(uid)) {
                Ok(Some(user)) => user.name,
                _ => uid.to_string(),
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| match Group::from_gid(Gid::from_raw(gid)) {
                Ok(Some(group)) => group.name,
                _ => gid.to_string(),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn permission_strings_match_go() {
        assert_eq!(permissions_string(0o100_644), "-rw-r--r--");
        assert_eq!(permissions_string(0o040_755), "drwxr-xr-x");
        assert_eq!(permissions_string(0o120_777), "Lrwxrwxrwx");
        assert_eq!(permissions_string(0o041_777), "dtrwxrwxrwx");
        assert_eq!(permissions_string(0o104_755), "urwxr-xr-x");
        assert_eq!(permissions_string(0o102_755), "grwxr-xr-x");
        assert_eq!(permissions_string(0o020_666), "Dcrw-rw-rw-");
        assert_eq!(permissions_string(0o060_660), "Drw-rw----");
        assert_eq!(permissions_string(0o010_644), "prw-r--r--");
        assert_eq!(permissions_string(0o140_755), "Srwxr-xr-x");
        assert_eq!(permissions_string(0o100_000), "----------");
    }

    #[test]
    fn base_name_matches_go() {
        assert_eq!(base_name(Path::new("/a/b.txt")), "b.txt");
        assert_eq!(base_name(Path::new("/a/b/")), "b");
        assert_eq!(base_name(Path::new("/")), "/");
        assert_eq!(base_name(Path::new("/a/..")), "..");
        assert_eq!(base_name(Path::new("rel")), "rel");
    }

    #[test]
    fn regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        fs::write(&path, b"hello").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let info = entry_info(&path).unwrap();
        assert_eq!(info.name, "f.txt");
        assert_eq!(info.kind, FileKind::File);
        assert_eq!(info.path, path.to_str().unwrap());
        assert_eq!(info.size, 5);
        assert_eq!(info.mode, 0o640);
        assert_eq!(info.permissions, "-rw-r-----");
        assert_eq!(info.symlink_target, None);
        assert!(!info.is_symlink);
        assert!(info.modified.is_some());
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(info.modified.unwrap(), meta.modified().unwrap(), "nanosecond mtime");
        let me = crate::users::current().unwrap();
        assert_eq!(info.owner, me.name);
        assert_eq!(info.group, Group::from_gid(Gid::from_raw(meta.gid())).unwrap().unwrap().name);
    }

    #[test]
    fn directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o1777)).unwrap();
        let info = entry_info(&sub).unwrap();
        assert_eq!(info.kind, FileKind::Directory);
        assert_eq!(info.mode, 0o777, "sticky bit is not part of mode");
        assert_eq!(info.permissions, "dtrwxrwxrwx");
    }

    #[test]
    fn symlink_reports_target_kind_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let real = fs::canonicalize(dir.path()).unwrap();
        let target = real.join("target.txt");
        fs::write(&target, b"0123456789").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        let link = real.join("link");
        symlink("target.txt", &link).unwrap();
        let info = entry_info(&link).unwrap();
        assert_eq!(info.name, "link");
        assert_eq!(info.kind, FileKind::File);
        assert_eq!(info.mode, 0o600);
        assert_eq!(info.size, "target.txt".len() as i64, "size is the link's own");
        assert_eq!(info.permissions, "Lrwxrwxrwx");
        assert_eq!(info.symlink_target.as_deref(), Some(target.to_str().unwrap()));
        assert!(info.is_symlink);

        let dir_link = real.join("dlink");
        symlink(&real, &dir_link).unwrap();
        assert_eq!(entry_info(&dir_link).unwrap().kind, FileKind::Directory);
    }

    #[test]
    fn dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("dangling");
        symlink("/nonexistent/guestd-target", &link).unwrap();
        let info = entry_info(&link).unwrap();
        assert_eq!(info.kind, FileKind::Other);
        assert_eq!(info.mode, 0);
        assert_eq!(info.symlink_target.as_deref(), Some(link.to_str().unwrap()), "falls back to the link itself");
        assert!(info.is_symlink);
        assert!(info.metadata.is_empty());
    }

    #[test]
    fn fifo_is_other() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        fs::set_permissions(&fifo, fs::Permissions::from_mode(0o644)).unwrap();
        let info = entry_info(&fifo).unwrap();
        assert_eq!(info.kind, FileKind::Other);
        assert_eq!(info.permissions, "prw-r--r--");
        assert_eq!(info.mode, 0o644);
    }

    #[test]
    fn missing_is_not_found() {
        let err = entry_info(Path::new("/nonexistent/guestd/x")).unwrap_err();
        assert!(matches!(err, FsError::NotFound { .. }), "{err:?}");
        assert_eq!(err.to_string(), "file not found: /nonexistent/guestd/x");
    }

    #[test]
    fn unknown_ids_are_decimal() {
        let mut names = Names::default();
        assert_eq!(names.user(4_000_000_001), "4000000001");
        assert_eq!(names.group(4_000_000_001), "4000000001");
        assert_eq!(names.user(0), "root");
    }

    #[test]
    fn epoch_mtime_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        let file = fs::File::create(&path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(entry_info(&path).unwrap().modified, None);
    }
}
