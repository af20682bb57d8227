//! Sandbox-wide defaults shared by every request: default user, default workdir and the env vars
//! every process gets. `POST /init` (a later issue) replaces them; requests read a snapshot.
//!
//! Concurrency: one `RwLock` around a small value. Readers clone what they need and release the
//! lock at once, so a spawn never holds it; writers are rare (one `/init` per sandbox start).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// What a request needs from the session, copied out under the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// User for requests that name none.
    pub user: String,
    /// Working directory used when a request gives an empty path or cwd.
    pub workdir: Option<PathBuf>,
    /// Env vars every spawned process gets (after PATH/HOME/USER/LOGNAME, before the request's).
    pub env: Vec<(String, String)>,
}

/// Shared, cheaply cloneable handle to the sandbox-wide defaults.
#[derive(Debug, Clone)]
pub struct Session {
    defaults: Arc<RwLock<Defaults>>,
}

impl Session {
    pub fn new(default_user: impl Into<String>) -> Session {
        Session {
            defaults: Arc::new(RwLock::new(Defaults { user: default_user.into(), workdir: None, env: Vec::new() })),
        }
    }

    /// A consistent copy of the current defaults.
    pub fn defaults(&self) -> Defaults {
        self.defaults.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Applies `change` atomically with respect to readers.
    pub fn update(&self, change: impl FnOnce(&mut Defaults)) {
        change(&mut self.defaults.write().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }
}
