//! The one seam to the filesystem domain: the `EntryInfo` attached to CREATE, WRITE and CHMOD
//! events when a watcher asked for `include_entry`.

use std::path::Path;

pub use crate::fs::EntryInfo;

/// Describes `path` without following a final symlink (rpc.md §3.2); `None` if that fails, e.g.
/// the path is gone by now: envd then omits the entry. Blocking.
pub(super) fn stat(path: &Path) -> Option<EntryInfo> {
    crate::fs::stat(path).ok()
}
