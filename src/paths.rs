//! E2B path rules (envd's `ExpandAndResolve`, rpc.md §3.1), shared by Process.Start's cwd and
//! every filesystem RPC.
//!
//! Pure string work: no filesystem access, no symlink resolution, no containment checks.
//! Deliberate envd compatibility (rpc.md §7): relative paths are relative to the user's home,
//! not to the default workdir; absolute paths are returned as given, not cleaned.

use std::path::{Path, PathBuf};

use crate::users::User;

/// Why a request path could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// `~name/...`: only the requesting user's own home can be expanded.
    #[error("cannot expand user-specific home dir in '{path}'")]
    UserHome { path: String },
}

/// Resolves a request path for `user`:
/// - `""` -> `default_workdir` if set, else the user's home;
/// - leading `~` followed by nothing, `/` or `\` -> the user's home joined with the rest, cleaned;
///   `~name` -> [`PathError::UserHome`];
/// - absolute -> as is (not cleaned);
/// - relative -> `home.join(path)`, cleaned lexically.
pub fn resolve(path: &str, user: &User, default_workdir: Option<&Path>) -> Result<PathBuf, PathError> {
    let owned;
    let path = if path.is_empty() {
        match default_workdir {
            Some(workdir) => {
                owned = workdir.to_string_lossy().into_owned();
                owned.as_str()
            }
            None => return Ok(user.home.clone()),
        }
    } else {
        path
    };
    if let Some(rest) = path.strip_prefix('~') {
        if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('\\')) {
            return Err(PathError::UserHome { path: path.to_owned() });
        }
        return Ok(clean(&format!("{}/{rest}", user.home.display())));
    }
    if path.starts_with('/') {
        return Ok(PathBuf::from(path));
    }
    Ok(clean(&format!("{}/{path}", user.home.display())))
}

/// Lexical cleaning like Go's `filepath.Clean`: collapses `//`, drops `.`, resolves `..` against
/// the preceding element (never above `/` for rooted paths).
fn clean(path: &str) -> PathBuf {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => PathBuf::from(format!("/{joined}")),
        (false, true) => PathBuf::from("."),
        (false, false) => PathBuf::from(joined),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: PathBuf::from("/home/user"),
            shell: PathBuf::from("/bin/bash"),
        }
    }

    fn r(path: &str, workdir: Option<&str>) -> Result<PathBuf, PathError> {
        resolve(path, &user(), workdir.map(Path::new))
    }

    #[test]
    fn empty_uses_workdir_then_home() {
        assert_eq!(r("", Some("/work")).unwrap(), PathBuf::from("/work"));
        assert_eq!(r("", None).unwrap(), PathBuf::from("/home/user"));
    }

    #[test]
    fn tilde_expands_to_home_and_is_cleaned() {
        assert_eq!(r("~", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/", None).unwrap(), PathBuf::from("/home/user"));
        assert_eq!(r("~/a/../b", None).unwrap(), PathBuf::from("/home/user/b"));
    }

    #[test]
    fn tilde_user_is_rejected() {
        let err = r("~root/x", None).unwrap_err();
        assert_eq!(err.to_string(), "cannot expand user-specific home dir in '~root/x'");
    }

    #[test]
    fn absolute_is_kept_verbatim() {
        assert_eq!(r("/a/../b/", None).unwrap(), PathBuf::from("/a/../b/"));
    }

    #[test]
    fn relative_is_joined_to_home_not_workdir() {
        assert_eq!(r("x/./y", Some("/work")).unwrap(), PathBuf::from("/home/user/x/y"));
        assert_eq!(r("../../..", None).unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn clean_matches_go() {
        assert_eq!(clean("a//b/./c/.."), PathBuf::from("a/b"));
        assert_eq!(clean("../a"), PathBuf::from("../a"));
        assert_eq!(clean(""), PathBuf::from("."));
        assert_eq!(clean("/.."), PathBuf::from("/"));
    }
}
