//! One watcher's bounded event queue, between the shared inotify reader (producer) and the
//! watcher's consumer (a stream or a polling client).
//!
//! The producer never waits: a full queue turns into a terminal
//! [`WatchError::SubscriberOverflow`] for this watcher only, so one slow client can neither stall
//! the reader nor make others lose events. A terminal error is sticky: once set, further events
//! are dropped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::{EventKind, WatchError};

/// An event as queued: the path relative to the watched directory (empty for the directory
/// itself) and one op. The `EntryInfo` is added by the consumer (see `WatchStream::next`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawEvent {
    pub rel: PathBuf,
    pub kind: EventKind,
}

/// What [`Mailbox::push`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushed {
    Queued,
    /// The queue was full: the mailbox is now terminal with `SubscriberOverflow`.
    Overflowed,
    /// The mailbox was already terminal; the event was dropped.
    Closed,
}

pub(super) struct Mailbox {
    /// The watched directory as the client named it, for error messages.
    root: PathBuf,
    capacity: usize,
    state: Mutex<State>,
    ready: Notify,
}

struct State {
    events: VecDeque<RawEvent>,
    terminal: Option<WatchError>,
}

impl Mailbox {
    pub fn new(root: PathBuf, capacity: usize) -> Self {
        Mailbox {
            root,
            capacity,
            state: Mutex::new(State { events: VecDeque::new(), terminal: None }),
            ready: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, event: RawEvent) -> Pushed {
        let outcome = {
            let mut state = self.state();
            if state.terminal.is_some() {
                return Pushed::Closed;
            }
            if state.events.len() >= self.capacity {
                state.terminal =
                    Some(WatchError::SubscriberOverflow { path: self.root.clone(), capacity: self.capacity });
                Pushed::Overflowed
            } else {
                state.events.push_back(event);
                Pushed::Queued
            }
        };
        self.ready.notify_one();
        outcome
    }

    /// Ends the mailbox with `error` (the first terminal error wins).
    pub fn fail(&self, error: WatchError) {
        self.state().terminal.get_or_insert(error);
        self.ready.notify_one();
    }

    /// Stream order: queued events first, then the terminal error (which stays set).
    pub fn pop(&self) -> Option<Result<RawEvent, WatchError>> {
        let mut state = self.state();
        match state.events.pop_front() {
            Some(event) => Some(Ok(event)),
            None => state.terminal.clone().map(Err),
        }
    }

    /// Polling order (envd's `GetWatcherEvents`): a terminal error wins over queued events, on
    /// every call; otherwise everything queued, oldest first, leaving the queue empty.
    pub fn drain(&self) -> Result<Vec<RawEvent>, WatchError> {
        let mut state = self.state();
        if let Some(error) = &state.terminal {
            return Err(error.clone());
        }
        Ok(state.events.drain(..).collect())
    }

    /// Resolves after the next push or failure (or at once if one happened since the last wait).
    pub async fn changed(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str) -> RawEvent {
        RawEvent { rel: PathBuf::from(name), kind: EventKind::Create }
    }

    #[test]
    fn full_queue_becomes_a_sticky_overflow_after_the_queued_events() {
        let mailbox = Mailbox::new(PathBuf::from("/w"), 2);
        assert_eq!(mailbox.push(event("a")), Pushed::Queued);
        assert_eq!(mailbox.push(event("b")), Pushed::Queued);
        assert_eq!(mailbox.push(event("c")), Pushed::Overflowed);
        assert_eq!(mailbox.push(event("d")), Pushed::Closed);

        assert_eq!(mailbox.pop().unwrap().unwrap(), event("a"));
        assert_eq!(mailbox.pop().unwrap().unwrap(), event("b"));
        for _ in 0..2 {
            let err = mailbox.pop().unwrap().unwrap_err();
            assert!(matches!(err, WatchError::SubscriberOverflow { capacity: 2, .. }), "{err}");
            assert!(err.to_string().contains("/w"), "{err}");
        }
    }

    #[test]
    fn drain_returns_the_terminal_error_on_every_call_and_hides_events() {
        let mailbox = Mailbox::new(PathBuf::from("/w"), 8);
        mailbox.push(event("a"));
        assert_eq!(mailbox.drain().unwrap(), vec![event("a")]);
        assert_eq!(mailbox.drain().unwrap(), vec![]);
        mailbox.push(event("b"));
        mailbox.fail(WatchError::QueueOverflow { path: PathBuf::from("/w") });
        mailbox.fail(WatchError::NotFound { path: PathBuf::from("/other") });
        for _ in 0..2 {
            assert!(matches!(mailbox.drain(), Err(WatchError::QueueOverflow { .. })));
        }
    }

    #[tokio::test]
    async fn a_push_before_waiting_is_not_lost() {
        let mailbox = Mailbox::new(PathBuf::from("/w"), 8);
        mailbox.push(event("a"));
        tokio::time::timeout(std::time::Duration::from_secs(1), mailbox.changed()).await.unwrap();
    }
}
