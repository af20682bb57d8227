//! What PID 1 does to the machine: mount the API filesystems, signal every process, power off.

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Mounts `fstype` at `target` (creating the directory) with `flags` and `data`.
pub fn mount_fs(fstype: &str, target: &Path, flags: MsFlags, data: Option<&str>) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(std::io::Error::from)
}

/// Sends `signal` to every process this PID namespace's init may signal (kill(-1)): everything
/// but init itself.
pub fn signal_all(signal: Signal) -> std::io::Result<()> {
    match kill(Pid::from_raw(-1), signal) {
        // ESRCH: there is no other process left.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Flushes filesystems and powers the machine off. Returns only on failure.
pub fn power_off() -> std::io::Error {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Err(err) => err.into(),
    }
}
