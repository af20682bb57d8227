//! The directory-watch domain against the real kernel: what a WatchDir stream or a polling
//! watcher reports for real filesystem changes (names, ops, order, entries), and how each way
//! of ending a watch is reported.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use guestd::watch::EventKind::{Chmod, Create, Remove, Rename, Write};
use guestd::watch::{EventKind, FsEvent, WatchConfig, WatchError, WatchManager, WatchOptions, WatchStream};
use tokio::time::timeout;

mod common;

/// Held (shared) while creating a manager; the test that lowers the kernel's inotify queue
/// holds it exclusively, so no other test's inotify instance is created with its tiny queue.
static KERNEL_LIMITS: RwLock<()> = RwLock::new(());

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn manager() -> WatchManager {
    manager_with(WatchConfig::default())
}

fn manager_with(config: WatchConfig) -> WatchManager {
    let _shared = KERNEL_LIMITS.read().unwrap_or_else(PoisonError::into_inner);
    WatchManager::with_config(config).unwrap()
}

fn recursive() -> WatchOptions {
    WatchOptions { recursive: true, ..WatchOptions::default() }
}

async fn next(stream: &mut WatchStream) -> FsEvent {
    timeout(WAIT, stream.next()).await.expect("no event within 5 s").expect("stream ended").expect("watch failed")
}

async fn next_n(stream: &mut WatchStream, n: usize) -> Vec<(EventKind, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let event = next(stream).await;
        out.push((event.kind, event.name));
    }
    out
}

async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(item) = timeout(QUIET, stream.next()).await {
        panic!("expected no event, got {item:?}");
    }
}

fn ev(kind: EventKind, name: &str) -> (EventKind, String) {
    (kind, name.to_owned())
}

#[tokio::test]
async fn reports_each_op_with_its_name_in_kernel_order() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), WatchOptions::default()).unwrap();

    fs::write(dir.path().join("a.txt"), b"hi").unwrap();
    fs::set_permissions(dir.path().join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(dir.path().join("a.txt"), dir.path().join("b.txt")).unwrap();
    fs::remove_file(dir.path().join("b.txt")).unwrap();

    assert_eq!(
        next_n(&mut s, 6).await,
        [
            ev(Create, "a.txt"),
            ev(Write, "a.txt"),
            ev(Chmod, "a.txt"),
            ev(Rename, "a.txt"),
            ev(Create, "b.txt"),
            ev(Remove, "b.txt")
        ]
    );
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn recursive_watch_reports_mkdir_p_and_its_file_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();

    // Repeated to give the race (directories appearing before their watch) many chances.
    for i in 0..25 {
        let a = format!("a{i}");
        fs::create_dir_all(dir.path().join(&a).join("b/c")).unwrap();
        fs::File::create(dir.path().join(&a).join("b/c/f")).unwrap();
        assert_eq!(
            next_n(&mut s, 4).await,
            [
                ev(Create, &a),
                ev(Create, &format!("{a}/b")),
                ev(Create, &format!("{a}/b/c")),
                ev(Create, &format!("{a}/b/c/f")),
            ],
            "iteration {i}"
        );
    }
    assert_quiet(&mut s).await;

    // The new directories are watched.
    fs::write(dir.path().join("a3/b/c/g"), b"x").unwrap();
    assert_eq!(next_n(&mut s, 2).await, [ev(Create, "a3/b/c/g"), ev(Write, "a3/b/c/g")]);
    assert_eq!(m.watched_directories(), 1 + 25 * 3);
}

#[tokio::test]
async fn mkdir_p_through_a_shell_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg("mkdir -p a/b/c && touch a/b/c/f")
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());

    let mut creates = Vec::new();
    while let Ok(Some(event)) = timeout(QUIET, s.next()).await {
        let event = event.unwrap();
        // touch may also set times (CHMOD) once the file's directory is watched.
        if event.kind == Create {
            creates.push(event.name);
        }
    }
    assert_eq!(creates, ["a", "a/b", "a/b/c", "a/b/c/f"]);
}

#[tokio::test]
async fn a_burst_of_nested_directories_and_files_is_reported_completely_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();

    let root = dir.path().to_path_buf();
    let expected = tokio::task::spawn_blocking(move || {
        let mut made = Vec::new();
        for a in 0..4 {
            for b in 0..4 {
                for c in 0..3 {
                    let rel = format!("d{a}/e{b}/f{c}");
                    fs::create_dir_all(root.join(&rel)).unwrap();
                    for f in 0..4 {
                        fs::File::create(root.join(format!("{rel}/file{f}"))).unwrap();
                        made.push(format!("{rel}/file{f}"));
                    }
                    made.push(rel);
                }
                made.push(format!("d{a}/e{b}"));
            }
            made.push(format!("d{a}"));
        }
        made.sort();
        made
    })
    .await
    .unwrap();

    let mut created = Vec::new();
    while let Ok(Some(event)) = timeout(QUIET, s.next()).await {
        let event = event.unwrap();
        assert_eq!(event.kind, Create, "{event:?}");
        created.push(event.name);
    }
    created.sort();
    assert_eq!(created, expected);
    assert_eq!(m.watched_directories(), 1 + 4 + 16 + 48);
}

#[tokio::test]
async fn directory_moved_in_reports_its_contents_and_is_watched() {
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(outside.path().join("x/y")).unwrap();
    fs::write(outside.path().join("x/w.txt"), b"w").unwrap();
    fs::write(outside.path().join("x/y/z.txt"), b"z").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();

    fs::rename(outside.path().join("x"), dir.path().join("x")).unwrap();
    assert_eq!(
        next_n(&mut s, 4).await,
        [ev(Create, "x"), ev(Create, "x/w.txt"), ev(Create, "x/y"), ev(Create, "x/y/z.txt")]
    );
    assert_quiet(&mut s).await;

    fs::File::create(dir.path().join("x/y/new")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Create, "x/y/new")]);
}

#[tokio::test]
async fn directory_renamed_inside_the_tree_keeps_being_watched_under_its_new_name() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("a/sub")).unwrap();
    fs::write(dir.path().join("a/f"), b"").unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();
    assert_eq!(m.watched_directories(), 3);

    fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
    // envd's fsnotify fork reports the contents of a directory renamed in the tree as created.
    assert_eq!(next_n(&mut s, 4).await, [ev(Rename, "a"), ev(Create, "b"), ev(Create, "b/f"), ev(Create, "b/sub")]);
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 3, "the watches moved with the directory");

    fs::File::create(dir.path().join("b/sub/g")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Create, "b/sub/g")]);
}

#[tokio::test]
async fn directory_moved_out_is_no_longer_watched() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("a/b")).unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();

    fs::rename(dir.path().join("a"), outside.path().join("a")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Rename, "a")]);
    fs::File::create(outside.path().join("a/b/f")).unwrap();
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 1);
}

#[tokio::test]
async fn subdirectory_changes_are_reported_once_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();

    fs::create_dir(dir.path().join("d")).unwrap();
    fs::set_permissions(dir.path().join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir(dir.path().join("d")).unwrap();
    // The directory's own IN_ATTRIB / IN_DELETE_SELF are not repeated as extra events.
    assert_eq!(next_n(&mut s, 3).await, [ev(Create, "d"), ev(Chmod, "d"), ev(Remove, "d")]);
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 1);
}

#[tokio::test]
async fn non_recursive_watch_ignores_subdirectory_contents() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), WatchOptions::default()).unwrap();

    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::File::create(dir.path().join("sub/f")).unwrap();
    fs::File::create(dir.path().join("g")).unwrap();
    assert_eq!(next_n(&mut s, 2).await, [ev(Create, "sub"), ev(Create, "g")]);
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 1);
}

#[tokio::test]
async fn symlinks_inside_a_recursive_tree_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), recursive()).unwrap();
    fs::File::create(outside.path().join("f")).unwrap();
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 1);
}

#[tokio::test]
async fn a_symlink_to_a_directory_can_be_watched() {
    let target = tempfile::tempdir().unwrap();
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("link");
    std::os::unix::fs::symlink(target.path(), &link).unwrap();
    let m = manager();
    let mut s = m.watch(&link, WatchOptions { include_entry: true, ..recursive() }).unwrap();
    fs::File::create(target.path().join("f")).unwrap();
    let event = next(&mut s).await;
    assert_eq!((event.kind, event.name.as_str()), (Create, "f"));
    assert_eq!(
        event.entry.unwrap().path,
        link.join("f").to_str().unwrap(),
        "entries are spelled under the watched path"
    );
}

#[tokio::test]
async fn include_entry_describes_created_written_and_chmoded_paths_that_still_exist() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), WatchOptions { include_entry: true, ..WatchOptions::default() }).unwrap();

    fs::write(dir.path().join("f"), b"hello").unwrap();
    let create = next(&mut s).await;
    assert_eq!((create.kind, create.name.as_str()), (Create, "f"));
    let entry = create.entry.expect("CREATE carries an entry");
    assert_eq!(entry.name, "f");
    assert_eq!(entry.path, dir.path().join("f").to_str().unwrap());
    let write = next(&mut s).await;
    assert_eq!(write.kind, Write);
    assert_eq!(write.entry.expect("WRITE carries an entry").size, 5);

    fs::set_permissions(dir.path().join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    let chmod = next(&mut s).await;
    assert_eq!(chmod.kind, Chmod);
    assert_eq!(chmod.entry.expect("CHMOD carries an entry").mode, 0o640);

    fs::rename(dir.path().join("f"), dir.path().join("g")).unwrap();
    fs::remove_file(dir.path().join("g")).unwrap();
    let rename = next(&mut s).await;
    assert_eq!((rename.kind, rename.entry), (Rename, None));
    let create = next(&mut s).await;
    assert_eq!((create.kind, create.name.as_str(), create.entry), (Create, "g", None), "gone by now: no entry");
    let remove = next(&mut s).await;
    assert_eq!((remove.kind, remove.entry), (Remove, None));

    // The watched directory itself.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = next(&mut s).await;
    assert_eq!((root.kind, root.name.as_str()), (Chmod, "."));
    assert_eq!(root.entry.expect("root entry").path, dir.path().to_str().unwrap());
}

#[tokio::test]
async fn next_is_cancel_safe() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let mut s = m.watch(dir.path(), WatchOptions { include_entry: true, ..WatchOptions::default() }).unwrap();
    for i in 0..50 {
        fs::File::create(dir.path().join(format!("f{i:02}"))).unwrap();
    }
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while names.len() < 50 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            event = s.next() => names.push(event.unwrap().unwrap().name),
            _ = tokio::time::sleep(Duration::from_micros(50)) => {}
        }
    }
    let expected: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
    assert_eq!(names, expected);
}

#[tokio::test]
async fn deleted_root_reports_remove_dot_and_stays_open() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("w");
    fs::create_dir(&root).unwrap();
    let m = manager();
    let mut s = m.watch(&root, recursive()).unwrap();
    fs::remove_dir(&root).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Remove, ".")]);
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 0);
}

#[tokio::test]
async fn moved_root_reports_rename_dot_and_goes_quiet() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("w");
    fs::create_dir(&root).unwrap();
    let m = manager();
    let mut s = m.watch(&root, WatchOptions::default()).unwrap();
    fs::rename(&root, parent.path().join("moved")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Rename, ".")]);
    fs::File::create(parent.path().join("moved/f")).unwrap();
    assert_quiet(&mut s).await;
    assert_eq!(m.watched_directories(), 0);
}

#[tokio::test]
async fn validation_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let missing = dir.path().join("missing");
    let err = m.watch(&missing, WatchOptions::default()).err().unwrap();
    assert!(matches!(&err, WatchError::NotFound { path } if path == &missing), "{err:?}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

    let file = dir.path().join("file");
    fs::write(&file, b"").unwrap();
    let err = m.watch(&file, recursive()).err().unwrap();
    assert!(matches!(&err, WatchError::NotADirectory { path } if path == &file), "{err:?}");
    // envd's message, without its Go formatting artefact (`%!w(<nil>)`, rpc.md §7.7).
    assert_eq!(err.to_string(), format!("path {} not a directory", file.display()));
    let err = m.create_watcher(&file, WatchOptions::default()).unwrap_err();
    assert!(matches!(err, WatchError::NotADirectory { .. }), "{err:?}");
    assert_eq!(m.watched_directories(), 0);
}

#[tokio::test]
async fn a_stalled_watcher_ends_alone_and_never_holds_back_another() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager_with(WatchConfig { stream_queue: 16, ..WatchConfig::default() });
    let mut stalled = m.watch(dir.path(), WatchOptions::default()).unwrap();
    let mut live = m.watch(dir.path(), WatchOptions::default()).unwrap();
    assert_eq!(m.watched_directories(), 1, "one kernel watch for both");

    // The live client takes each event as it comes; nobody reads the stalled one.
    for i in 0..100 {
        fs::File::create(dir.path().join(format!("f{i:03}"))).unwrap();
        assert_eq!(next_n(&mut live, 1).await, [ev(Create, &format!("f{i:03}"))]);
    }

    // The stalled one gets what fit in its queue, then an error naming the overflow, then the end.
    for i in 0..16 {
        assert_eq!(next_n(&mut stalled, 1).await, [ev(Create, &format!("f{i:03}"))]);
    }
    let err = timeout(WAIT, stalled.next()).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(err, WatchError::SubscriberOverflow { capacity: 16, .. }), "{err:?}");
    assert!(err.to_string().contains("fell behind"), "{err}");
    assert!(timeout(WAIT, stalled.next()).await.unwrap().is_none());

    fs::File::create(dir.path().join("after")).unwrap();
    assert_eq!(next_n(&mut live, 1).await, [ev(Create, "after")]);
    assert_eq!(m.watched_directories(), 1);
}

#[tokio::test]
async fn dropping_streams_releases_their_watches() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("a/b")).unwrap();
    let m = manager();
    let first = m.watch(dir.path(), recursive()).unwrap();
    let second = m.watch(&dir.path().join("a"), WatchOptions::default()).unwrap();
    assert_eq!(m.watched_directories(), 3);
    drop(first);
    assert_eq!(m.watched_directories(), 1);
    drop(second);
    assert_eq!(m.watched_directories(), 0);
}

#[tokio::test]
async fn polling_watcher_buffers_events_until_taken() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager();
    let id = m.create_watcher(dir.path(), WatchOptions { include_entry: true, ..recursive() }).unwrap();
    assert_eq!(id.len(), 21);
    assert!(id.starts_with('w') && id[1..].bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id}");
    assert!(m.take_events(&id).unwrap().is_empty());

    let mut events = Vec::new();
    let take_until = |events: &mut Vec<FsEvent>, n: usize| {
        let deadline = std::time::Instant::now() + WAIT;
        while events.len() < n && std::time::Instant::now() < deadline {
            events.extend(m.take_events(&id).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    fs::create_dir(dir.path().join("d")).unwrap();
    // Once CREATE d is out, d is watched (before, a file created and removed in d could be missed).
    take_until(&mut events, 1);
    fs::write(dir.path().join("d/f"), b"abc").unwrap();
    fs::remove_file(dir.path().join("d/f")).unwrap();
    take_until(&mut events, 4);
    let seen: Vec<_> = events.iter().map(|e| (e.kind, e.name.clone())).collect();
    assert_eq!(seen, [ev(Create, "d"), ev(Create, "d/f"), ev(Write, "d/f"), ev(Remove, "d/f")]);
    assert!(events[0].entry.is_some(), "the directory still exists");
    assert!(events[1].entry.is_none() && events[3].entry.is_none(), "gone when taken");
    tokio::time::sleep(QUIET).await;
    assert!(m.take_events(&id).unwrap().is_empty(), "taking empties the buffer");

    m.remove_watcher(&id).unwrap();
    assert_eq!(m.watched_directories(), 0);
    assert!(matches!(m.take_events(&id), Err(WatchError::WatcherNotFound { .. })));
    let err = m.remove_watcher(&id).unwrap_err();
    assert_eq!(err.to_string(), format!("watcher with id {id} not found"));
}

#[tokio::test]
async fn polling_watcher_overflow_is_returned_on_every_take() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager_with(WatchConfig { poll_buffer: 4, ..WatchConfig::default() });
    let id = m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
    for i in 0..10 {
        fs::File::create(dir.path().join(format!("f{i}"))).unwrap();
    }
    tokio::time::sleep(QUIET).await;
    for _ in 0..3 {
        let err = m.take_events(&id).unwrap_err();
        assert!(matches!(err, WatchError::SubscriberOverflow { capacity: 4, .. }), "{err:?}");
    }
    assert_eq!(m.watched_directories(), 0, "an ended watcher holds no watches");
    m.remove_watcher(&id).unwrap();
}

#[tokio::test]
async fn idle_polling_watchers_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager_with(WatchConfig { poll_idle_timeout: Duration::from_millis(400), ..WatchConfig::default() });
    let id = m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        m.take_events(&id).expect("taking keeps the watcher alive");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The reader's sweep already released the watch, before anyone asked.
    assert_eq!(m.watched_directories(), 0);
    assert!(matches!(m.take_events(&id), Err(WatchError::WatcherNotFound { .. })));
}

#[tokio::test]
async fn polling_watchers_are_limited_in_number() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager_with(WatchConfig { max_polling_watchers: 2, ..WatchConfig::default() });
    let first = m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
    m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
    let err = m.create_watcher(dir.path(), WatchOptions::default()).unwrap_err();
    assert!(matches!(err, WatchError::TooManyWatchers { limit: 2 }), "{err:?}");
    m.remove_watcher(&first).unwrap();
    m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
}

#[tokio::test]
async fn watch_limit_fails_creation_or_ends_the_watch_explicitly() {
    let m = manager_with(WatchConfig { max_watches: 2, ..WatchConfig::default() });

    let big = tempfile::tempdir().unwrap();
    for d in ["a", "b", "c"] {
        fs::create_dir(big.path().join(d)).unwrap();
    }
    let err = m.watch(big.path(), recursive()).err().unwrap();
    assert!(matches!(err, WatchError::WatchLimit { .. }), "{err:?}");
    assert!(err.to_string().contains("max_user_watches"), "{err}");
    assert_eq!(m.watched_directories(), 0, "a failed watch leaves nothing behind");

    let small = tempfile::tempdir().unwrap();
    let mut s = m.watch(small.path(), recursive()).unwrap();
    let id = m.create_watcher(small.path(), recursive()).unwrap();
    fs::create_dir(small.path().join("a")).unwrap();
    fs::create_dir(small.path().join("b")).unwrap();
    assert_eq!(next_n(&mut s, 2).await, [ev(Create, "a"), ev(Create, "b")]);
    let err = timeout(WAIT, s.next()).await.unwrap().unwrap().unwrap_err();
    assert!(matches!(&err, WatchError::WatchLimit { path, .. } if path == &small.path().join("b")), "{err:?}");
    assert!(timeout(WAIT, s.next()).await.unwrap().is_none());
    // The reader fails the stream and the polling watcher one after the other: the watcher may
    // still hand out its last events in between. Once failed, it stays failed.
    let failed = || matches!(m.take_events(&id), Err(WatchError::WatchLimit { .. }));
    assert!(common::eventually(WAIT, failed).await, "the polling watcher ends with the watch limit");
    assert!(failed(), "and stays ended");
}

/// Restores a sysctl when dropped (also when the test panics).
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        fs::write(self.path, &self.old).expect("restore sysctl");
    }
}

#[tokio::test]
async fn kernel_queue_overflow_is_reported_needs_root() {
    const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";
    let Ok(old) = fs::read_to_string(QUEUE) else {
        eprintln!("skipping kernel_queue_overflow_is_reported_needs_root: {QUEUE} is not readable");
        return;
    };
    if fs::write(QUEUE, &old).is_err() {
        eprintln!("skipping kernel_queue_overflow_is_reported_needs_root: {QUEUE} is not writable (needs root)");
        return;
    }
    let m = {
        // The queue size is fixed when an inotify instance is created: lower it only for that.
        let _exclusive = KERNEL_LIMITS.write().unwrap_or_else(PoisonError::into_inner);
        let _restore = Sysctl { path: QUEUE, old };
        fs::write(QUEUE, "1").unwrap();
        WatchManager::new().unwrap()
    };

    let dir = tempfile::tempdir().unwrap();
    let mut s = m.watch(dir.path(), WatchOptions::default()).unwrap();
    let id = m.create_watcher(dir.path(), WatchOptions::default()).unwrap();
    for i in 0..5000 {
        fs::File::create(dir.path().join(format!("f{i}"))).unwrap();
    }
    let err = loop {
        match timeout(WAIT, s.next()).await.expect("the stream neither ended nor failed") {
            Some(Ok(_)) => continue,
            Some(Err(err)) => break err,
            None => panic!("stream ended without an error"),
        }
    };
    assert!(matches!(&err, WatchError::QueueOverflow { path } if path == dir.path()), "{err:?}");
    assert!(err.to_string().contains("max_queued_events"), "{err}");
    for _ in 0..2 {
        assert!(matches!(m.take_events(&id), Err(WatchError::QueueOverflow { .. })));
    }
    assert_eq!(m.watched_directories(), 0);
}

/// guestd's atomic uploads write a temporary beside the target and rename it over the target.
/// Watchers see what writing the file in place shows (CREATE, CHMOD, WRITE of the target), never
/// the temporary.
#[tokio::test]
async fn an_atomic_upload_looks_like_writing_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let manager = guestd::watch::WatchManager::new().unwrap();
    let opts = guestd::watch::WatchOptions { recursive: true, ..Default::default() };
    let mut stream = manager.watch(dir.path(), opts).unwrap();
    let temp = dir.path().join(".report.txt.guestd-upload-0123456789abcdef");
    std::fs::write(&temp, b"content").unwrap();
    std::fs::rename(&temp, dir.path().join("report.txt")).unwrap();
    std::fs::write(dir.path().join("sentinel"), b"").unwrap();
    let mut seen = Vec::new();
    while !seen.iter().any(|(_, name): &(guestd::watch::EventKind, String)| name == "sentinel") {
        let event =
            tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await.unwrap().unwrap().unwrap();
        seen.push((event.kind, event.name));
    }
    use guestd::watch::EventKind::*;
    let report: Vec<_> = seen.iter().filter(|(_, n)| n == "report.txt").map(|(k, _)| *k).collect();
    assert_eq!(report, [Create, Chmod, Write], "{seen:?}");
    assert!(!seen.iter().any(|(_, n)| n.contains("guestd-upload")), "{seen:?}");
}

#[tokio::test]
async fn a_watched_tree_whose_ancestor_is_renamed_never_loses_events_silently() {
    let base = tempfile::tempdir().unwrap();
    fs::create_dir_all(base.path().join("old/root/sub")).unwrap();
    let m = manager();
    let mut s = m.watch(&base.path().join("old/root"), recursive()).unwrap();

    // The watches follow the directories (inodes); only the paths guestd knows them by change.
    fs::rename(base.path().join("old"), base.path().join("new")).unwrap();
    fs::File::create(base.path().join("new/root/sub/f")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Create, "sub/f")]);

    // A directory created now cannot be found by the path guestd knows (inotify does not tell
    // where the tree went): the watch ends saying so, after reporting the directory.
    fs::create_dir(base.path().join("new/root/made")).unwrap();
    assert_eq!(next_n(&mut s, 1).await, [ev(Create, "made")]);
    tokio::time::sleep(QUIET).await;
    fs::File::create(base.path().join("new/root/made/g")).unwrap();
    match timeout(WAIT, s.next()).await {
        Ok(Some(Err(err))) => {
            let message = err.to_string();
            assert!(message.contains("made") && message.contains("moved or removed"), "{message}");
        }
        other => panic!("made/g was lost silently: {other:?}"),
    }
}
