//! Logging of accesses a device cannot serve (unknown offset, wrong size,
//! a write to a read-only register): the first one of each device at warn
//! level, so a VMM missing a device or a guest poking the wrong port shows
//! up in the log, and every later one at debug level, so a guest looping on
//! a bad access cannot flood it.

use std::fmt;

/// Remembers whether its device has already warned about a bad access.
#[derive(Debug, Clone, Default)]
pub(crate) struct BadAccessLog {
    warned: bool,
}

impl BadAccessLog {
    /// Log one bad access of `device`, described by `what`.
    pub(crate) fn log(&mut self, device: &str, what: fmt::Arguments<'_>) {
        if self.warned {
            log::debug!("{device}: {what}");
        } else {
            self.warned = true;
            log::warn!("{device}: {what} (later bad accesses are logged at debug level)");
        }
    }

    /// Log a read of `len` bytes at `offset` that the device cannot serve.
    pub(crate) fn read(&mut self, device: &str, offset: u64, len: usize) {
        self.log(device, format_args!("bad read of {len} bytes at offset {offset:#x}"));
    }

    /// Log a write of `data` at `offset` that the device ignores.
    pub(crate) fn write(&mut self, device: &str, offset: u64, data: &[u8]) {
        self.log(device, format_args!("ignored write of {data:02x?} at offset {offset:#x}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_bad_access_warns() {
        let mut log = BadAccessLog::default();
        assert!(!log.warned);
        log.read("dev", 4, 2);
        assert!(log.warned);
        log.write("dev", 5, &[1]);
        assert!(log.warned, "stays at debug level");
    }
}
