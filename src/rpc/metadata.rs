//! Request headers with protocol meaning: `grpc-timeout` (Connect's `Connect-Timeout-Ms` arrives
//! here translated by `crate::connect`) and envd's `Keepalive-Ping-Interval`, and the keepalive
//! stream both server streams (Start/Connect, WatchDir) are sent as.

use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// Keepalive interval when the client sends none or an unusable one (envd's default).
pub(crate) const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Longest keepalive interval honoured; larger values are clamped to it. A day is "never" for
/// any stream, and the timer's deadline stays far from the end of the clock (an `i64::MAX`
/// seconds interval used to overflow `Instant` and abort guestd).
pub(crate) const MAX_KEEPALIVE: Duration = Duration::from_secs(24 * 60 * 60);

/// The request deadline from `grpc-timeout` (Connect's `Connect-Timeout-Ms` arrives translated),
/// parsed by the same function the deadline layer enforces it with.
pub(crate) fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let value = http::HeaderValue::from_bytes(md.get("grpc-timeout")?.as_bytes()).ok()?;
    crate::connect::parse_grpc_timeout(&value)
}

/// `Keepalive-Ping-Interval` in whole seconds. Missing, junk, zero or negative values give the
/// default (envd crashes on <= 0; we do not); values above [`MAX_KEEPALIVE`] are clamped to it.
pub(crate) fn keepalive_interval(md: &MetadataMap) -> Duration {
    md.get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|s| *s > 0)
        .map_or(DEFAULT_KEEPALIVE, |s| Duration::from_secs(s.unsigned_abs()).min(MAX_KEEPALIVE))
}

/// The keepalive timer of a stream: first tick one `period` from now, and a late tick never
/// bursts (the timer restarts after every data event; see `reset`).
pub(crate) fn keepalive_ticker(period: Duration) -> tokio::time::Interval {
    let period = period.min(MAX_KEEPALIVE);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// What one item of a domain event stream becomes on the wire.
pub(crate) enum Step<M> {
    /// A message; the stream goes on (and the keepalive timer restarts).
    Next(M),
    /// The stream's last item: a final message or the error that ends it.
    Last(Result<M, Status>),
}

/// A server stream as envd sends them: `start`, then each domain event as `step` maps it, with
/// `keepalive()` whenever `period` passes without a message; the timer restarts after every
/// [`Step::Next`]. Ends after a [`Step::Last`] or when `events` ends.
pub(crate) fn with_keepalives<S, F, M>(
    start: M,
    events: S,
    period: Duration,
    keepalive: fn() -> M,
    step: F,
) -> impl Stream<Item = Result<M, Status>>
where
    S: Stream,
    F: FnMut(S::Item) -> Step<M>,
{
    enum State<S, F, M> {
        Start(M, S, F),
        Running(S, tokio::time::Interval, F),
        Done,
    }
    futures_util::stream::unfold(State::Start(start, Box::pin(events), step), move |state| async move {
        match state {
            State::Start(start, events, step) => {
                Some((Ok(start), State::Running(events, keepalive_ticker(period), step)))
            }
            State::Running(mut events, mut ticks, mut step) => tokio::select! {
                biased;
                next = events.next() => match next.map(&mut step) {
                    Some(Step::Next(message)) => {
                        ticks.reset();
                        Some((Ok(message), State::Running(events, ticks, step)))
                    }
                    Some(Step::Last(last)) => Some((last, State::Done)),
                    None => None,
                },
                _ = ticks.tick() => Some((Ok(keepalive()), State::Running(events, ticks, step))),
            },
            State::Done => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(key: &'static str, value: &'static str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(key, value.parse().unwrap());
        m
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(grpc_timeout(&md("grpc-timeout", "60000m")), Some(Duration::from_secs(60)));
        assert_eq!(grpc_timeout(&md("grpc-timeout", "2S")), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout(&md("grpc-timeout", "1H")), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout(&md("grpc-timeout", "5n")), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1S"] {
            assert_eq!(grpc_timeout(&md("grpc-timeout", bad)), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }

    #[test]
    fn keepalive_defaults_on_junk() {
        assert_eq!(keepalive_interval(&md("keepalive-ping-interval", "50")), Duration::from_secs(50));
        for bad in ["0", "-5", "soon", ""] {
            assert_eq!(keepalive_interval(&md("keepalive-ping-interval", bad)), DEFAULT_KEEPALIVE, "{bad}");
        }
        assert_eq!(keepalive_interval(&MetadataMap::new()), DEFAULT_KEEPALIVE);
    }

    #[tokio::test]
    async fn huge_keepalive_intervals_are_clamped_not_fatal() {
        let huge = md("keepalive-ping-interval", "9223372036854775807");
        assert_eq!(keepalive_interval(&huge), MAX_KEEPALIVE);
        // The ticker's first deadline is computed at once: it used to overflow `Instant`.
        let ticker = keepalive_ticker(Duration::MAX);
        assert_eq!(ticker.period(), MAX_KEEPALIVE);
    }
}
