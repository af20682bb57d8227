//! Loading a kernel module from a `.ko` file (`finit_module(2)`), for guestd as PID 1 of a
//! distro kernel that has the vsock transport as modules and no other init to load them.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

/// What [`load`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    Now,
    /// The kernel already had it (loaded earlier, or built in): nothing to do.
    Already,
}

/// Loads the module in `path` (an uncompressed `.ko`; unpack a `.ko.xz` first) with no
/// parameters. Errors say whether the file or the kernel refused.
pub fn load(path: &Path) -> io::Result<Loaded> {
    let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("cannot open the file: {e}")))?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) => Ok(Loaded::Now),
        Err(Errno::EEXIST) => Ok(Loaded::Already),
        // The kernel says ENOENT when a symbol the module needs is not loaded.
        Err(Errno::ENOENT) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the kernel refused it: a symbol it needs is missing (load the modules it depends on first)",
        )),
        Err(errno) => Err(io::Error::new(io::Error::from(errno).kind(), format!("the kernel refused it: {errno}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_module_is_refused_with_the_kernels_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-module.ko");
        std::fs::write(&path, b"definitely not an ELF object").unwrap();
        // ENOEXEC for a bad image; EPERM without CAP_SYS_MODULE or where loading is disabled;
        // ENOSYS on a kernel without module support (this CI machine's): an error in every case,
        // never a silent success. The micro-VM tier loads real modules.
        let result = load(&path);
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn a_missing_file_names_the_cause() {
        let err = load(Path::new("/nonexistent/guestd/vsock.ko")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().starts_with("cannot open the file: "), "{err}");
    }
}
