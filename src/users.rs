//! System users as guestd sees them: passwd entry plus supplementary groups.
//!
//! Lookups go through libc's `getpwnam_r`/`getgrouplist` (under static musl these parse
//! `/etc/passwd` and `/etc/group` directly, no NSS; `getgrouplist` asks nscd first if its socket
//! exists). Every command resolves its user, so [`lookup`] keeps what it found while both files
//! are unchanged: two `stat`s instead of two opens, reads and parses and an nscd probe on each
//! command. A user created, changed or removed after guestd started (a template's build step,
//! `useradd`, `usermod -aG`) is seen at the next lookup: those tools replace the files, which
//! changes their inode, size or times. With an nscd socket present nothing is cached (nscd may
//! answer for users the files do not list).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::unistd::{Gid, Uid, getgrouplist};

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";
const NSCD_SOCKET: &str = "/var/run/nscd/socket";

/// Users kept at most; the cache starts over when full (it only holds users that exist, so
/// this is never reached on a normal system, but a passwd file is not bounded).
const CACHE_USERS: usize = 64;

/// A resolved user, ready to spawn processes as.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: primary gid first, then every group listing the user (getgrouplist).
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name (or uid) has no passwd entry.
    #[error("unknown user '{name}'")]
    Unknown { name: String },
    /// The passwd database could not be read.
    #[error("looking up user '{name}'")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Looks `name` up in the passwd database (cached while `/etc/passwd` and `/etc/group` are
/// unchanged; see the module docs).
pub fn lookup(name: &str) -> Result<User, UserError> {
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let sources = Sources::now();
    if let Some(sources) = sources {
        let cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(user) = cache.as_ref().filter(|c| c.sources == sources).and_then(|c| c.users.get(name)) {
            return Ok(user.clone());
        }
    }
    let (user, complete) = lookup_uncached(name)?;
    if let Some(sources) = sources.filter(|_| complete) {
        let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = match cache.as_mut() {
            Some(c) if c.sources == sources && c.users.len() < CACHE_USERS => c,
            _ => cache.insert(Cache { sources, users: HashMap::new() }),
        };
        cache.users.insert(name.to_owned(), user.clone());
    }
    Ok(user)
}

/// The user, and whether the answer is complete (false when its groups could not be listed:
/// such an answer is used once, never cached).
fn lookup_uncached(name: &str) -> Result<(User, bool), UserError> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(entry)) => Ok(from_entry(entry)),
        Ok(None) => Err(UserError::Unknown { name: name.to_owned() }),
        Err(errno) => Err(UserError::Lookup { name: name.to_owned(), source: errno.into() }),
    }
}

/// Users found while the databases had these [`Sources`].
struct Cache {
    sources: Sources,
    users: HashMap<String, User>,
}

/// What a lookup's answer depends on: the identity and version of both files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sources {
    passwd: Stamp,
    group: Stamp,
}

impl Sources {
    /// None when caching is off: a file is unreadable (the lookup reports why), was changed
    /// too recently to tell a further change apart, or nscd runs.
    fn now() -> Option<Sources> {
        if Path::new(NSCD_SOCKET).exists() {
            return None;
        }
        let now = SystemTime::now();
        let settled = |path: &str| Stamp::of(Path::new(path)).filter(|stamp| stamp.settled(now));
        Some(Sources { passwd: settled(PASSWD)?, group: settled(GROUP)? })
    }
}

/// A file's identity and version as `stat` shows them. Editing tools replace the file (new
/// inode, though a freed inode number may come back); an in-place edit changes its times. File
/// times tick coarsely (a jiffy), so a second change within the same tick, to the same size, on
/// a recycled inode could leave the stamp equal: like git's "racy" index entries, a file changed
/// less than [`SETTLE`] ago is not trusted (nothing is cached until it has settled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// How old a file's last change must be before its stamp identifies its content.
const SETTLE: Duration = Duration::from_secs(1);

impl Stamp {
    /// Whether the last change is at least [`SETTLE`] old (a change in the future never is).
    fn settled(&self, now: SystemTime) -> bool {
        let changed = |(secs, nanos): (i64, i64)| {
            let secs = u64::try_from(secs).ok()?;
            UNIX_EPOCH.checked_add(Duration::new(secs, u32::try_from(nanos).ok()?))
        };
        [self.mtime, self.ctime]
            .into_iter()
            .all(|t| changed(t).and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age >= SETTLE))
    }

    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The user guestd itself runs as (by effective uid).
pub fn current() -> Result<User, UserError> {
    let uid = Uid::effective();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(entry)) => Ok(from_entry(entry).0),
        Ok(None) => Err(UserError::Unknown { name: uid.to_string() }),
        Err(errno) => Err(UserError::Lookup { name: uid.to_string(), source: errno.into() }),
    }
}

/// The user, and whether its groups were listed completely (see [`supplementary_groups`]).
fn from_entry(entry: nix::unistd::User) -> (User, bool) {
    let gid = entry.gid.as_raw();
    let (groups, complete) = supplementary_groups(&entry.name, gid);
    let user = User { groups, uid: entry.uid.as_raw(), gid, home: entry.dir, shell: entry.shell, name: entry.name };
    (user, complete)
}

/// Primary gid first, then the groups that list the user, without duplicates. A failing group
/// lookup is logged and leaves just the primary group, like envd (the user still works); the
/// flag says whether the list is complete.
fn supplementary_groups(name: &str, primary: u32) -> (Vec<u32>, bool) {
    let mut groups = vec![primary];
    let listed = CString::new(name)
        .map_err(io::Error::from)
        .and_then(|cname| getgrouplist(&cname, Gid::from_raw(primary)).map_err(io::Error::from));
    match listed {
        Ok(listed) => {
            for gid in listed.into_iter().map(Gid::as_raw) {
                if !groups.contains(&gid) {
                    groups.push(gid);
                }
            }
            (groups, true)
        }
        Err(error) => {
            tracing::warn!(user = name, %error, "supplementary group lookup failed; using the primary group only");
            (groups, false)
        }
    }
}

/// System users for tests that need root, made and removed with the system's own tools.
#[cfg(test)]
pub(crate) mod testing {
    /// A throwaway user `gd-TAG-PID` with an extra group `gd-TAG-PID-g`; both removed on drop.
    pub(crate) struct TempUser {
        pub name: String,
        pub group: String,
    }

    impl TempUser {
        /// The name [`TempUser::create`] gives the user tagged `tag`.
        pub(crate) fn name_for(tag: &str) -> String {
            format!("gd-{tag}-{}", std::process::id())
        }

        /// Creates the group and the user (no home directory); `member`: the user is in the
        /// group from the start, else it joins later with [`TempUser::join_group`].
        pub(crate) fn create(tag: &str, member: bool) -> Self {
            let name = Self::name_for(tag);
            let group = format!("{name}-g");
            run(&["groupadd", &group]);
            let user = TempUser { name, group };
            if member {
                run(&["useradd", "-M", "-G", &user.group, &user.name]);
            } else {
                run(&["useradd", "-M", &user.name]);
            }
            user
        }

        pub(crate) fn join_group(&self) {
            run(&["usermod", "-aG", &self.group, &self.name]);
        }
    }

    impl Drop for TempUser {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.name).status();
            let _ = std::process::Command::new("groupdel").arg(&self.group).status();
        }
    }

    fn run(args: &[&str]) {
        let status = std::process::Command::new(args[0]).args(&args[1..]).status().expect("run user admin tool");
        assert!(status.success(), "{args:?} failed (tests need root)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_zero_with_primary_group_first() {
        let root = lookup("root").expect("root exists");
        assert_eq!(root.uid, 0);
        assert_eq!(root.gid, 0);
        assert_eq!(root.groups.first(), Some(&0));
        assert_eq!(root.home, PathBuf::from("/root"));
    }

    #[test]
    fn unknown_user_is_named_in_the_error() {
        let err = lookup("no-such-user-guestd").unwrap_err();
        assert!(matches!(err, UserError::Unknown { .. }));
        assert_eq!(err.to_string(), "unknown user 'no-such-user-guestd'");
    }

    #[test]
    fn a_file_stamp_changes_when_the_file_is_replaced_or_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "a:x:1:1::/:/bin/sh\n").unwrap();
        let first = Stamp::of(&path).unwrap();
        assert_eq!(Stamp::of(&path), Some(first), "unchanged file, same stamp");
        // What useradd/usermod do: write a new file, rename it over the old one.
        let next = dir.path().join("passwd+");
        std::fs::write(&next, "a:x:1:1::/:/bin/sh\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        let replaced = Stamp::of(&path).unwrap();
        assert_ne!(replaced, first);
        // An in-place rewrite (same inode).
        std::fs::write(&path, "a:x:1:1::/:/bin/sh\nb:x:2:2::/:/bin/sh\n").unwrap();
        assert_ne!(Stamp::of(&path).unwrap(), replaced);
        assert_eq!(Stamp::of(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_stamp_is_trusted_only_once_the_file_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group");
        std::fs::write(&path, "g:x:1:\n").unwrap();
        let stamp = Stamp::of(&path).unwrap();
        let now = SystemTime::now();
        assert!(!stamp.settled(now), "just written: a same-tick change could hide behind it");
        assert!(stamp.settled(now + SETTLE), "a second later it identifies the content");
        assert!(!stamp.settled(now - Duration::from_secs(60)), "a change in the future is never settled");
    }

    #[test]
    fn cached_lookups_see_users_and_groups_change() {
        if !Uid::effective().is_root() {
            eprintln!("skipping cached_lookups_see_users_and_groups_change: needs root (useradd)");
            return;
        }
        let name = testing::TempUser::name_for("cache");
        assert!(matches!(lookup(&name), Err(UserError::Unknown { .. })));
        let temp = testing::TempUser::create("cache", false);
        let before = lookup(&name).expect("a user added after guestd started is found");
        // Once the files have settled the answer is cached; a change must still be seen. (Other
        // tests running meanwhile may add users too: wait, boundedly, until nothing changes.)
        let settled = (0..10).any(|_| {
            std::thread::sleep(SETTLE);
            Path::new(NSCD_SOCKET).exists() || Sources::now().is_some()
        });
        assert!(settled, "settled files: caching is on");
        assert_eq!(lookup(&name).unwrap(), before);
        assert_eq!(lookup(&name).unwrap(), before, "second lookup: the cached user");
        temp.join_group();
        let gid = nix::unistd::Group::from_name(&temp.group).unwrap().unwrap().gid.as_raw();
        let after = lookup(&name).unwrap();
        assert!(after.groups.contains(&gid), "a group joined later is seen: {after:?}");
        drop(temp);
        assert!(matches!(lookup(&name), Err(UserError::Unknown { .. })), "a removed user is gone");
    }

    #[test]
    fn current_user_matches_effective_uid() {
        let me = current().expect("guestd's own user has a passwd entry");
        assert_eq!(me.uid, Uid::effective().as_raw());
    }
}
