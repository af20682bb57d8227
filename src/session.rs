//! Sandbox-wide state shared by every request: default user, default workdir, the env vars every
//! process gets, the access token, and what `POST /init` last applied (its timestamp and the
//! restore epoch).
//!
//! Concurrency: one `RwLock` around a small value. Readers copy what they need and release the
//! lock at once, so a spawn never holds it. `/init` is applied under the write lock from start to
//! end (a handful of assignments and at most two syscalls), which makes concurrent `/init`
//! calls linearizable: each sees the timestamp the previous one stored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;

/// Env vars guestd owns; `/init` envVars cannot overwrite them (envd's internal vars).
pub const INTERNAL_ENV: &[&str] = &["E2B_SANDBOX", "E2B_SANDBOX_ID", "E2B_TEMPLATE_ID", "E2B_EVENTS_ADDRESS"];

/// Longest `NAME=value` the kernel passes to a new program (`MAX_ARG_STRLEN`, 32 pages of 4 KiB,
/// counting the trailing NUL); a longer env var makes every `execve` fail with E2BIG.
pub const MAX_ENV_ENTRY: usize = 32 * 4096 - 1;

/// Step the clock when the guest is this far behind the host's timestamp (envd's rule).
pub const CLOCK_BEHIND_TOLERANCE: Duration = Duration::from_millis(50);
/// Step the clock when the guest is this far ahead of the host's timestamp (envd's rule).
pub const CLOCK_AHEAD_TOLERANCE: Duration = Duration::from_secs(5);
/// A guest clock this far behind on a repeated `/init` means the VM was paused or restored from
/// a snapshot: the restore epoch goes up. Two seconds is far beyond any drift between two
/// `/init` calls of a running guest, and far below any real pause.
pub const RESTORE_JUMP: Duration = Duration::from_secs(2);

/// What a request needs from the session, copied out under the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// User for requests that name none.
    pub user: String,
    /// Working directory used when a request gives an empty path or cwd.
    pub workdir: Option<PathBuf>,
    /// Env vars every spawned process gets (after PATH/HOME/USER/LOGNAME, before the request's):
    /// internal vars first, then the `/init` ones, each group sorted by name.
    pub env: Vec<(String, String)>,
}

/// The sandbox's access token. Compared in constant time; never printed. `/init` parses it
/// straight into this type, so no request struct that derives `Debug` holds it as a `String`.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct AccessToken(String);

impl From<&str> for AccessToken {
    fn from(token: &str) -> AccessToken {
        AccessToken(token.to_owned())
    }
}

impl AccessToken {
    /// Constant-time comparison with what a client presented.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// A parsed `POST /init` body (all fields optional, as in envd).
#[derive(Debug, Default, Clone)]
pub struct InitRequest {
    /// Replaces every user env var; `None` leaves them unchanged.
    pub env_vars: Option<BTreeMap<String, String>>,
    pub access_token: Option<AccessToken>,
    /// The host's clock when it sent the request; orders requests and sets the guest clock.
    pub timestamp: Option<SystemTime>,
    pub default_user: Option<String>,
    pub default_workdir: Option<String>,
}

/// What `/init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOutcome {
    /// False when the request was older than one already applied (acknowledged, not applied).
    pub applied: bool,
    /// The guest clock was stepped to the request's timestamp.
    pub clock_stepped: bool,
    /// How many restores (clock jumps on a repeated `/init`) this guest has seen.
    pub restore_epoch: u64,
}

/// Why `/init` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    /// A token is set and the request did not present it.
    #[error("access token does not match the one this sandbox was initialized with")]
    TokenMismatch,
    /// A token is set and the request tried to clear it.
    #[error("access token reset is not authorized")]
    TokenResetNotAuthorized,
    /// An empty token or one with a backslash (envd refuses both).
    #[error("invalid access token")]
    InvalidToken,
    /// An env var no process could be given. envd accepts it and then fails every process
    /// start; refusing the `/init` says what is wrong where it was sent. The value is never
    /// shown (it may be a secret).
    #[error("env var {name:?} {reason}")]
    InvalidEnvVar { name: String, reason: &'static str },
}

/// Why no process could be given the env var `name=value`, if that is so.
fn env_var_problem(name: &str, value: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("has an empty name")
    } else if name.contains('=') {
        Some("has '=' in its name")
    } else if name.contains('\0') {
        Some("has a NUL byte in its name")
    } else if value.contains('\0') {
        Some("has a NUL byte in its value")
    } else if name.len() + 1 + value.len() > MAX_ENV_ENTRY {
        Some("is longer than the kernel passes to a program (128 KiB with its name)")
    } else {
        None
    }
}

/// The guest clock, behind a trait so `/init`'s clock rule is testable without root.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
    fn step_to(&self, to: SystemTime) -> std::io::Result<()>;
}

/// CLOCK_REALTIME of this machine.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn step_to(&self, to: SystemTime) -> std::io::Result<()> {
        crate::sys::clock::set_realtime(to)
    }
}

#[derive(Debug)]
struct State {
    user: String,
    workdir: Option<PathBuf>,
    internal_env: BTreeMap<String, String>,
    user_env: BTreeMap<String, String>,
    token: Option<AccessToken>,
    /// Timestamp of the newest applied `/init`, for ordering.
    last_init: Option<SystemTime>,
    inits_applied: u64,
    restore_epoch: u64,
}

/// Shared, cheaply cloneable handle to the sandbox-wide state.
#[derive(Debug, Clone)]
pub struct Session {
    state: Arc<RwLock<State>>,
}

impl Session {
    /// A session with `default_user` and the internal env vars (`E2B_SANDBOX=true`).
    pub fn new(default_user: impl Into<String>) -> Session {
        Session::with_internal_env(default_user, [("E2B_SANDBOX".to_owned(), "true".to_owned())].into())
    }

    pub fn with_internal_env(default_user: impl Into<String>, internal_env: BTreeMap<String, String>) -> Session {
        let state = State {
            user: default_user.into(),
            workdir: None,
            internal_env,
            user_env: BTreeMap::new(),
            token: None,
            last_init: None,
            inits_applied: 0,
            restore_epoch: 0,
        };
        Session { state: Arc::new(RwLock::new(state)) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A consistent copy of the current defaults.
    pub fn defaults(&self) -> Defaults {
        let state = self.read();
        let env = state.internal_env.iter().chain(state.user_env.iter()).map(|(k, v)| (k.clone(), v.clone())).collect();
        Defaults { user: state.user.clone(), workdir: state.workdir.clone(), env }
    }

    /// Every env var processes get (internal and `/init` ones), for `GET /envs`.
    pub fn env_map(&self) -> BTreeMap<String, String> {
        let state = self.read();
        let mut all = state.user_env.clone();
        all.extend(state.internal_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// The access token, if the sandbox has one.
    pub fn token(&self) -> Option<AccessToken> {
        self.read().token.clone()
    }

    pub fn restore_epoch(&self) -> u64 {
        self.read().restore_epoch
    }

    /// Applies `POST /init` (http.md §4.4): token check, timestamp ordering, clock step, then
    /// env vars, token, default user and workdir.
    pub fn init(&self, req: InitRequest, clock: &dyn Clock) -> Result<InitOutcome, InitError> {
        let mut state = self.write();
        if let Some(token) = &req.access_token
            && (token.0.is_empty() || token.0.contains('\\'))
        {
            return Err(InitError::InvalidToken);
        }
        match (&state.token, &req.access_token) {
            (Some(current), Some(presented)) if !current.matches(&presented.0) => return Err(InitError::TokenMismatch),
            (Some(_), None) => return Err(InitError::TokenResetNotAuthorized),
            _ => {}
        }
        if let Some(vars) = &req.env_vars
            && let Some((name, reason)) = vars.iter().find_map(|(k, v)| env_var_problem(k, v).map(|r| (k, r)))
        {
            return Err(InitError::InvalidEnvVar { name: name.clone(), reason });
        }
        if let (Some(ts), Some(last)) = (req.timestamp, state.last_init)
            && ts < last
        {
            return Ok(InitOutcome { applied: false, clock_stepped: false, restore_epoch: state.restore_epoch });
        }
        let mut clock_stepped = false;
        if let Some(host) = req.timestamp {
            let guest = clock.now();
            let behind = host.duration_since(guest).unwrap_or_default();
            let ahead = guest.duration_since(host).unwrap_or_default();
            if behind > CLOCK_BEHIND_TOLERANCE || ahead > CLOCK_AHEAD_TOLERANCE {
                match clock.step_to(host) {
                    Ok(()) => clock_stepped = true,
                    // Best effort, as in envd: a container may not own the clock.
                    Err(err) => tracing::warn!(error = %err, "cannot step the guest clock"),
                }
            }
            if behind > RESTORE_JUMP && state.inits_applied > 0 {
                state.restore_epoch += 1;
                tracing::info!(epoch = state.restore_epoch, behind = ?behind, "clock jump on /init: restored from a snapshot");
            }
            state.last_init = Some(host);
        }
        if let Some(vars) = req.env_vars {
            state.user_env = vars.into_iter().filter(|(k, _)| !INTERNAL_ENV.contains(&k.as_str())).collect();
        }
        if let Some(token) = req.access_token {
            state.token = Some(token);
        }
        if let Some(user) = req.default_user.filter(|u| !u.is_empty()) {
            state.user = user;
        }
        if let Some(workdir) = req.default_workdir.filter(|w| !w.is_empty()) {
            state.workdir = Some(PathBuf::from(workdir));
        }
        state.inits_applied += 1;
        Ok(InitOutcome { applied: true, clock_stepped, restore_epoch: state.restore_epoch })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A clock that starts at `now` and records steps.
    struct FakeClock {
        now: Mutex<SystemTime>,
        steps: Mutex<Vec<SystemTime>>,
    }

    impl FakeClock {
        fn at(now: SystemTime) -> FakeClock {
            FakeClock { now: Mutex::new(now), steps: Mutex::new(Vec::new()) }
        }
        fn set(&self, now: SystemTime) {
            *self.now.lock().unwrap() = now;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> SystemTime {
            *self.now.lock().unwrap()
        }
        fn step_to(&self, to: SystemTime) -> std::io::Result<()> {
            self.steps.lock().unwrap().push(to);
            *self.now.lock().unwrap() = to;
            Ok(())
        }
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn env_vars_replace_user_vars_but_not_internal_ones() {
        let session = Session::new("root");
        let clock = FakeClock::at(t(0));
        let vars = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        session.init(InitRequest { env_vars: vars(&[("A", "1"), ("B", "2")]), ..Default::default() }, &clock).unwrap();
        session
            .init(
                InitRequest { env_vars: vars(&[("B", "3"), ("E2B_SANDBOX", "hacked")]), ..Default::default() },
                &clock,
            )
            .unwrap();
        let env = session.env_map();
        assert_eq!(env.get("A"), None, "replaced, not merged");
        assert_eq!(env.get("B").map(String::as_str), Some("3"));
        assert_eq!(env.get("E2B_SANDBOX").map(String::as_str), Some("true"));
        assert_eq!(session.defaults().env, vec![("E2B_SANDBOX".into(), "true".into()), ("B".into(), "3".into())]);
        // Omitted envVars leave them as they are.
        session.init(InitRequest::default(), &clock).unwrap();
        assert_eq!(session.env_map().get("B").map(String::as_str), Some("3"));
    }

    #[test]
    fn older_requests_are_acknowledged_but_not_applied() {
        let session = Session::new("root");
        let clock = FakeClock::at(t(100));
        let req =
            |ts, user: &str| InitRequest { timestamp: Some(ts), default_user: Some(user.into()), ..Default::default() };
        assert!(session.init(req(t(100), "user"), &clock).unwrap().applied);
        let stale = session.init(req(t(99), "stale"), &clock).unwrap();
        assert!(!stale.applied);
        assert_eq!(session.defaults().user, "user");
        assert!(session.init(req(t(100), "same-time"), &clock).unwrap().applied, "equal timestamps pass");
        assert_eq!(session.defaults().user, "same-time");
    }

    #[test]
    fn clock_is_stepped_only_outside_the_tolerances() {
        let session = Session::new("root");
        let host = t(1000);
        let cases = [
            (host - Duration::from_millis(40), false),
            (host - Duration::from_millis(60), true),
            (host + Duration::from_secs(4), false),
            (host + Duration::from_secs(6), true),
        ];
        for (guest, step) in cases {
            let clock = FakeClock::at(guest);
            let out = session.init(InitRequest { timestamp: Some(host), ..Default::default() }, &clock).unwrap();
            assert_eq!(out.clock_stepped, step, "guest {guest:?}");
            assert_eq!(clock.steps.lock().unwrap().clone(), if step { vec![host] } else { vec![] });
        }
    }

    #[test]
    fn a_clock_jump_on_a_repeated_init_bumps_the_restore_epoch() {
        let session = Session::new("root");
        let clock = FakeClock::at(t(0));
        // First /init after boot: a behind clock is just an unset clock, not a restore.
        let first = session.init(InitRequest { timestamp: Some(t(60)), ..Default::default() }, &clock).unwrap();
        assert_eq!(first.restore_epoch, 0);
        clock.set(t(61));
        let resumed = session.init(InitRequest { timestamp: Some(t(3600)), ..Default::default() }, &clock).unwrap();
        assert!(resumed.clock_stepped);
        assert_eq!(resumed.restore_epoch, 1);
        assert_eq!(session.restore_epoch(), 1);
    }

    #[test]
    fn token_rules() {
        let session = Session::new("root");
        let clock = FakeClock::at(t(0));
        let with = |tok: Option<&str>| InitRequest { access_token: tok.map(AccessToken::from), ..Default::default() };
        assert_eq!(session.init(with(Some("")), &clock), Err(InitError::InvalidToken));
        assert_eq!(session.init(with(Some("a\\b")), &clock), Err(InitError::InvalidToken));
        session.init(with(Some("secret")), &clock).unwrap();
        assert!(session.token().unwrap().matches("secret"));
        assert!(!session.token().unwrap().matches("secreT"));
        assert_eq!(session.init(with(Some("other")), &clock), Err(InitError::TokenMismatch));
        assert_eq!(session.init(with(None), &clock), Err(InitError::TokenResetNotAuthorized));
        session.init(with(Some("secret")), &clock).unwrap();
        assert_eq!(format!("{:?}", session.token().unwrap()), "AccessToken(<redacted>)");
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let req = InitRequest { access_token: Some("s3cret-token".into()), ..Default::default() };
        let shown = format!("{req:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        let session = Session::new("root");
        session.init(req, &FakeClock::at(t(0))).unwrap();
        let shown = format!("{session:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn concurrent_inits_are_linearizable() {
        let session = Session::new("root");
        let clock = Arc::new(FakeClock::at(t(5000)));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (session, clock) = (session.clone(), clock.clone());
                std::thread::spawn(move || {
                    let req = InitRequest {
                        timestamp: Some(t(5000 + i)),
                        default_user: Some(format!("u{i}")),
                        ..Default::default()
                    };
                    session.init(req, clock.as_ref()).unwrap()
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        // Whatever the interleaving, the newest timestamp's values win.
        assert_eq!(session.defaults().user, "u15");
    }
}
