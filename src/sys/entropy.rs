//! Mixing host-supplied bytes into the kernel's entropy pool (`/init` `entropy`): guests
//! restored from one snapshot would otherwise share their RNG state.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `struct rand_pool_info` from <linux/random.h>, with room for the bytes after the header.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: nix::libc::c_int,
    buf_size: nix::libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

/// Largest entropy payload accepted per call (the kernel's pool is 256 bytes; more adds nothing).
pub const MAX_ENTROPY: usize = 512;

// RNDADDENTROPY = _IOW('R', 0x03, int[2])
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, 2 * size_of::<nix::libc::c_int>()),
    RandPoolInfo
);

/// Adds `bytes` to the pool and credits them as entropy (RNDADDENTROPY; needs CAP_SYS_ADMIN).
pub fn add(bytes: &[u8]) -> std::io::Result<()> {
    let bytes = &bytes[..bytes.len().min(MAX_ENTROPY)];
    let mut info = RandPoolInfo {
        entropy_count: (bytes.len() * 8) as nix::libc::c_int,
        buf_size: bytes.len() as nix::libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    let random = OpenOptions::new().write(true).open("/dev/random")?;
    // SAFETY: `info` is a valid, initialized rand_pool_info whose buf_size does not exceed the
    // bytes that follow its header; the fd is open for the duration of the call.
    unsafe { rnd_add_entropy(random.as_raw_fd(), &info) }.map(drop).map_err(std::io::Error::from)
}

#[cfg(test)]
#[allow(clippy::print_stdout, reason = "a skipped check says why on stdout")]
mod tests {
    #[test]
    fn entropy_is_accepted_when_privileged() {
        match super::add(&[7u8; 64]) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(nix::libc::EPERM) => {
                println!("SKIPPED: RNDADDENTROPY needs CAP_SYS_ADMIN")
            }
            Err(err) => panic!("RNDADDENTROPY failed: {err}"),
        }
    }
}
