//! User metadata on files: `user.e2b.<key>` extended attributes (envd ≥ 0.6.2).
//!
//! Uploads carry metadata as `X-Metadata-<key>` headers; it is validated here with envd's rules
//! (http.md §4.6) so an invalid set is refused before any byte reaches the disk, then written to
//! the upload's temporary file, so content and metadata appear together at the rename.
//! Reading is best-effort like envd: a filesystem without xattrs, or a key or value that is not
//! UTF-8, simply contributes nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use rustix::fs::XattrFlags;

/// xattr namespace + prefix under which metadata keys live.
pub const XATTR_PREFIX: &str = "user.e2b.";

/// Longest key: xattr names are limited to 255 bytes, minus the prefix.
pub const MAX_KEY_BYTES: usize = 255 - XATTR_PREFIX.len();

/// Budget for the whole set, counted as envd does: Σ (9 + len(key) + len(value)).
/// 4096 bytes is what one ext4 inode block offers every xattr together.
pub const MAX_TOTAL_BYTES: usize = 4096;

/// A validated metadata set, keys without the prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

/// Why a metadata set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    /// A key was empty (e.g. a bare `X-Metadata-` header).
    #[error("metadata key must not be empty")]
    EmptyKey,
    /// A key was longer than [`MAX_KEY_BYTES`].
    #[error("metadata key '{key}' is longer than {MAX_KEY_BYTES} bytes")]
    KeyTooLong { key: String },
    /// A key contained a byte outside printable ASCII (0x20–0x7E).
    #[error("metadata key '{key}' must be printable ASCII")]
    KeyNotPrintable { key: String },
    /// A value contained a byte outside printable ASCII (0x20–0x7E).
    #[error("metadata value for key '{key}' must be printable ASCII")]
    ValueNotPrintable { key: String },
    /// The set exceeded [`MAX_TOTAL_BYTES`].
    #[error("metadata takes {size} bytes, more than the {MAX_TOTAL_BYTES} allowed")]
    TooLarge { size: usize },
}

impl Metadata {
    /// Validates `pairs` (keys without the prefix). A repeated key keeps its first value.
    pub fn new<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Metadata, MetadataError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut map = BTreeMap::new();
        let mut size = 0;
        for (key, value) in pairs {
            let (key, value): (String, String) = (key.into(), value.into());
            if key.is_empty() {
                return Err(MetadataError::EmptyKey);
            }
            if !printable(&key) {
                return Err(MetadataError::KeyNotPrintable { key });
            }
            if key.len() > MAX_KEY_BYTES {
                return Err(MetadataError::KeyTooLong { key });
            }
            if !printable(&value) {
                return Err(MetadataError::ValueNotPrintable { key });
            }
            if map.contains_key(&key) {
                continue;
            }
            size += XATTR_PREFIX.len() + key.len() + value.len();
            map.insert(key, value);
        }
        if size > MAX_TOTAL_BYTES {
            return Err(MetadataError::TooLarge { size });
        }
        Ok(Metadata(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }
}

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Reads every `user.e2b.*` xattr of `path` (following symlinks). Errors yield what was read.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(names) = list(path) else { return out };
    for name in names.split(|&b| b == 0) {
        let Some(key) = name.strip_prefix(XATTR_PREFIX.as_bytes()) else { continue };
        let Ok(key) = std::str::from_utf8(key) else { continue };
        let Ok(value) = get(path, name) else { continue };
        let Ok(value) = String::from_utf8(value) else { continue };
        out.insert(key.to_owned(), value);
    }
    out
}

/// Whether an xattr error means "this filesystem has no user xattrs" (procfs, sysfs, some FUSE).
pub(crate) fn unsupported(err: &io::Error) -> bool {
    matches!(err.raw_os_error().map(Errno::from_raw), Some(Errno::EOPNOTSUPP | Errno::ENOSYS))
}

/// Writes `metadata` onto an open file. The caller decides what an error means.
pub(crate) fn write_to(file: &File, metadata: &Metadata) -> io::Result<()> {
    for (key, value) in metadata.iter() {
        let name = format!("{XATTR_PREFIX}{key}");
        rustix::fs::fsetxattr(file, name.as_str(), value.as_bytes(), XattrFlags::empty())?;
    }
    Ok(())
}

/// Bounds retries when attributes change between the size query and the read (ERANGE).
const XATTR_RETRIES: usize = 4;

fn list(path: &Path) -> io::Result<Vec<u8>> {
    for _ in 0..XATTR_RETRIES {
        let size = rustix::fs::listxattr_query(path)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match rustix::fs::listxattr(path, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(io::Error::from_raw_os_error(Errno::ERANGE as i32))
}

fn get(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = std::ffi::OsStr::from_bytes(name);
    for _ in 0..XATTR_RETRIES {
        let size = rustix::fs::getxattr_query(path, name)?;
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(buf);
        }
        match rustix::fs::getxattr(path, name, &mut buf[..]) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(io::Error::from_raw_os_error(Errno::ERANGE as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rules() {
        assert!(Metadata::new([("a", "b")]).is_ok());
        assert_eq!(Metadata::new([("", "b")]), Err(MetadataError::EmptyKey));
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(Metadata::new([(long.as_str(), "v")]), Err(MetadataError::KeyTooLong { key: long.clone() }));
        assert!(Metadata::new([("k".repeat(MAX_KEY_BYTES), "v".to_owned())]).is_ok());
        assert!(matches!(Metadata::new([("k\u{7f}", "v")]), Err(MetadataError::KeyNotPrintable { .. })));
        assert!(matches!(Metadata::new([("k", "caf\u{e9}")]), Err(MetadataError::ValueNotPrintable { .. })));
        assert!(matches!(Metadata::new([("k", "tab\there")]), Err(MetadataError::ValueNotPrintable { .. })));
        // 9 + 1 + 4086 = 4096 fits exactly; one more byte does not.
        assert!(Metadata::new([("k", "v".repeat(4086))]).is_ok());
        assert_eq!(Metadata::new([("k", "v".repeat(4087))]), Err(MetadataError::TooLarge { size: 4097 }));
    }

    #[test]
    fn first_value_of_a_repeated_key_wins() {
        let m = Metadata::new([("a", "1"), ("a", "2")]).unwrap();
        assert_eq!(m.into_map(), BTreeMap::from([("a".to_owned(), "1".to_owned())]));
    }

    #[test]
    fn roundtrip_through_xattrs_skips_foreign_and_non_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        let metadata = Metadata::new([("owner", "alice"), ("empty", "")]).unwrap();
        match write_to(&file, &metadata) {
            Err(err) if unsupported(&err) => {
                eprintln!("skipping: the test directory's filesystem has no user xattrs ({err})");
                return;
            }
            other => other.unwrap(),
        }
        rustix::fs::fsetxattr(&file, "user.other", b"x", XattrFlags::empty()).unwrap();
        rustix::fs::fsetxattr(&file, "user.e2b.bin", b"\xff\xfe", XattrFlags::empty()).unwrap();
        let read_back = read(&path);
        assert_eq!(
            read_back,
            BTreeMap::from([("empty".to_owned(), String::new()), ("owner".to_owned(), "alice".to_owned())])
        );
        // Through a symlink too (getxattr follows links).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(read(&link), read_back);
    }

    #[test]
    fn missing_path_reads_empty() {
        assert!(read(Path::new("/nonexistent/guestd")).is_empty());
    }
}
