//! Setting the wall clock (`/init` steps it after a snapshot restore).

use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

/// Steps CLOCK_REALTIME to `to`. Needs CAP_SYS_TIME.
pub fn set_realtime(to: SystemTime) -> std::io::Result<()> {
    let since = to.duration_since(UNIX_EPOCH).map_err(|_| std::io::Error::other("time before 1970"))?;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::from_duration(since)).map_err(std::io::Error::from)
}
