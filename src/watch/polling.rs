//! Polling watchers (envd's CreateWatcher / GetWatcherEvents / RemoveWatcher): a subscriber
//! whose events wait in a bounded buffer until the client takes them.
//!
//! Beyond envd (which keeps an unbounded slice forever): the buffer is bounded
//! (`WatchConfig::poll_buffer`; overflow is a terminal error returned on every later take), the
//! number of watchers is bounded (`WatchConfig::max_polling_watchers`), and a watcher nobody
//! took events from for `WatchConfig::poll_idle_timeout` is dropped (afterwards its id is
//! unknown). Expiry is checked at every polling call and by the reader thread's periodic sweep.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::entry::{self, EntryInfo};
use super::mailbox::{Mailbox, RawEvent};
use super::tree::SubId;
use super::{FsEvent, Shared, WatchError, WatchManager, WatchOptions, event_path};

/// Length of the random part of a watcher id (envd: `"w"` + `uniuri.UUIDLen`).
const ID_RANDOM_LEN: usize = 20;
const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

pub(super) struct Poller {
    sub: SubId,
    mailbox: Arc<Mailbox>,
    root: PathBuf,
    include_entry: bool,
    last_take: Instant,
}

impl WatchManager {
    /// CreateWatcher: validates and watches like [`WatchManager::watch`], and returns the id of a
    /// watcher whose events wait for [`WatchManager::take_events`]. Blocking (see `watch`).
    #[tracing::instrument(skip(self, opts), fields(path = %dir.display(), recursive = opts.recursive))]
    pub fn create_watcher(&self, dir: &Path, opts: WatchOptions) -> Result<String, WatchError> {
        let shared = &self.shared;
        shared.expire_idle(Instant::now());
        let limit = shared.config.max_polling_watchers;
        if shared.pollers().len() >= limit {
            return Err(WatchError::TooManyWatchers { limit });
        }
        let id = new_watcher_id().map_err(|e| WatchError::io("generate a watcher id for", dir, e))?;
        let (sub, mailbox) = self.subscribe(dir, opts, shared.config.poll_buffer)?;
        let mut pollers = shared.pollers();
        if pollers.len() >= limit || pollers.contains_key(&id) {
            drop(pollers);
            shared.tree().unsubscribe(&shared.inotify, sub);
            return Err(WatchError::TooManyWatchers { limit });
        }
        let poller = Poller {
            sub,
            mailbox,
            root: dir.to_path_buf(),
            include_entry: opts.include_entry,
            last_take: Instant::now(),
        };
        pollers.insert(id.clone(), poller);
        drop(pollers);
        self.alive.nudge();
        tracing::debug!(id, "polling watcher created");
        Ok(id)
    }

    /// GetWatcherEvents: everything that happened since the last call, oldest first, and an
    /// empty buffer. A watcher that ended (overflow of its buffer or of the kernel queue, watch
    /// limit) returns its error on every call instead, like envd. Blocking when the watcher
    /// includes entries (one stat per distinct path).
    pub fn take_events(&self, id: &str) -> Result<Vec<FsEvent>, WatchError> {
        let now = Instant::now();
        self.shared.expire_idle(now);
        let (mailbox, root, include_entry) = {
            let mut pollers = self.shared.pollers();
            let poller = pollers.get_mut(id).ok_or_else(|| WatchError::WatcherNotFound { id: id.to_owned() })?;
            poller.last_take = now;
            (poller.mailbox.clone(), poller.root.clone(), poller.include_entry)
        };
        let events = mailbox.drain()?;
        Ok(with_entries(events, &root, include_entry))
    }

    /// RemoveWatcher: forgets the watcher and its pending events.
    pub fn remove_watcher(&self, id: &str) -> Result<(), WatchError> {
        self.shared.expire_idle(Instant::now());
        let poller =
            self.shared.pollers().remove(id).ok_or_else(|| WatchError::WatcherNotFound { id: id.to_owned() })?;
        self.shared.tree().unsubscribe(&self.shared.inotify, poller.sub);
        tracing::debug!(id, "polling watcher removed");
        Ok(())
    }
}

impl Shared {
    /// Drops polling watchers idle for longer than the configured timeout.
    pub(super) fn expire_idle(&self, now: Instant) {
        let idle = self.config.poll_idle_timeout;
        let mut expired = Vec::new();
        self.pollers().retain(|id, p| {
            let keep = now.saturating_duration_since(p.last_take) <= idle;
            if !keep {
                expired.push((id.clone(), p.sub));
            }
            keep
        });
        if expired.is_empty() {
            return;
        }
        let mut tree = self.tree();
        for (id, sub) in expired {
            tracing::info!(id, idle_secs = idle.as_secs(), "dropping polling watcher nobody took events from");
            tree.unsubscribe(&self.inotify, sub);
        }
    }
}

/// Turns queued events into [`FsEvent`]s, stat-ing each distinct path once when entries were
/// asked for: the entry describes the path as it is now, when the client takes the event.
fn with_entries(events: Vec<RawEvent>, root: &Path, include_entry: bool) -> Vec<FsEvent> {
    let mut entries: HashMap<PathBuf, Option<EntryInfo>> = HashMap::new();
    events
        .into_iter()
        .map(|event| {
            let entry = match include_entry && event.kind.carries_entry() {
                true => entries
                    .entry(event.rel.clone())
                    .or_insert_with(|| entry::stat(&event_path(root, &event.rel)))
                    .clone(),
                false => None,
            };
            FsEvent::new(event, entry)
        })
        .collect()
}

/// `"w"` followed by 20 random characters of `[a-z0-9]`, envd's id format.
fn new_watcher_id() -> io::Result<String> {
    let mut id = String::with_capacity(1 + ID_RANDOM_LEN);
    id.push('w');
    let mut random = File::open("/dev/urandom")?;
    let mut buf = [0u8; 64];
    while id.len() < 1 + ID_RANDOM_LEN {
        random.read_exact(&mut buf)?;
        // Rejection sampling: 252 is the largest multiple of 36 below 256, so no bias.
        for &byte in buf.iter().filter(|&&b| b < 252) {
            if id.len() == 1 + ID_RANDOM_LEN {
                break;
            }
            id.push(char::from(ID_ALPHABET[usize::from(byte) % ID_ALPHABET.len()]));
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watcher_ids_look_like_envds() {
        let a = new_watcher_id().unwrap();
        let b = new_watcher_id().unwrap();
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 21, "{id}");
            assert!(id.starts_with('w'), "{id}");
            assert!(id[1..].bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id}");
        }
    }
}
