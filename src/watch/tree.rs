//! The kernel side of every watch: one inotify instance, one watch descriptor (wd) per watched
//! directory, arranged as a tree that mirrors the directories, and the subscribers (streams and
//! polling watchers) rooted in it.
//!
//! Why a tree of our own rather than a path per wd: a directory renamed inside a watched tree
//! keeps its wd (and its subdirectories theirs); re-linking one node makes every path below it
//! right again. A subscriber's view is derived, never stored: it sees a directory's events iff
//! the directory is its root, or it is recursive and its root is an ancestor. The same directory
//! watched by several subscribers is one wd (inotify returns the existing wd for an inode), and
//! a wd is removed as soon as no subscriber sees it any more.
//!
//! Recursive watches and the `mkdir -p` race: a directory created in a recursive tree is
//! watched, then read; everything already inside is reported as synthetic CREATEs (files too,
//! like envd's fsnotify fork) and its subdirectories are watched the same way. A name found by
//! that read may also arrive later as a real IN_CREATE (created after the watch was added, before
//! the read): such names are remembered per directory and the real event is swallowed for the
//! subscribers that already got the synthetic one, so every CREATE is reported once.
//!
//! Everything here runs under the manager's tree mutex, mostly on the reader thread.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, Inotify, InotifyEvent, WatchDescriptor as Wd};

use super::mailbox::{Mailbox, Pushed, RawEvent};
use super::{EventKind, WatchError};

/// Identifies one subscriber (stream or polling watcher) inside the tree.
pub(super) type SubId = u64;

/// What every directory watch asks the kernel for: envd's (fsnotify's) mask. No IN_ACCESS,
/// IN_OPEN or IN_CLOSE_*: reads and opens are noise nobody asked for. IN_ONLYDIR makes a path
/// that turned into a file fail instead of watching the file.
const MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_MODIFY)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ATTRIB)
    .union(AddWatchFlags::IN_ONLYDIR);

/// envd's fixed order for the ops of one inotify event, and which inotify bits make each op.
const KINDS: [(AddWatchFlags, EventKind); 5] = [
    (AddWatchFlags::IN_CREATE.union(AddWatchFlags::IN_MOVED_TO), EventKind::Create),
    (AddWatchFlags::IN_MOVED_FROM.union(AddWatchFlags::IN_MOVE_SELF), EventKind::Rename),
    (AddWatchFlags::IN_ATTRIB, EventKind::Chmod),
    (AddWatchFlags::IN_MODIFY, EventKind::Write),
    (AddWatchFlags::IN_DELETE.union(AddWatchFlags::IN_DELETE_SELF), EventKind::Remove),
];

/// How long a name reported by a synthetic CREATE keeps swallowing a real CREATE of the same
/// name. The real event, if any, was queued by the kernel within microseconds of the entry
/// appearing (before our read of the directory finished); records are only dropped once the
/// kernel queue has been read empty *and* they are this old, so a record outlives the event it
/// guards. Longer would only risk swallowing a genuine delete-and-recreate, which also clears
/// the record (IN_DELETE / IN_MOVED_FROM), so the value is not delicate.
const SYNTHESIZED_GRACE: Duration = Duration::from_millis(100);

/// Hard bound on a synthetic-CREATE record's life even if the kernel queue never runs empty
/// (constant load): by then the reader has handled far more than a full kernel queue
/// (`max_queued_events`) of later events, so the real event it guards is long past.
const SYNTHESIZED_MAX_AGE: Duration = Duration::from_secs(10);

/// The ops of one inotify event, in envd's order.
pub(super) fn kinds(mask: AddWatchFlags) -> impl Iterator<Item = EventKind> {
    KINDS.into_iter().filter(move |(bits, _)| mask.intersects(*bits)).map(|(_, kind)| kind)
}

/// One watched directory.
struct Node {
    /// The watched directory containing this one, if it is watched.
    parent: Option<Wd>,
    /// Name inside `parent` (meaningful when `parent` is set).
    name: OsString,
    /// Absolute path (meaningful when `parent` is not set): the path the directory was first
    /// watched under. A rename of an unwatched ancestor makes it stale, which
    /// [`Tree::add_child`] detects when a new directory cannot be found.
    top: PathBuf,
    children: HashMap<OsString, Wd>,
    /// Subscribers whose root this directory is.
    roots: Vec<SubId>,
}

struct Sub {
    /// `None` once the root was deleted or moved away: the subscriber stays, without events.
    root: Option<Wd>,
    recursive: bool,
    /// The root as the client named it, for error messages.
    path: PathBuf,
    mailbox: Arc<Mailbox>,
}

struct Synthesized {
    at: Instant,
    subs: Vec<SubId>,
}

/// A directory being walked for synthetic CREATEs.
struct Frame {
    dir: Wd,
    entries: std::vec::IntoIter<(OsString, bool)>,
    /// The walk's target subscribers that see `dir`, with `dir`'s path relative to their root.
    audience: Vec<(SubId, PathBuf)>,
}

pub(super) struct Tree {
    nodes: HashMap<Wd, Node>,
    subs: HashMap<SubId, Sub>,
    next_sub: SubId,
    /// (directory, name) reported by a synthetic CREATE, and to whom. Bounded by the entries of
    /// the directories walked within [`SYNTHESIZED_MAX_AGE`] (usually within
    /// [`SYNTHESIZED_GRACE`] plus one kernel queue drain).
    synthesized: HashMap<(Wd, OsString), Synthesized>,
    /// Subscribers whose mailbox overflowed while handling the current event; removed by
    /// [`Tree::settle`] once the event is done.
    overflowed: Vec<SubId>,
    /// guestd's own cap on `nodes` (see `WatchConfig::max_watches`).
    max_watches: usize,
    /// Cookies of renames whose source was one of guestd's upload temporaries: their
    /// IN_MOVED_TO is the upload landing. At most [`MAX_UPLOAD_COOKIES`]; both halves of a
    /// rename are queued together, so an entry lives for one or two reads.
    upload_cookies: Vec<u32>,
}

/// Bound of [`Tree::upload_cookies`]: far more uploads than can land between two reads.
const MAX_UPLOAD_COOKIES: usize = 256;

impl Tree {
    pub fn new(max_watches: usize) -> Self {
        Tree {
            nodes: HashMap::new(),
            subs: HashMap::new(),
            next_sub: 0,
            synthesized: HashMap::new(),
            overflowed: Vec::new(),
            max_watches,
            upload_cookies: Vec::new(),
        }
    }

    /// How many directories are watched (kernel watches held).
    pub fn watch_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_subscribed(&self, sub: SubId) -> bool {
        self.subs.contains_key(&sub)
    }

    /// Registers a subscriber rooted at `root` (already validated to be a directory). A
    /// recursive subscriber's subdirectories are added afterwards with [`Tree::add_child`], one
    /// directory per lock, so a large initial walk never stalls the reader for long.
    pub fn subscribe(
        &mut self,
        ino: &Inotify,
        root: &Path,
        recursive: bool,
        mailbox: Arc<Mailbox>,
    ) -> Result<(SubId, Wd), WatchError> {
        // The root follows symlinks (envd validates with a following stat); subdirectories don't.
        let wd = self.add_watch(ino, root, AddWatchFlags::empty()).map_err(|errno| match errno {
            Errno::ENOSPC => WatchError::WatchLimit { path: root.to_path_buf(), source: errno },
            Errno::ENOENT => WatchError::NotFound { path: root.to_path_buf() },
            Errno::ENOTDIR => WatchError::NotADirectory { path: root.to_path_buf() },
            _ => WatchError::io("inotify_add_watch", root, errno),
        })?;
        let id = self.next_sub;
        self.next_sub += 1;
        self.nodes.entry(wd).or_insert_with(|| Node::top(root.to_path_buf())).roots.push(id);
        self.subs.insert(id, Sub { root: Some(wd), recursive, path: root.to_path_buf(), mailbox });
        Ok((id, wd))
    }

    /// Removes a subscriber and every watch only it needed. Unknown ids are ignored (a failed
    /// subscriber was already removed).
    pub fn unsubscribe(&mut self, ino: &Inotify, sub: SubId) {
        if let Some(removed) = self.subs.remove(&sub)
            && let Some(root) = removed.root
        {
            self.release_root(ino, root, sub);
        }
    }

    /// Ends a subscriber with a terminal error and removes it.
    pub fn fail(&mut self, ino: &Inotify, sub: SubId, error: WatchError) {
        if let Some(s) = self.subs.get(&sub) {
            tracing::warn!(path = %s.path.display(), %error, "watcher ended");
            s.mailbox.fail(error);
        }
        self.unsubscribe(ino, sub);
    }

    /// The kernel queue overflowed: events of unknown directories were lost, so every
    /// subscriber that still has a root ends with [`WatchError::QueueOverflow`].
    fn overflow(&mut self, ino: &Inotify) {
        let affected: Vec<(SubId, PathBuf)> =
            self.subs.iter().filter(|(_, s)| s.root.is_some()).map(|(id, s)| (*id, s.path.clone())).collect();
        for (sub, path) in affected {
            self.fail(ino, sub, WatchError::QueueOverflow { path });
        }
    }

    /// Current absolute path of a watched directory.
    pub fn path_of(&self, wd: Wd) -> Option<PathBuf> {
        let (_, top, names) = self.climb(wd)?;
        let mut path = top.top.clone();
        path.extend(names.iter().rev());
        Some(path)
    }

    /// The top directory above `wd` (or `wd` itself, when it is a top), its node, and the names
    /// on the way up, innermost first.
    fn climb(&self, wd: Wd) -> Option<(Wd, &Node, Vec<&OsStr>)> {
        let mut names = Vec::new();
        let mut cur = wd;
        for _ in 0..=self.nodes.len() {
            let node = self.nodes.get(&cur)?;
            match node.parent {
                Some(parent) => {
                    names.push(node.name.as_os_str());
                    cur = parent;
                }
                None => return Some((cur, node, names)),
            }
        }
        None
    }

    /// Watches the subdirectory `name` of the watched directory `parent` and links it into the
    /// tree. `Ok(None)`: nothing to watch (vanished, not a directory, a symlink, unwatchable, or
    /// the same directory as an ancestor through a bind mount). `Err`: the watch limit, with the
    /// directory that could not be watched, or a tree whose paths went stale (below).
    ///
    /// Paths are built from the path the tree's top directory was watched under. inotify
    /// reports nothing when a directory *above* it is renamed, so that path can go stale; a new
    /// subdirectory then cannot be found by path and would be skipped silently, with everything
    /// created in it. When a directory turns out missing, the top's path is checked again
    /// (re-adding a watch on a watched inode returns its existing descriptor); if it no longer
    /// leads to the top, [`WatchError::Moved`] ends the watchers concerned.
    ///
    /// A directory inotify refuses for another reason (permission: `/proc/1/fdinfo` even for
    /// root) is skipped and noted in `missed`, which the caller logs once per walk.
    pub fn add_child(
        &mut self,
        ino: &Inotify,
        parent: Wd,
        name: &OsStr,
        missed: &mut Unwatchable,
    ) -> Result<Option<Wd>, WatchError> {
        let Some(path) = self.path_of(parent).map(|p| p.join(name)) else {
            return Ok(None);
        };
        let wd = match self.add_watch(ino, &path, AddWatchFlags::IN_DONT_FOLLOW) {
            Ok(wd) => wd,
            Err(Errno::ENOSPC) => return Err(WatchError::WatchLimit { path, source: Errno::ENOSPC }),
            Err(Errno::ENOENT) if !self.top_path_holds(ino, parent) => return Err(WatchError::Moved { path }),
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
            Err(errno) => {
                missed.note(path, errno);
                return Ok(None);
            }
        };
        let known = self.nodes.contains_key(&wd);
        if known {
            if wd == parent || self.is_ancestor(wd, parent) {
                return Ok(None);
            }
            self.relink(wd, parent, name);
        } else {
            self.nodes.insert(wd, Node::child(parent, name));
            self.set_child(parent, name, wd);
        }
        Ok(Some(wd))
    }

    /// Whether the path of `wd`'s top directory still names that directory.
    fn top_path_holds(&self, ino: &Inotify, wd: Wd) -> bool {
        let Some((top, node, _)) = self.climb(wd) else { return false };
        // The same mask as every watch: on the watched inode this changes nothing.
        match ino.add_watch(&node.top, MASK) {
            Ok(found) if found == top => true,
            Ok(found) => {
                if !self.nodes.contains_key(&found) {
                    let _ = ino.rm_watch(found);
                }
                false
            }
            Err(_) => false,
        }
    }

    /// Handles one read of the inotify fd, in kernel order.
    pub fn handle_batch(&mut self, ino: &Inotify, events: &[InotifyEvent]) {
        // Directories moved away by an IN_MOVED_FROM whose IN_MOVED_TO comes later in this
        // batch: the node is re-linked there instead of being dropped and re-created.
        let mut moves: HashMap<u32, Wd> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                self.overflow(ino);
            } else if self.nodes.contains_key(&event.wd) {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.forget(ino, event.wd);
                } else {
                    match &event.name {
                        Some(name) => self.handle_named(ino, event, name, &events[i + 1..], &mut moves),
                        None => self.handle_self(ino, event.wd, event.mask),
                    }
                }
            }
            self.settle(ino);
        }
        // An IN_MOVED_TO that was skipped (its directory stopped being watched meanwhile).
        for (_, dir) in moves {
            self.unlink(dir);
            self.prune(ino, dir);
        }
        self.synthesized.retain(|_, s| s.at.elapsed() < SYNTHESIZED_MAX_AGE);
    }

    /// Forgets synthetic-CREATE records old enough that their real event, if any, was handled.
    /// Call only after the kernel queue was read empty.
    pub fn expire_synthesized(&mut self, now: Instant) {
        self.synthesized.retain(|_, s| now.duration_since(s.at) < SYNTHESIZED_GRACE);
    }

    /// An event about the watched directory itself: only subscribers rooted there get it, as
    /// name "."; for everybody else the parent directory reports the same change by name.
    fn handle_self(&mut self, ino: &Inotify, wd: Wd, mask: AddWatchFlags) {
        let roots = self.nodes.get(&wd).map(|n| n.roots.clone()).unwrap_or_default();
        for &sub in &roots {
            for kind in kinds(mask) {
                self.deliver(sub, PathBuf::new(), kind);
            }
        }
        if mask.contains(AddWatchFlags::IN_MOVE_SELF) {
            // envd: the root moved away, the watch disappears, the stream stays open.
            for sub in roots {
                if let Some(root) = self.subs.get_mut(&sub).and_then(|s| s.root.take()) {
                    self.release_root(ino, root, sub);
                }
            }
        }
    }

    /// An event about the entry `name` of the watched directory `event.wd`: hide upload
    /// temporaries, deliver it to the subscribers that have not seen it yet, then keep the tree
    /// of watched directories in step when the entry is a directory.
    fn handle_named(
        &mut self,
        ino: &Inotify,
        event: &InotifyEvent,
        name: &OsStr,
        rest: &[InotifyEvent],
        moves: &mut HashMap<u32, Wd>,
    ) {
        if self.upload_event(event, name) {
            return;
        }
        let audience = self.deliver_named(event, name);
        if event.mask.contains(AddWatchFlags::IN_ISDIR) {
            self.track_dir(ino, event, name, rest, moves, &audience);
        }
    }

    /// An upload's temporary file is an implementation detail: its events are hidden, and its
    /// landing (renamed over the target) is reported as writing the file in place would be.
    /// Whether `event` was one of those.
    fn upload_event(&mut self, event: &InotifyEvent, name: &OsStr) -> bool {
        let mask = event.mask;
        if !mask.contains(AddWatchFlags::IN_ISDIR) && crate::fs::is_upload_temp(name) {
            if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                if self.upload_cookies.len() >= MAX_UPLOAD_COOKIES {
                    self.upload_cookies.remove(0);
                }
                self.upload_cookies.push(event.cookie);
            }
            return true;
        }
        if mask.contains(AddWatchFlags::IN_MOVED_TO)
            && let Some(i) = self.upload_cookies.iter().position(|c| *c == event.cookie)
        {
            self.upload_cookies.swap_remove(i);
            for (sub, rel) in self.audience(event.wd) {
                for kind in [EventKind::Create, EventKind::Chmod, EventKind::Write] {
                    self.deliver(sub, rel.join(name), kind);
                }
            }
            return true;
        }
        false
    }

    /// Delivers the event to every subscriber of its directory, except those a walk already
    /// told of this entry's creation (the `synthesized` map); returns who got it.
    fn deliver_named(&mut self, event: &InotifyEvent, name: &OsStr) -> Vec<(SubId, PathBuf)> {
        let (wd, mask) = (event.wd, event.mask);
        let key = (wd, name.to_os_string());
        let already = if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            self.synthesized.remove(&key).map(|s| s.subs).unwrap_or_default()
        } else {
            if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM) {
                self.synthesized.remove(&key);
            }
            Vec::new()
        };
        let audience: Vec<(SubId, PathBuf)> =
            self.audience(wd).into_iter().filter(|(sub, _)| !already.contains(sub)).collect();
        for (sub, rel) in &audience {
            let rel = rel.join(name);
            for kind in kinds(mask) {
                self.deliver(*sub, rel.clone(), kind);
            }
        }
        audience
    }

    /// Keeps the watched tree in step with a directory entry that was deleted, moved or created:
    /// unwatch what left, re-link what moved within the tree, and watch (and walk, for the
    /// recursive subscribers in `audience`) what arrived.
    fn track_dir(
        &mut self,
        ino: &Inotify,
        event: &InotifyEvent,
        name: &OsStr,
        rest: &[InotifyEvent],
        moves: &mut HashMap<u32, Wd>,
        audience: &[(SubId, PathBuf)],
    ) {
        let (wd, mask) = (event.wd, event.mask);
        if mask.contains(AddWatchFlags::IN_DELETE)
            && let Some(child) = self.child(wd, name)
        {
            self.unlink(child);
            self.prune(ino, child);
        }
        if mask.contains(AddWatchFlags::IN_MOVED_FROM)
            && let Some(child) = self.child(wd, name)
        {
            let paired = rest.iter().any(|e| e.cookie == event.cookie && e.mask.contains(AddWatchFlags::IN_MOVED_TO));
            if paired {
                moves.insert(event.cookie, child);
            } else {
                // Moved out of every watched directory.
                self.unlink(child);
                self.prune(ino, child);
            }
        }
        if !mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            return;
        }
        let moved = match mask.contains(AddWatchFlags::IN_MOVED_TO) {
            true => moves.remove(&event.cookie),
            false => None,
        };
        if let Some(dir) = moved {
            if dir != wd && !self.is_ancestor(dir, wd) {
                self.relink(dir, wd, name);
            } else {
                self.unlink(dir);
            }
        }
        let targets: Vec<SubId> = audience
            .iter()
            .map(|(sub, _)| *sub)
            .filter(|sub| self.subs.get(sub).is_some_and(|s| s.recursive))
            .collect();
        if !targets.is_empty() {
            let mut missed = Unwatchable::default();
            match self.add_child(ino, wd, name, &mut missed) {
                Ok(Some(dir)) => self.walk_new(ino, dir, &targets, &mut missed),
                Ok(None) => {}
                Err(err) => self.fail_all(ino, &targets, err),
            }
            missed.report();
        }
        if let Some(dir) = moved {
            self.prune(ino, dir);
        }
    }

    /// Reports everything inside the newly watched directory `start` to `targets` as CREATE (a
    /// pre-order walk in name order, like Go's WalkDir), watching every subdirectory on the way.
    fn walk_new(&mut self, ino: &Inotify, start: Wd, targets: &[SubId], missed: &mut Unwatchable) {
        let mut stack: Vec<Frame> = self.frame(start, targets).into_iter().collect();
        while let Some(frame) = stack.last_mut() {
            let Some((name, is_dir)) = frame.entries.next() else {
                stack.pop();
                continue;
            };
            let dir = frame.dir;
            for (sub, rel) in &frame.audience {
                self.deliver(*sub, rel.join(&name), EventKind::Create);
            }
            if !frame.audience.is_empty() {
                let subs = frame.audience.iter().map(|(sub, _)| *sub).collect();
                self.synthesized.insert((dir, name.clone()), Synthesized { at: Instant::now(), subs });
            }
            if targets.iter().all(|sub| self.overflowed.contains(sub)) {
                return;
            }
            if is_dir {
                match self.add_child(ino, dir, &name, missed) {
                    Ok(Some(child)) => stack.extend(self.frame(child, targets)),
                    Ok(None) => {}
                    Err(err) => {
                        self.fail_all(ino, targets, err);
                        return;
                    }
                }
            }
        }
    }

    fn frame(&self, dir: Wd, targets: &[SubId]) -> Option<Frame> {
        let entries = read_dir_sorted(&self.path_of(dir)?).ok()?;
        let audience = self.audience(dir).into_iter().filter(|(sub, _)| targets.contains(sub)).collect();
        Some(Frame { dir, entries: entries.into_iter(), audience })
    }

    fn fail_all(&mut self, ino: &Inotify, targets: &[SubId], err: WatchError) {
        for &sub in targets {
            self.fail(ino, sub, err.clone());
        }
    }

    /// Subscribers that see events of directory `wd`, each with `wd`'s path relative to its root.
    fn audience(&self, wd: Wd) -> Vec<(SubId, PathBuf)> {
        let mut out = Vec::new();
        let mut names: Vec<&OsStr> = Vec::new();
        let mut cur = wd;
        for _ in 0..=self.nodes.len() {
            let Some(node) = self.nodes.get(&cur) else { break };
            for sub in &node.roots {
                if self.subs.get(sub).is_some_and(|s| names.is_empty() || s.recursive) {
                    out.push((*sub, names.iter().rev().collect()));
                }
            }
            match node.parent {
                Some(parent) => {
                    names.push(&node.name);
                    cur = parent;
                }
                None => break,
            }
        }
        out
    }

    fn deliver(&mut self, sub: SubId, rel: PathBuf, kind: EventKind) {
        if let Some(s) = self.subs.get(&sub)
            && s.mailbox.push(RawEvent { rel, kind }) == Pushed::Overflowed
        {
            self.overflowed.push(sub);
        }
    }

    /// Removes the subscribers whose mailbox overflowed (their error is already queued).
    fn settle(&mut self, ino: &Inotify) {
        for sub in mem::take(&mut self.overflowed) {
            if let Some(s) = self.subs.get(&sub) {
                tracing::warn!(path = %s.path.display(), "watcher fell behind; ended with an overflow error");
            }
            self.unsubscribe(ino, sub);
        }
    }

    fn add_watch(&mut self, ino: &Inotify, path: &Path, extra: AddWatchFlags) -> Result<Wd, Errno> {
        let wd = ino.add_watch(path, MASK | extra)?;
        if !self.nodes.contains_key(&wd) && self.nodes.len() >= self.max_watches {
            // Behave exactly like the kernel's limit.
            let _ = ino.rm_watch(wd);
            return Err(Errno::ENOSPC);
        }
        Ok(wd)
    }

    fn child(&self, parent: Wd, name: &OsStr) -> Option<Wd> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    /// Whether `ancestor` is a proper ancestor of `wd`.
    fn is_ancestor(&self, ancestor: Wd, wd: Wd) -> bool {
        let mut cur = wd;
        for _ in 0..=self.nodes.len() {
            match self.nodes.get(&cur).and_then(|n| n.parent) {
                Some(parent) if parent == ancestor => return true,
                Some(parent) => cur = parent,
                None => return false,
            }
        }
        false
    }

    fn set_child(&mut self, parent: Wd, name: &OsStr, wd: Wd) {
        let Some(p) = self.nodes.get_mut(&parent) else { return };
        let previous = p.children.insert(name.to_os_string(), wd);
        // A stale occupant (its removal not yet seen) no longer lives here.
        if let Some(stale) = previous.filter(|&prev| prev != wd) {
            let path = self.path_of(stale);
            if let Some(node) = self.nodes.get_mut(&stale) {
                node.parent = None;
                node.top = path.unwrap_or_default();
            }
        }
    }

    /// Detaches `wd` from its parent; it becomes a top node at its current path.
    fn unlink(&mut self, wd: Wd) {
        let path = self.path_of(wd);
        let Some(node) = self.nodes.get_mut(&wd) else { return };
        let Some(parent) = node.parent.take() else { return };
        let name = mem::take(&mut node.name);
        node.top = path.unwrap_or_default();
        if let Some(p) = self.nodes.get_mut(&parent)
            && p.children.get(&name) == Some(&wd)
        {
            p.children.remove(&name);
        }
    }

    fn relink(&mut self, wd: Wd, parent: Wd, name: &OsStr) {
        self.unlink(wd);
        let Some(node) = self.nodes.get_mut(&wd) else { return };
        node.parent = Some(parent);
        node.name = name.to_os_string();
        self.set_child(parent, name, wd);
    }

    fn release_root(&mut self, ino: &Inotify, root: Wd, sub: SubId) {
        if let Some(node) = self.nodes.get_mut(&root) {
            node.roots.retain(|&s| s != sub);
        }
        self.prune(ino, root);
    }

    /// The kernel dropped `wd` (IN_IGNORED: deleted, or its filesystem unmounted).
    fn forget(&mut self, ino: &Inotify, wd: Wd) {
        let base = self.path_of(wd).unwrap_or_default();
        self.unlink(wd);
        let Some(node) = self.nodes.remove(&wd) else { return };
        for sub in &node.roots {
            if let Some(s) = self.subs.get_mut(sub) {
                s.root = None;
            }
        }
        for (name, child) in &node.children {
            if let Some(c) = self.nodes.get_mut(child) {
                c.parent = None;
                c.top = base.join(name);
                self.prune(ino, *child);
            }
        }
        self.synthesized.retain(|(dir, _), _| *dir != wd);
    }

    /// Removes the watches in `start`'s subtree that no subscriber sees any more.
    fn prune(&mut self, ino: &Inotify, start: Wd) {
        let mut doomed = HashSet::new();
        let mut seen = HashSet::new();
        let mut stack = vec![start];
        while let Some(wd) = stack.pop() {
            let Some(node) = self.nodes.get(&wd) else { continue };
            if !seen.insert(wd) {
                continue;
            }
            stack.extend(node.children.values().copied());
            if self.audience(wd).is_empty() {
                doomed.insert(wd);
            }
        }
        if doomed.is_empty() {
            return;
        }
        // Survivors right below a removed directory (roots of other subscribers) become top
        // nodes; their paths must be computed while the chain above them still exists.
        let mut new_tops = Vec::new();
        for wd in &doomed {
            for child in self.nodes[wd].children.values().filter(|c| !doomed.contains(c)) {
                new_tops.push((*child, self.path_of(*child).unwrap_or_default()));
            }
        }
        for wd in &doomed {
            if let Some(node) = self.nodes.remove(wd)
                && let Some(parent) = node.parent.filter(|p| !doomed.contains(p))
                && let Some(p) = self.nodes.get_mut(&parent)
                && p.children.get(&node.name) == Some(wd)
            {
                p.children.remove(&node.name);
            }
            // EINVAL when the kernel already dropped it (directory deleted): nothing to undo.
            let _ = ino.rm_watch(*wd);
        }
        for (wd, path) in new_tops {
            if let Some(node) = self.nodes.get_mut(&wd) {
                node.parent = None;
                node.top = path;
            }
        }
        self.synthesized.retain(|(dir, _), _| !doomed.contains(dir));
    }
}

impl Node {
    fn top(path: PathBuf) -> Self {
        Node { parent: None, name: OsString::new(), top: path, children: HashMap::new(), roots: Vec::new() }
    }

    fn child(parent: Wd, name: &OsStr) -> Self {
        Node {
            parent: Some(parent),
            name: name.to_os_string(),
            top: PathBuf::new(),
            children: HashMap::new(),
            roots: Vec::new(),
        }
    }
}

/// Entries of a directory with "is a directory" (symlinks not followed), sorted by name.
/// Entries that fail to read are skipped.
fn read_dir_sorted(dir: &Path) -> io::Result<Vec<(OsString, bool)>> {
    let mut entries: Vec<(OsString, bool)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| (e.file_name(), e.file_type().is_ok_and(|t| t.is_dir())))
        // An upload in flight lands as the target; its temporary is never reported.
        .filter(|(name, is_dir)| *is_dir || !crate::fs::is_upload_temp(name))
        .collect();
    entries.sort();
    Ok(entries)
}

/// Names of the subdirectories of `dir` (symlinks not followed); empty if it can't be read
/// (envd skips unreadable directories too).
pub(super) fn read_subdirs(dir: &Path) -> Vec<OsString> {
    read_dir_sorted(dir).unwrap_or_default().into_iter().filter(|(_, is_dir)| *is_dir).map(|(name, _)| name).collect()
}

/// Directories a walk could not watch. A recursive watch of `/` meets dozens in `/proc`
/// alone; they are logged once per walk, with the first of them, not once each.
#[derive(Debug, Default)]
pub struct Unwatchable {
    count: usize,
    first: Option<(PathBuf, Errno)>,
}

impl Unwatchable {
    fn note(&mut self, path: PathBuf, errno: Errno) {
        self.count += 1;
        self.first.get_or_insert((path, errno));
    }

    /// Logs what was missed, if anything.
    pub fn report(self) {
        if let Some((first, errno)) = self.first {
            tracing::warn!(
                count = self.count,
                first = %first.display(),
                %errno,
                "cannot watch some directories; their changes will be missed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use nix::sys::inotify::InitFlags;

    use super::*;

    fn inotify() -> Inotify {
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap()
    }

    fn mailbox(path: &Path) -> Arc<Mailbox> {
        Arc::new(Mailbox::new(path.to_path_buf(), 1024))
    }

    /// What the manager does for a recursive subscriber, without the lock juggling.
    fn subscribe_recursive(tree: &mut Tree, ino: &Inotify, root: &Path) -> SubId {
        let (sub, wd) = tree.subscribe(ino, root, true, mailbox(root)).unwrap();
        let mut stack = vec![wd];
        while let Some(dir) = stack.pop() {
            let path = tree.path_of(dir).unwrap();
            for name in read_subdirs(&path) {
                stack.extend(tree.add_child(ino, dir, &name, &mut Unwatchable::default()).unwrap());
            }
        }
        sub
    }

    #[test]
    fn unwatchable_directories_are_counted_and_the_first_is_kept() {
        let mut missed = Unwatchable::default();
        assert!(missed.first.is_none());
        missed.note(PathBuf::from("/proc/1/fdinfo"), Errno::EACCES);
        missed.note(PathBuf::from("/proc/1/task/1/fdinfo"), Errno::EPERM);
        assert_eq!(missed.count, 2);
        assert_eq!(missed.first, Some((PathBuf::from("/proc/1/fdinfo"), Errno::EACCES)));
    }

    #[test]
    fn kinds_follow_envds_fixed_order() {
        let all = AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE;
        assert_eq!(
            kinds(all).collect::<Vec<_>>(),
            [EventKind::Create, EventKind::Rename, EventKind::Chmod, EventKind::Write, EventKind::Remove]
        );
        assert_eq!(
            kinds(AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ISDIR).collect::<Vec<_>>(),
            [EventKind::Create]
        );
        assert_eq!(kinds(AddWatchFlags::IN_IGNORED).count(), 0);
        assert_eq!(kinds(AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_OPEN).count(), 0);
    }

    #[test]
    fn overlapping_subscribers_share_watches_and_release_them() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b/c")).unwrap();
        let ino = inotify();
        let mut tree = Tree::new(usize::MAX);

        let outer = subscribe_recursive(&mut tree, &ino, dir.path());
        assert_eq!(tree.watch_count(), 4);
        let inner_root = dir.path().join("a/b");
        let (inner, inner_wd) = tree.subscribe(&ino, &inner_root, false, mailbox(&inner_root)).unwrap();
        assert_eq!(tree.watch_count(), 4, "the same directory is one watch");

        let c = tree.child(inner_wd, OsStr::new("c")).unwrap();
        let mut audience = tree.audience(c);
        audience.sort();
        assert_eq!(audience, vec![(outer, PathBuf::from("a/b/c"))], "non-recursive sees no subdirectories");
        let mut audience = tree.audience(inner_wd);
        audience.sort();
        assert_eq!(audience, vec![(outer, PathBuf::from("a/b")), (inner, PathBuf::new())]);

        tree.unsubscribe(&ino, outer);
        assert_eq!(tree.watch_count(), 1, "only the inner root is still needed");
        assert_eq!(tree.path_of(inner_wd).unwrap(), inner_root);
        tree.unsubscribe(&ino, inner);
        assert_eq!(tree.watch_count(), 0);
    }

    #[test]
    fn own_watch_cap_behaves_like_enospc() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a")).unwrap();
        let ino = inotify();
        let mut tree = Tree::new(1);
        let (_, wd) = tree.subscribe(&ino, dir.path(), true, mailbox(dir.path())).unwrap();
        let err = tree.add_child(&ino, wd, OsStr::new("a"), &mut Unwatchable::default()).unwrap_err();
        assert!(matches!(err, WatchError::WatchLimit { path, source: Errno::ENOSPC } if path == dir.path().join("a")));
        assert_eq!(tree.watch_count(), 1);
    }
}
