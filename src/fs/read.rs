//! [`ReadableFile`]: a regular file opened once (so checks and reads see the same inode) and
//! streamed in bounded chunks, each read with `pread` on the blocking pool.
//!
//! Memory per stream is one chunk ([`CHUNK_BYTES`]) plus whatever the consumer buffers; the
//! stream never reads ahead of its consumer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::Stream;
use nix::fcntl::OFlag;

use super::FsError;

/// Size of one read. 256 KiB keeps syscalls and blocking-pool hops per GiB low (~4k) while
/// staying small next to a sandbox's memory even with many concurrent downloads.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A regular file open for reading.
#[derive(Debug, Clone)]
pub struct ReadableFile {
    file: Arc<File>,
    path: PathBuf,
    /// `st_size` at open time. Zero also for procfs/sysfs files whose content has no size.
    pub size: u64,
    /// mtime at open time; `None` at the epoch (HTTP then sends no `Last-Modified`).
    pub modified: Option<SystemTime>,
}

impl ReadableFile {
    /// Opens `path` (following symlinks) for reading; blocking. A directory is
    /// [`FsError::IsADirectory`]; a fifo, socket or device is [`FsError::NotRegularFile`] — it
    /// is opened non-blocking so a fifo without a writer cannot hang the caller.
    pub fn open(path: &Path) -> Result<ReadableFile, FsError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(|e| FsError::from_io("open", path, e))?;
        let meta = file.metadata().map_err(|e| FsError::from_io("stat", path, e))?;
        if meta.is_dir() {
            return Err(FsError::IsADirectory { path: path.to_path_buf() });
        }
        if !meta.is_file() {
            return Err(FsError::NotRegularFile { path: path.to_path_buf() });
        }
        let modified = match (meta.mtime(), meta.mtime_nsec()) {
            (0, 0) => None,
            _ => meta.modified().ok(),
        };
        Ok(ReadableFile { file: Arc::new(file), path: path.to_path_buf(), size: meta.len(), modified })
    }

    /// Up to `max` bytes from the start (content sniffing); blocking.
    pub fn head(&self, max: usize) -> Result<Vec<u8>, FsError> {
        let mut buf = vec![0u8; max];
        let mut filled = 0;
        while filled < max {
            match self.file.read_at(&mut buf[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FsError::from_io("read", &self.path, e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// The bytes from `offset`: exactly `len` of them (a file that shrank meanwhile ends the
    /// stream with `UnexpectedEof`), or everything up to end of file when `len` is `None`.
    pub fn chunks(&self, offset: u64, len: Option<u64>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let state = Some(Cursor { file: self.file.clone(), offset, remaining: len });
        futures_util::stream::unfold(state, |state| async move {
            let mut cursor = state?;
            let want = match cursor.remaining {
                Some(0) => return None,
                Some(n) => n.min(CHUNK_BYTES as u64) as usize,
                None => CHUNK_BYTES,
            };
            let (file, offset) = (cursor.file.clone(), cursor.offset);
            let read = tokio::task::spawn_blocking(move || read_chunk(&file, offset, want))
                .await
                .unwrap_or_else(|join| Err(io::Error::other(join)));
            match read {
                Ok(chunk) if chunk.is_empty() => cursor.remaining.map(|left| {
                    let shrank = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("file shrank while being read: {left} bytes missing"),
                    );
                    (Err(shrank), None)
                }),
                Ok(chunk) => {
                    cursor.offset += chunk.len() as u64;
                    if let Some(left) = cursor.remaining.as_mut() {
                        *left -= chunk.len() as u64;
                    }
                    Some((Ok(chunk), Some(cursor)))
                }
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

struct Cursor {
    file: Arc<File>,
    offset: u64,
    remaining: Option<u64>,
}

/// One `pread` of up to `want` bytes (retried on EINTR); empty at end of file.
fn read_chunk(file: &File, offset: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; want];
    loop {
        match file.read_at(&mut buf, offset) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Bytes::from(buf));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;

    use super::*;

    async fn collect(s: impl Stream<Item = io::Result<Bytes>>) -> io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = s.try_collect().await?;
        Ok(chunks.concat())
    }

    #[tokio::test]
    async fn reads_ranges_and_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = ReadableFile::open(&path).unwrap();
        assert_eq!(file.size, data.len() as u64);
        assert!(file.modified.is_some());
        assert_eq!(collect(file.chunks(0, None)).await.unwrap(), data);
        assert_eq!(collect(file.chunks(0, Some(data.len() as u64))).await.unwrap(), data);
        assert_eq!(collect(file.chunks(5, Some(10))).await.unwrap(), &data[5..15]);
        assert_eq!(file.head(4).unwrap(), &data[..4]);
    }

    #[tokio::test]
    async fn a_file_that_shrinks_ends_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = ReadableFile::open(&path).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4).unwrap();
        let err = collect(file.chunks(0, Some(10))).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn refuses_directories_fifos_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(ReadableFile::open(dir.path()), Err(FsError::IsADirectory { .. })));
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(ReadableFile::open(&fifo), Err(FsError::NotRegularFile { .. })));
        assert!(matches!(ReadableFile::open(&dir.path().join("none")), Err(FsError::NotFound { .. })));
    }

    #[test]
    fn procfs_files_read_to_eof() {
        let file = ReadableFile::open(Path::new("/proc/self/status")).unwrap();
        assert_eq!(file.size, 0, "procfs reports no size");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let data = rt.block_on(collect(file.chunks(0, None))).unwrap();
        assert!(String::from_utf8_lossy(&data).contains("Pid:"));
    }
}
