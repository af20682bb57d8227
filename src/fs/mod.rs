//! The filesystem domain: what `filesystem.Filesystem` RPCs and the `/files` routes do to disk.
//!
//! | module | owns |
//! |---|---|
//! | [`entry`] | [`EntryInfo`]: envd's view of one path (type, Go-style permission string, owner names, xattr metadata) |
//! | [`ops`] | `stat`, `list_dir`, `make_dir`, `rename`, `remove`, `ensure_dirs` (rpc.md §5.1–5.5) |
//! | [`metadata`] | `user.e2b.*` extended attributes: validation, reading, writing |
//! | [`write`] | [`AtomicWrite`]: a file streamed into a temporary sibling and renamed over its target on commit |
//! | [`read`] | [`ReadableFile`]: a regular file opened once and read in bounded chunks at any offset |
//!
//! Nothing here knows about HTTP, Connect or protobuf: callers pass resolved paths
//! (`crate::paths::resolve`) and an [`Owner`], and map [`FsError`] to their own codes.
//!
//! Concurrency model: the path operations (`stat`, `list_dir`, ..., `read::open`) are plain
//! blocking functions; callers run them in `tokio::task::spawn_blocking`. Only the streaming
//! pieces ([`AtomicWrite::write`]/[`AtomicWrite::commit`], [`ReadableFile::chunks`]) are async,
//! because they interleave with network I/O; they push their syscalls to the blocking pool
//! themselves. There is no shared state: every call works on its own paths and descriptors, and
//! concurrent writers to one target resolve as "last rename wins", never as a torn file.
//!
//! Operations run with guestd's own privileges (root in a sandbox), like envd: the request user
//! only decides path resolution and the ownership of what gets created.

pub mod entry;
pub mod metadata;
pub mod ops;
pub mod read;
pub mod write;

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

pub use entry::{EntryInfo, FileKind};
pub use metadata::{Metadata, MetadataError};
pub use ops::{ensure_dirs, list_dir, make_dir, remove, rename, stat};
pub use read::ReadableFile;
pub use write::{AtomicWrite, is_upload_temp};

/// Who owns the directories and files an operation creates (the request user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Why a filesystem operation failed. Every message names the path it failed on; the OS error,
/// when there is one, is the `source`.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Nothing exists at the path (or, for a rename, at the source).
    #[error("file not found: {}", .path.display())]
    NotFound { path: PathBuf },
    /// `make_dir` on a directory that already exists.
    #[error("directory already exists: {}", .path.display())]
    AlreadyExists { path: PathBuf },
    /// The path exists but a directory was required (`list_dir`; `make_dir` on a file).
    #[error("path is not a directory: {}", .path.display())]
    NotADirectory { path: PathBuf },
    /// The path is a directory but a file was required (download, upload target).
    #[error("path is a directory: {}", .path.display())]
    IsADirectory { path: PathBuf },
    /// The path is a fifo, socket or device: guestd neither streams from nor renames over those.
    #[error("path is not a regular file: {}", .path.display())]
    NotRegularFile { path: PathBuf },
    /// A component of a directory chain to create exists and is not a directory (envd's wording).
    #[error("path is a file: {}", .path.display())]
    ParentNotDirectory { path: PathBuf },
    /// Symlink resolution looped or exceeded the kernel's link limit (ELOOP).
    #[error("cyclic symlink or chain >255 links at \"{}\"", .path.display())]
    CyclicSymlink { path: PathBuf },
    /// EACCES/EPERM (read-only bind mounts, immutable files; guestd itself usually runs as root).
    #[error("permission denied: {}", .path.display())]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A `list_dir` result would exceed `ops::LIST_DIR_MAX_BYTES`: too many entries at this depth.
    #[error(
        "listing {} to depth {depth} exceeds {limit} bytes: list fewer levels or a subdirectory",
        .path.display()
    )]
    ListingTooLarge { path: PathBuf, depth: u32, limit: usize },
    /// The path is on a network filesystem and the caller did not allow that (watchers).
    #[error("path is on a network mount: {}", .path.display())]
    NetworkMount { path: PathBuf },
    /// ENOSPC/EDQUOT: the disk, its inodes or the user's quota ran out.
    #[error("not enough disk space available for {}", .path.display())]
    NoSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other OS error; `op` says what was attempted ("stat", "rename", ...).
    #[error("cannot {op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Classifies an OS error from `op` on `path` into the variant callers distinguish.
    pub(crate) fn from_io(op: &'static str, path: &Path, source: io::Error) -> FsError {
        let path = path.to_path_buf();
        match source.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ENOENT) => FsError::NotFound { path },
            Some(Errno::ENOSPC | Errno::EDQUOT) => FsError::NoSpace { path, source },
            Some(Errno::EACCES | Errno::EPERM) => FsError::PermissionDenied { path, source },
            Some(Errno::ELOOP) => FsError::CyclicSymlink { path },
            _ => FsError::Io { op, path, source },
        }
    }
}

/// Go's `filepath.Clean` for the paths this module prints and walks: collapses `//`, drops `.`,
/// resolves `..` lexically (never above `/`). Kept local so `fs` does not reach into `paths`.
pub(crate) fn clean(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    let mut depth = 0usize; // normal components pushed, so `..` knows whether it can pop
    for component in path.components() {
        match component {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if depth > 0 {
                    out.pop();
                    depth -= 1;
                } else if !path.has_root() {
                    out.push("..");
                }
            }
            Component::Normal(name) => {
                out.push(name);
                depth += 1;
            }
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_matches_go_filepath_clean() {
        assert_eq!(clean(Path::new("/a//b/./c/..")), PathBuf::from("/a/b"));
        assert_eq!(clean(Path::new("/a/../../b/")), PathBuf::from("/b"));
        assert_eq!(clean(Path::new("/..")), PathBuf::from("/"));
        assert_eq!(clean(Path::new("")), PathBuf::from("."));
        assert_eq!(clean(Path::new("a/../..")), PathBuf::from(".."));
    }

    #[test]
    fn errno_classification() {
        let p = Path::new("/x");
        let e = |n| io::Error::from_raw_os_error(n as i32);
        assert!(matches!(FsError::from_io("op", p, e(Errno::ENOENT)), FsError::NotFound { .. }));
        assert!(matches!(FsError::from_io("op", p, e(Errno::ENOSPC)), FsError::NoSpace { .. }));
        assert!(matches!(FsError::from_io("op", p, e(Errno::EDQUOT)), FsError::NoSpace { .. }));
        assert!(matches!(FsError::from_io("op", p, e(Errno::EPERM)), FsError::PermissionDenied { .. }));
        assert!(matches!(FsError::from_io("op", p, e(Errno::ELOOP)), FsError::CyclicSymlink { .. }));
        let other = FsError::from_io("rename", p, e(Errno::EXDEV));
        assert_eq!(other.to_string(), "cannot rename /x");
    }
}
