//! Per-process output log and the subscriptions reading it.
//!
//! One [`OutputLog`] per process holds the output as sequence-numbered chunks. Pumps append; each
//! [`Subscription`] has its own cursor into the log, so every subscriber sees every chunk after
//! its subscription point, in order, exactly once. All state sits behind one short std mutex
//! (never held across an await); two `Notify`s wake subscribers (new data) and pumps (space).
//!
//! Flow control (the fix for e2b-dev/infra#3292, where one stalled client froze every other
//! client of the process):
//! - The pumps may run ahead of the *most advanced* live subscriber by at most
//!   [`SUBSCRIBER_WINDOW`]. A single slow-but-progressing client therefore backpressures the
//!   child like a pipe would: no loss, bounded memory.
//! - A subscriber more than [`SUBSCRIBER_WINDOW`] behind the most advanced one is evicted: its
//!   next call returns [`SubscriptionError::Evicted`], never a silent gap, reorder or duplicate.
//!   One that was already behind when a newcomer joined at the tail may trail by that much more
//!   (at most another window), so a joining client does not evict a steady reader.
//! - A subscriber that alone holds the pumps back and makes no progress for [`STALL_TIMEOUT`] is
//!   evicted too, so a frozen TCP connection cannot wedge a process forever.
//! - With no subscriber the pumps never wait (the child must never block on an unread pipe); the
//!   log keeps only the last [`REPLAY_TAIL`] of a replayed process's output, nothing otherwise.
//! - Dropping a subscription unsubscribes at once.
//!
//! Memory per process is thus bounded by about `3 * SUBSCRIBER_WINDOW` plus two read chunks
//! (the slowest live subscriber is within two windows of the leader, the leader within one window
//! of the newest byte). Limits count each chunk as at least [`MIN_CHUNK_COST`] bytes, so a flood
//! of tiny reads cannot pile up millions of chunk headers inside a "4 MiB" window.

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Event, ExitStatus, SubscriptionError};

/// How far the pumps may run ahead of the most advanced subscriber, and how far a subscriber may
/// trail the most advanced one before it is evicted. 4 MiB absorbs several seconds of a
/// terminal-speed stream and a few round trips of a fast one (at 1 GB/s it is ~4 ms, enough for
/// the transport's own buffers to keep the pipe busy), while keeping a process's worst case
/// (three windows, see the module docs) near 12 MiB.
pub(crate) const SUBSCRIBER_WINDOW: u64 = 4 * 1024 * 1024;

/// Output kept for processes started with `replay` (the boot start command) while nobody is
/// subscribed, and behind every subscriber, so a host that connects after the fact sees what it
/// printed: 4 MiB holds any realistic startup log. Other processes keep nothing nobody will read:
/// a later `Connect` starts at the tail, as envd's does.
pub(crate) const REPLAY_TAIL: u64 = 4 * 1024 * 1024;

/// A subscriber that alone holds the pumps back and reads nothing for this long is evicted.
/// 30 s outlasts GC pauses, TCP retransmission backoff and a suspended laptop's short naps, but
/// not a dead connection the kernel has not noticed yet.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Minimum accounting size of one chunk (see the module docs).
pub(crate) const MIN_CHUNK_COST: u64 = 512;

/// The bounds of one log; tests shrink them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub window: u64,
    pub tail: u64,
    pub stall: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { window: SUBSCRIBER_WINDOW, tail: 0, stall: STALL_TIMEOUT }
    }
}

impl Limits {
    /// The same limits with the larger tail of replayed processes.
    pub(crate) fn with_replay_tail(self) -> Self {
        Self { tail: self.tail.max(REPLAY_TAIL), ..self }
    }
}

/// Which stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
    Pty,
}

struct Chunk {
    stream: Stream,
    data: Bytes,
    /// Accounting position of the first byte (sum of the costs of all earlier chunks).
    pos: u64,
    cost: u64,
    /// Real byte offset of the first byte, for error messages.
    byte: u64,
}

struct Sub {
    /// Sequence number of the next chunk to deliver.
    cursor: u64,
    /// Reading, or caught up and waiting for output: the stall clock runs only while neither.
    last_progress: Instant,
    /// Extra distance this subscriber may trail the leader by: how far behind the newest output
    /// it was when a later subscriber joined (at most one window). Without it, a
    /// subscriber that was holding the pumps back — a full window behind the tail — would be
    /// evicted as soon as a newcomer read anything, however steadily it kept reading.
    slack: u64,
    /// Set when evicted: how many bytes it was behind the newest output.
    evicted: Option<u64>,
}

struct State {
    pid: u32,
    chunks: VecDeque<Chunk>,
    /// Sequence number of `chunks[0]`.
    first_seq: u64,
    end_pos: u64,
    end_byte: u64,
    end: Option<ExitStatus>,
    subs: HashMap<u64, Sub>,
    next_sub: u64,
}

enum Space {
    Free,
    /// Some stalled leaders were just evicted; check again.
    Evicted,
    /// Wait for progress, or until the earliest leader's stall deadline.
    Blocked(Instant),
}

enum Step {
    Item(Event),
    End(ExitStatus),
    Evicted(SubscriptionError),
}

impl State {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.chunks.len() as u64
    }

    /// `(pos, byte)` of sequence number `seq`, which must be retained or the next one.
    fn offsets(&self, seq: u64) -> (u64, u64) {
        match self.chunks.get((seq - self.first_seq) as usize) {
            Some(chunk) => (chunk.pos, chunk.byte),
            None => (self.end_pos, self.end_byte),
        }
    }

    fn live(&self) -> impl Iterator<Item = (u64, &Sub)> {
        self.subs.iter().filter(|(_, s)| s.evicted.is_none()).map(|(&id, s)| (id, s))
    }

    fn lead_pos(&self) -> Option<u64> {
        self.live().map(|(_, s)| self.offsets(s.cursor).0).max()
    }

    fn evict(&mut self, id: u64) {
        let end_byte = self.end_byte;
        let cursor = match self.subs.get(&id) {
            Some(sub) => sub.cursor,
            None => return,
        };
        let behind = end_byte - self.offsets(cursor).1;
        if let Some(sub) = self.subs.get_mut(&id) {
            sub.evicted = Some(behind);
        }
        tracing::info!(pid = self.pid, behind_bytes = behind, "evicting a subscriber that fell behind");
    }

    /// Evicts every live subscriber more than `window` behind the most advanced one.
    fn enforce_window(&mut self, window: u64) -> bool {
        let Some(lead) = self.lead_pos() else {
            return false;
        };
        let laggards: Vec<u64> =
            self.live().filter(|(_, s)| lead - self.offsets(s.cursor).0 > window + s.slack).map(|(id, _)| id).collect();
        for &id in &laggards {
            self.evict(id);
        }
        !laggards.is_empty()
    }

    /// Drops chunks no live subscriber needs and that are older than the retained tail.
    fn trim(&mut self, tail: u64) {
        let min_cursor = self.live().map(|(_, s)| s.cursor).min().unwrap_or_else(|| self.next_seq());
        let floor = self.end_pos.saturating_sub(tail);
        while let Some(front) = self.chunks.front() {
            if self.first_seq >= min_cursor || front.pos + front.cost > floor {
                break;
            }
            self.chunks.pop_front();
            self.first_seq += 1;
        }
    }

    fn space(&mut self, limits: Limits, now: Instant) -> Space {
        let Some(lead) = self.lead_pos() else {
            return Space::Free;
        };
        if self.end_pos - lead < limits.window {
            return Space::Free;
        }
        let mut deadline: Option<Instant> = None;
        let mut stalled = Vec::new();
        for (id, sub) in self.live() {
            if self.offsets(sub.cursor).0 != lead {
                continue;
            }
            let due = sub.last_progress + limits.stall;
            if due <= now {
                stalled.push(id);
            } else {
                deadline = Some(deadline.map_or(due, |d| d.min(due)));
            }
        }
        if !stalled.is_empty() {
            for id in stalled {
                self.evict(id);
            }
            self.trim(limits.tail);
            return Space::Evicted;
        }
        // A live leader exists (lead_pos was Some) and none was stalled, so a deadline exists.
        Space::Blocked(deadline.unwrap_or(now + limits.stall))
    }
}

/// The output of one process, shared by its pumps and its subscriptions.
pub(crate) struct OutputLog {
    state: Mutex<State>,
    /// New chunk, end, or eviction: subscribers re-check.
    data: Notify,
    /// A subscriber progressed or left: pumps re-check the window.
    space: Notify,
    limits: Limits,
}

impl OutputLog {
    pub(crate) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                pid: 0,
                chunks: VecDeque::new(),
                first_seq: 0,
                end_pos: 0,
                end_byte: 0,
                end: None,
                subs: HashMap::new(),
                next_sub: 0,
            }),
            data: Notify::new(),
            space: Notify::new(),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pid is known only after the spawn, and the starter subscribes before it.
    pub(crate) fn set_pid(&self, pid: u32) {
        self.lock().pid = pid;
    }

    /// Subscribes to output produced from now on (envd's Connect semantic).
    pub(crate) fn subscribe_at_tail(self: &Arc<Self>) -> Subscription {
        let mut st = self.lock();
        let cursor = st.next_seq();
        self.add_subscriber(&mut st, cursor)
    }

    /// Subscribes from the oldest retained chunk, replaying up to the log's tail of output.
    pub(crate) fn subscribe_from_oldest(self: &Arc<Self>) -> Subscription {
        let mut st = self.lock();
        let cursor = st.first_seq;
        self.add_subscriber(&mut st, cursor)
    }

    fn add_subscriber(self: &Arc<Self>, st: &mut State, cursor: u64) -> Subscription {
        let id = st.next_sub;
        st.next_sub += 1;
        let end_pos = st.end_pos;
        let behind: Vec<(u64, u64)> =
            st.live().map(|(id, sub)| (id, (end_pos - st.offsets(sub.cursor).0).min(self.limits.window))).collect();
        for (id, behind) in behind {
            if let Some(sub) = st.subs.get_mut(&id) {
                sub.slack = sub.slack.max(behind);
            }
        }
        st.subs.insert(id, Sub { cursor, last_progress: Instant::now(), slack: 0, evicted: None });
        Subscription { inner: Inner::Live { log: Arc::clone(self), id } }
    }

    fn unsubscribe(&self, id: u64) {
        let mut st = self.lock();
        if st.subs.remove(&id).is_some() {
            st.trim(self.limits.tail);
            drop(st);
            self.space.notify_waiters();
        }
    }

    /// Waits until the pumps may read more: immediately with no subscriber or while the most
    /// advanced subscriber is within the window; otherwise until someone progresses, leaves or
    /// is evicted for stalling.
    pub(crate) async fn wait_for_space(&self) {
        loop {
            let mut progressed = pin!(self.space.notified());
            progressed.as_mut().enable();
            let deadline = {
                let mut st = self.lock();
                match st.space(self.limits, Instant::now()) {
                    Space::Free => return,
                    Space::Evicted => None,
                    Space::Blocked(deadline) => Some(deadline),
                }
            };
            match deadline {
                None => self.data.notify_waiters(),
                Some(deadline) => {
                    tokio::select! {
                        () = progressed => {}
                        () = tokio::time::sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    /// Appends one chunk read from `stream`.
    pub(crate) fn push(&self, stream: Stream, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut st = self.lock();
        // Subscribers that were caught up start reading this chunk now: time spent waiting for
        // output is not a stall.
        let next_seq = st.next_seq();
        let now = Instant::now();
        for sub in st.subs.values_mut().filter(|s| s.cursor == next_seq) {
            sub.last_progress = now;
        }
        let len = data.len() as u64;
        let cost = len.max(MIN_CHUNK_COST);
        let chunk = Chunk { stream, data, pos: st.end_pos, cost, byte: st.end_byte };
        st.end_pos += cost;
        st.end_byte += len;
        st.chunks.push_back(chunk);
        st.trim(self.limits.tail);
        drop(st);
        self.data.notify_waiters();
    }

    /// Records the end; subscribers get it after the chunks they have not read yet.
    pub(crate) fn finish(&self, status: ExitStatus) {
        self.lock().end = Some(status);
        self.data.notify_waiters();
    }

    async fn next_for(&self, id: u64) -> Step {
        loop {
            let mut arrived = pin!(self.data.notified());
            arrived.as_mut().enable();
            if let Some(step) = self.try_next(id) {
                return step;
            }
            arrived.await;
        }
    }

    fn try_next(&self, id: u64) -> Option<Step> {
        let mut st = self.lock();
        let pid = st.pid;
        let next_seq = st.next_seq();
        let first_seq = st.first_seq;
        let sub = st.subs.get_mut(&id)?;
        if let Some(behind_bytes) = sub.evicted {
            return Some(Step::Evicted(SubscriptionError::Evicted { pid, behind_bytes }));
        }
        if sub.cursor < next_seq {
            let index = (sub.cursor - first_seq) as usize;
            sub.cursor += 1;
            sub.last_progress = Instant::now();
            let chunk = &st.chunks[index];
            let event = match chunk.stream {
                Stream::Stdout => Event::Stdout(chunk.data.clone()),
                Stream::Stderr => Event::Stderr(chunk.data.clone()),
                Stream::Pty => Event::Pty(chunk.data.clone()),
            };
            let evicted = st.enforce_window(self.limits.window);
            st.trim(self.limits.tail);
            drop(st);
            self.space.notify_waiters();
            if evicted {
                self.data.notify_waiters();
            }
            return Some(Step::Item(event));
        }
        st.end.clone().map(Step::End)
    }
}

/// One subscriber's view of a process's output. Each subscriber has its own bounded buffer.
pub struct Subscription {
    inner: Inner,
}

enum Inner {
    Live {
        log: Arc<OutputLog>,
        id: u64,
    },
    /// A process that had already finished: just its End.
    Ended(ExitStatus),
    Done,
}

impl Subscription {
    pub(crate) fn ended(status: ExitStatus) -> Self {
        Self { inner: Inner::Ended(status) }
    }

    /// Next event in order. Ends (None) after End was returned. Err when this subscriber was
    /// evicted for falling too far behind (explicit, never silent).
    ///
    /// Cancel-safe: dropping the future before it completes (e.g. in a `select!` with a
    /// keepalive timer) loses no event; the cursor only moves when an event is returned.
    pub async fn next(&mut self) -> Option<Result<Event, SubscriptionError>> {
        let step = match &self.inner {
            Inner::Done => return None,
            Inner::Ended(status) => Step::End(status.clone()),
            Inner::Live { log, id } => {
                let log = Arc::clone(log);
                log.next_for(*id).await
            }
        };
        match step {
            Step::Item(event) => Some(Ok(event)),
            Step::End(status) => {
                self.close();
                Some(Ok(Event::End(status)))
            }
            Step::Evicted(error) => {
                self.close();
                Some(Err(error))
            }
        }
    }

    fn close(&mut self) {
        if let Inner::Live { log, id } = std::mem::replace(&mut self.inner, Inner::Done) {
            log.unsubscribe(id);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits { window: 4 * MIN_CHUNK_COST, tail: 2 * MIN_CHUNK_COST, stall: Duration::from_secs(30) }
    }

    fn chunk(n: u8) -> Bytes {
        Bytes::from(vec![n; MIN_CHUNK_COST as usize])
    }

    fn exit0() -> ExitStatus {
        ExitStatus { exit_code: 0, exited: true, status: "exit status 0".into(), error: None }
    }

    async fn expect_chunk(sub: &mut Subscription, n: u8) {
        match sub.next().await {
            Some(Ok(Event::Stdout(b))) => assert_eq!(b[0], n),
            other => panic!("expected chunk {n}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn subscriber_sees_chunks_in_order_then_end() {
        let log = OutputLog::new(small());
        let mut sub = log.subscribe_at_tail();
        log.push(Stream::Stdout, chunk(1));
        log.push(Stream::Stderr, Bytes::from_static(b"e"));
        log.finish(exit0());
        expect_chunk(&mut sub, 1).await;
        assert!(matches!(sub.next().await, Some(Ok(Event::Stderr(b))) if &b[..] == b"e"));
        assert!(matches!(sub.next().await, Some(Ok(Event::End(_)))));
        assert!(sub.next().await.is_none());
    }

    #[tokio::test]
    async fn without_subscribers_only_the_tail_is_kept() {
        let log = OutputLog::new(small());
        for n in 0..10 {
            log.wait_for_space().await; // never blocks without subscribers
            log.push(Stream::Stdout, chunk(n));
        }
        let mut replay = log.subscribe_from_oldest();
        let mut late = log.subscribe_at_tail();
        log.push(Stream::Stdout, chunk(10));
        expect_chunk(&mut replay, 8).await;
        expect_chunk(&mut replay, 9).await;
        expect_chunk(&mut replay, 10).await;
        expect_chunk(&mut late, 10).await;
    }

    #[tokio::test]
    async fn a_progressing_subscriber_backpressures_the_pump() {
        let log = OutputLog::new(small());
        let mut sub = log.subscribe_at_tail();
        for n in 0..4 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
        }
        let blocked = tokio::time::timeout(Duration::from_millis(50), log.wait_for_space()).await;
        assert!(blocked.is_err(), "pump must wait for the only subscriber");
        expect_chunk(&mut sub, 0).await;
        tokio::time::timeout(Duration::from_secs(5), log.wait_for_space()).await.expect("progress frees space");
    }

    #[tokio::test]
    async fn a_laggard_is_evicted_explicitly_and_the_leader_is_unaffected() {
        let log = OutputLog::new(small());
        let mut fast = log.subscribe_at_tail();
        let mut slow = log.subscribe_at_tail();
        for n in 0..20u8 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
            expect_chunk(&mut fast, n).await;
        }
        match slow.next().await {
            Some(Err(SubscriptionError::Evicted { behind_bytes, .. })) => {
                assert!(behind_bytes > 4 * MIN_CHUNK_COST)
            }
            other => panic!("expected eviction, got {other:?}"),
        }
        assert!(slow.next().await.is_none());
        // The evicted subscriber no longer pins memory.
        assert!(log.lock().chunks.len() <= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_sole_subscriber_is_evicted_after_the_stall_timeout() {
        let log = OutputLog::new(small());
        let mut frozen = log.subscribe_at_tail();
        for n in 0..4 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
        }
        let started = Instant::now();
        log.wait_for_space().await; // auto-advances the paused clock to the stall deadline
        assert!(started.elapsed() >= small().stall);
        assert!(matches!(frozen.next().await, Some(Err(SubscriptionError::Evicted { .. }))));
    }

    #[tokio::test]
    async fn dropping_a_subscription_releases_the_pump() {
        let log = OutputLog::new(small());
        let sub = log.subscribe_at_tail();
        for n in 0..4 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
        }
        drop(sub);
        tokio::time::timeout(Duration::from_secs(5), log.wait_for_space())
            .await
            .expect("no subscriber left: never wait");
        assert!(log.lock().chunks.len() <= 2, "trimmed to the tail");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caught_up_subscriber_is_not_stalled_by_a_burst_after_silence() {
        let log = OutputLog::new(small());
        let _sub = log.subscribe_at_tail();
        // The process prints nothing for longer than the stall timeout; the subscriber waits.
        tokio::time::sleep(small().stall + Duration::from_secs(1)).await;
        for n in 0..4 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
        }
        let started = Instant::now();
        log.wait_for_space().await; // the paused clock jumps to the stall deadline
        assert!(started.elapsed() >= small().stall, "evicted without being given time to read");
    }

    #[tokio::test]
    async fn a_newcomer_does_not_get_a_steady_reader_evicted() {
        let log = OutputLog::new(small());
        let mut first = log.subscribe_at_tail();
        for n in 0..4 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
        }
        // The pump now waits for `first` (a full window behind the tail) when a second client
        // joins at the tail and reads everything at once.
        let mut second = log.subscribe_at_tail();
        for n in 4..12u8 {
            log.wait_for_space().await;
            log.push(Stream::Stdout, chunk(n));
            expect_chunk(&mut second, n).await;
            // `first` reads one chunk per chunk produced: it never falls further behind.
            expect_chunk(&mut first, n - 4).await;
        }
    }

    #[tokio::test]
    async fn output_nobody_can_read_is_not_kept() {
        let log = OutputLog::new(Limits::default());
        let mut sub = log.subscribe_at_tail();
        for _ in 0..64 {
            log.push(Stream::Stdout, Bytes::from(vec![b'x'; 64 * 1024]));
            assert!(matches!(sub.next().await, Some(Ok(Event::Stdout(_)))));
        }
        assert!(log.lock().chunks.is_empty(), "chunks held after every subscriber read everything");
        // A replayed process keeps its tail for later subscribers.
        let replayed = OutputLog::new(Limits::default().with_replay_tail());
        replayed.push(Stream::Stdout, Bytes::from_static(b"boot log"));
        let mut late = replayed.subscribe_from_oldest();
        assert!(matches!(late.next().await, Some(Ok(Event::Stdout(b))) if &b[..] == b"boot log"));
    }

    #[test]
    fn subscription_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let log = OutputLog::new(small());
        let mut sub = log.subscribe_at_tail();
        assert_send(&sub.next());
    }
}
