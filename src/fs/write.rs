//! [`AtomicWrite`]: replace a file's content so that readers see the old bytes or the new ones,
//! never a mix, and a failed upload leaves nothing behind.
//!
//! The new content goes into `.<name>.guestd-upload-<random>`, created `O_EXCL` in the target's
//! own directory (so the final `rename(2)` stays on one filesystem and is atomic), owned by the
//! request user, with the target's mode if it exists, carrying the upload's metadata xattrs.
//! [`AtomicWrite::commit`] flushes, fsyncs, renames over the target and fsyncs the directory.
//! Every other ending — an error, a dropped future (client gone), a panic — goes through `Drop`,
//! which unlinks the temporary file. Only a crash of guestd itself between create and commit
//! can leave a temporary file; its name says who left it.
//!
//! Deliberate differences from envd's in-place `O_TRUNC` write: a symlink target is followed
//! (the link's destination is replaced, the link stays); a fifo, socket or device target is
//! refused instead of written into; xattrs other than `user.e2b.*` on a replaced file are not
//! carried over (the mode and the owner-by-request-user are).

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use tokio::task::JoinHandle;

use super::metadata::{self, Metadata};
use super::{FsError, Owner, ensure_dirs};

/// Tries at a fresh random temp name before giving up; a collision needs 64 random bits to
/// repeat, so more than one retry means something else is wrong.
const TEMP_NAME_ATTEMPTS: usize = 4;

/// Longest slice of the target's name kept in the temp name, so `.` + name + suffix stays
/// within NAME_MAX (255).
const TEMP_NAME_KEEP: usize = 200;

/// Symlink hops followed to find the real target (the kernel's own limit is 40).
const MAX_SYMLINK_HOPS: usize = 40;

/// Incoming chunks (often 8–64 KiB from hyper) are gathered into buffers of this size before
/// each `write(2)`, so a GiB costs ~1k blocking-pool hops instead of ~100k. One buffer is being
/// written while the next fills: memory per upload is twice this, whatever the file size.
pub const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// A file being written: content streams into a temporary sibling of the target until
/// [`commit`](AtomicWrite::commit) renames it into place. Dropping it uncommitted removes the
/// temporary file and leaves the target untouched.
#[derive(Debug)]
pub struct AtomicWrite {
    /// Where the content lands: the requested path with final symlinks followed.
    target: PathBuf,
    temp: PathBuf,
    file: Arc<File>,
    /// Bytes gathered for the next `write(2)`.
    buffer: Vec<u8>,
    /// The `write(2)` in flight on the blocking pool; hands its buffer back for reuse.
    in_flight: Option<JoinHandle<(Vec<u8>, io::Result<()>)>>,
    written: u64,
    committed: bool,
}

impl AtomicWrite {
    /// Prepares to replace `path` (async: the setup syscalls run on the blocking pool).
    ///
    /// Creates `path`'s missing parents for `owner` ([`ensure_dirs`]); refuses a directory
    /// ([`FsError::IsADirectory`]) or special file ([`FsError::NotRegularFile`]); creates the
    /// temporary file (mode 0666 before umask, or the existing target's mode), chowns it to
    /// `owner` and writes `metadata` onto it. ENOSPC here means no inode could be had.
    pub async fn create(path: &Path, owner: Owner, metadata: Metadata) -> Result<AtomicWrite, FsError> {
        let path = path.to_path_buf();
        // The value is built inside the blocking task: if this future is dropped meanwhile
        // (the client vanished), tokio drops the task's output, and `Drop` removes the file.
        tokio::task::spawn_blocking(move || {
            let (target, temp, file) = prepare(&path, owner, &metadata)?;
            Ok(AtomicWrite {
                target,
                temp,
                file: Arc::new(file),
                buffer: Vec::with_capacity(WRITE_BUFFER_BYTES),
                in_flight: None,
                written: 0,
                committed: false,
            })
        })
        .await
        .map_err(|join| FsError::Io {
            op: "prepare",
            path: PathBuf::new(),
            source: io::Error::other(join),
        })?
    }

    /// The path the content will replace (symlinks followed).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`. Writes happen in the background, a buffer at a time, so an error (such
    /// as ENOSPC) may surface on a later call; [`commit`](AtomicWrite::commit) reports any left.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), FsError> {
        while !data.is_empty() {
            let room = WRITE_BUFFER_BYTES - self.buffer.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buffer.extend_from_slice(now);
            self.written += now.len() as u64;
            data = rest;
            if self.buffer.len() == WRITE_BUFFER_BYTES {
                self.start_write().await?;
            }
        }
        Ok(())
    }

    /// Waits for the write in flight, then starts writing the gathered buffer.
    async fn start_write(&mut self) -> Result<(), FsError> {
        let spare = self.finish_write().await?;
        let buffer = std::mem::replace(&mut self.buffer, spare);
        let file = self.file.clone();
        let offset = self.written - buffer.len() as u64;
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let result = (&*file).write_all(&buffer);
            if result.is_ok() {
                // Best effort (tmpfs and some filesystems do nothing or refuse): the bytes go to
                // disk while the rest arrives, so commit's fsync has little left to wait for.
                let _ = crate::sys::fd::start_writeback(file.as_fd(), offset, buffer.len() as u64);
            }
            (buffer, result)
        }));
        Ok(())
    }

    /// Waits for the write in flight (if any) and returns an empty buffer to fill next.
    async fn finish_write(&mut self) -> Result<Vec<u8>, FsError> {
        let Some(task) = self.in_flight.take() else { return Ok(Vec::with_capacity(WRITE_BUFFER_BYTES)) };
        let (mut buffer, result) = task.await.map_err(|join| self.io("write", io::Error::other(join)))?;
        result.map_err(|e| FsError::from_io("write", &self.target, e))?;
        buffer.clear();
        Ok(buffer)
    }

    fn io(&self, op: &'static str, source: io::Error) -> FsError {
        FsError::Io { op, path: self.target.clone(), source }
    }

    /// Makes the new content durable and visible: write what is buffered, fsync, rename over
    /// the target, fsync the directory. On error the target keeps its old content and the
    /// temp file is removed.
    pub async fn commit(mut self) -> Result<(), FsError> {
        if !self.buffer.is_empty() {
            self.start_write().await?;
        }
        self.finish_write().await?;
        let (file, temp, target) = (self.file.clone(), self.temp.clone(), self.target.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(|e| FsError::from_io("sync", &target, e))?;
            fs::rename(&temp, &target).map_err(|e| FsError::from_io("rename into place", &target, e))?;
            sync_parent(&target);
            Ok::<_, FsError>(())
        })
        .await
        .map_err(|join| self.io("rename into place", io::Error::other(join)))??;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicWrite {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // One unlink on a local directory: cheap enough to do inline even on a runtime thread,
        // and doing it here (not in a spawned task) means it also happens on shutdown.
        match fs::remove_file(&self.temp) {
            Ok(()) => tracing::debug!(temp = %self.temp.display(), "removed unfinished upload"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(temp = %self.temp.display(), error = %e, "cannot remove unfinished upload"),
        }
    }
}

fn prepare(path: &Path, owner: Owner, metadata: &Metadata) -> Result<(PathBuf, PathBuf, File), FsError> {
    if let Some(parent) = path.parent() {
        ensure_dirs(parent, owner)?;
    }
    let target = follow_symlinks(path)?;
    let existing = match fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => return Err(FsError::IsADirectory { path: path.to_path_buf() }),
        Ok(meta) if !meta.is_file() => return Err(FsError::NotRegularFile { path: path.to_path_buf() }),
        Ok(meta) => Some(meta),
        Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => None,
        Err(e) => return Err(FsError::from_io("stat", &target, e)),
    };
    let (temp, file) = create_temp(&target)?;
    // From here on, `guard` removes the temp file if any step fails.
    let guard = TempGuard(Some(temp));
    let temp_path = guard.path();
    std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid))
        .map_err(|e| FsError::from_io("change the owner of", temp_path, e))?;
    if let Some(meta) = existing {
        // After fchown, which clears setuid/setgid: the old mode comes back whole.
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| FsError::from_io("set the mode of", temp_path, e))?;
    }
    if !metadata.is_empty() {
        match metadata::write_to(&file, metadata) {
            Ok(()) => {}
            // envd only warns when the filesystem has no xattrs (procfs, sysfs, some FUSE).
            Err(e) if metadata::unsupported(&e) => {
                tracing::warn!(path = %path.display(), error = %e, "filesystem does not store metadata; ignoring it");
            }
            Err(e) => return Err(FsError::from_io("write metadata of", path, e)),
        }
    }
    Ok((target, guard.keep(), file))
}

/// Follows symlinks in the final component (only), like `open(O_CREAT)` would: a dangling
/// link yields the path it points to, so the upload creates the link's destination.
fn follow_symlinks(path: &Path) -> Result<PathBuf, FsError> {
    let mut current = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&current).map_err(|e| FsError::from_io("read link", &current, e))?;
                current = match current.parent() {
                    Some(parent) => parent.join(link),
                    None => link,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => return Ok(current),
            Err(e) => return Err(FsError::from_io("stat", &current, e)),
        }
    }
    Err(FsError::CyclicSymlink { path: path.to_path_buf() })
}

/// Marker in the names of upload temporaries (`.<name>.guestd-upload-<16 hex>`).
const TEMP_MARKER: &str = ".guestd-upload-";

/// Whether `name` is one of guestd's own upload temporaries, which watchers must not report:
/// what a watcher sees of an upload is the target being created and written.
pub fn is_upload_temp(name: &std::ffi::OsStr) -> bool {
    let name = name.as_bytes();
    name.first() == Some(&b'.')
        && name.len() > TEMP_MARKER.len() + 16
        && name[name.len() - 16..].iter().all(u8::is_ascii_hexdigit)
        && name[..name.len() - 16].ends_with(TEMP_MARKER.as_bytes())
}

fn create_temp(target: &Path) -> Result<(PathBuf, File), FsError> {
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
    // Bytes, not text: a name that is not UTF-8 keeps its length (lossy decoding would turn
    // each stray byte into three and push the temporary's name past NAME_MAX).
    let kept = &name[..name.len().min(TEMP_NAME_KEEP)];
    let mut last = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let mut temp_name = Vec::with_capacity(1 + kept.len() + TEMP_MARKER.len() + 16);
        temp_name.push(b'.');
        temp_name.extend_from_slice(kept);
        temp_name.extend_from_slice(format!("{TEMP_MARKER}{:016x}", fastrand::u64(..)).as_bytes());
        let temp = dir.join(OsStr::from_bytes(&temp_name));
        match OpenOptions::new().write(true).create_new(true).mode(0o666).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(FsError::from_io("create a temporary file for", target, e)),
        }
    }
    Err(FsError::from_io("create a temporary file for", target, last.unwrap_or_else(|| io::Error::other("no attempt"))))
}

/// fsync of the directory, so the rename survives a crash. Best effort: some filesystems
/// refuse fsync on directories, and the data itself is already durable.
fn sync_parent(target: &Path) {
    let Some(dir) = target.parent() else { return };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "directory fsync failed");
    }
}

/// Removes a temporary file unless [`TempGuard::keep`] hands it over.
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn me() -> Owner {
        Owner { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".guestd-upload-"))
            .collect()
    }

    #[test]
    fn upload_temporaries_are_recognized() {
        use std::ffi::OsStr;
        assert!(is_upload_temp(OsStr::new(".a.txt.guestd-upload-0123456789abcdef")));
        assert!(!is_upload_temp(OsStr::new("a.txt.guestd-upload-0123456789abcdef")));
        assert!(!is_upload_temp(OsStr::new(".a.txt.guestd-upload-0123")));
        assert!(!is_upload_temp(OsStr::new(".a.txt")));
    }

    #[tokio::test]
    async fn commit_replaces_content_and_keeps_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sh");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o751)).unwrap();
        let mut w = AtomicWrite::create(&path, me(), Metadata::default()).await.unwrap();
        w.write(b"new ").await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"old", "the target is untouched until commit");
        w.write(b"content").await.unwrap();
        assert_eq!(w.written(), 11);
        w.commit().await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o7777, 0o751);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn odd_chunks_across_buffer_boundaries_arrive_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..(WRITE_BUFFER_BYTES * 5 / 2)).map(|i| (i % 253) as u8).collect();
        let mut w = AtomicWrite::create(&path, me(), Metadata::default()).await.unwrap();
        for chunk in data.chunks(100_003) {
            w.write(chunk).await.unwrap();
        }
        w.write(&[]).await.unwrap();
        assert_eq!(w.written(), data.len() as u64);
        w.commit().await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[tokio::test]
    async fn dropping_uncommitted_leaves_old_content_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        let mut w = AtomicWrite::create(&path, me(), Metadata::default()).await.unwrap();
        w.write(&[7u8; 100_000]).await.unwrap();
        assert_eq!(leftovers(dir.path()).len(), 1, "the temp file lives beside the target");
        drop(w);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn dropped_while_preparing_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut create = std::pin::pin!(AtomicWrite::create(&path, me(), Metadata::default()));
            // The first poll hands the setup to the blocking pool; the caller then goes away.
            let first = futures_util::poll!(create.as_mut());
            assert!(first.is_pending());
        });
        runtime.shutdown_timeout(std::time::Duration::from_secs(10)); // lets the setup finish
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn creates_parents_and_new_files_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/new.txt");
        let metadata = Metadata::new([("k", "v")]).unwrap();
        let mut w = AtomicWrite::create(&path, me(), metadata).await.unwrap();
        w.write(b"x").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"x");
        let read = metadata::read(&path);
        if !read.is_empty() {
            assert_eq!(read, BTreeMap::from([("k".to_owned(), "v".to_owned())]));
        }
        let new_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        // Read the umask from procfs: setting it to probe would race with parallel tests.
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let umask = status.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap().trim();
        let umask = u32::from_str_radix(umask, 8).unwrap();
        assert_eq!(new_mode, 0o666 & !umask);
    }

    #[tokio::test]
    async fn overwrite_drops_old_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let first = AtomicWrite::create(&path, me(), Metadata::new([("old", "1")]).unwrap()).await.unwrap();
        first.commit().await.unwrap();
        let second = AtomicWrite::create(&path, me(), Metadata::new([("new", "2")]).unwrap()).await.unwrap();
        second.commit().await.unwrap();
        let read = metadata::read(&path);
        if !read.is_empty() {
            assert_eq!(read, BTreeMap::from([("new".to_owned(), "2".to_owned())]));
        }
    }

    #[tokio::test]
    async fn refuses_directories_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let err = AtomicWrite::create(dir.path(), me(), Metadata::default()).await.unwrap_err();
        assert!(matches!(err, FsError::IsADirectory { .. }), "{err:?}");
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let err = AtomicWrite::create(&fifo, me(), Metadata::default()).await.unwrap_err();
        assert!(matches!(err, FsError::NotRegularFile { .. }), "{err:?}");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn writes_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.txt");
        fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("real.txt", &link).unwrap();
        let mut w = AtomicWrite::create(&link, me(), Metadata::default()).await.unwrap();
        assert_eq!(w.target(), real);
        w.write(b"new").await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(fs::read(&real).unwrap(), b"new");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");

        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("created-by-upload", &dangling).unwrap();
        let w = AtomicWrite::create(&dangling, me(), Metadata::default()).await.unwrap();
        w.commit().await.unwrap();
        assert!(dir.path().join("created-by-upload").is_file());
    }

    #[tokio::test]
    async fn long_names_still_get_a_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n".repeat(255));
        let w = AtomicWrite::create(&path, me(), Metadata::default()).await.unwrap();
        w.commit().await.unwrap();
        assert!(path.is_file());
    }

    #[tokio::test]
    async fn parent_file_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("file"), b"").unwrap();
        let err = AtomicWrite::create(&dir.path().join("file/x"), me(), Metadata::default()).await.unwrap_err();
        assert!(matches!(err, FsError::ParentNotDirectory { .. }), "{err:?}");
    }
}
