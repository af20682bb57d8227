//! System users as guestd sees them: passwd entry plus supplementary groups.
//!
//! Lookups go through libc's `getpwnam_r`/`getgrouplist` (under static musl these parse
//! `/etc/passwd` and `/etc/group` directly, no NSS). Nothing is cached: each call re-reads the
//! files, so a user created after guestd started (e.g. by a template's build step) is found.

use std::ffi::CString;
use std::io;
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, getgrouplist};

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

/// Looks `name` up in the passwd database (re-read on every call).
pub fn lookup(name: &str) -> Result<User, UserError> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(entry)) => Ok(from_entry(entry)),
        Ok(None) => Err(UserError::Unknown { name: name.to_owned() }),
        Err(errno) => Err(UserError::Lookup { name: name.to_owned(), source: errno.into() }),
    }
}

/// The user guestd itself runs as (by effective uid).
pub fn current() -> Result<User, UserError> {
    let uid = Uid::effective();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(entry)) => Ok(from_entry(entry)),
        Ok(None) => Err(UserError::Unknown { name: uid.to_string() }),
        Err(errno) => Err(UserError::Lookup { name: uid.to_string(), source: errno.into() }),
    }
}

fn from_entry(entry: nix::unistd::User) -> User {
    let gid = entry.gid.as_raw();
    User {
        groups: supplementary_groups(&entry.name, gid),
        uid: entry.uid.as_raw(),
        gid,
        home: entry.dir,
        shell: entry.shell,
        name: entry.name,
    }
}

/// Primary gid first, then the groups that list the user, without duplicates. A failing group
/// lookup is logged and leaves just the primary group, like envd (the user still works).
fn supplementary_groups(name: &str, primary: u32) -> Vec<u32> {
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
        }
        Err(error) => {
            tracing::warn!(user = name, %error, "supplementary group lookup failed; using the primary group only");
        }
    }
    groups
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
    fn current_user_matches_effective_uid() {
        let me = current().expect("guestd's own user has a passwd entry");
        assert_eq!(me.uid, Uid::effective().as_raw());
    }
}
