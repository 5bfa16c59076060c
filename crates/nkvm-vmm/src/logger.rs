//! The VMM's log: one line per record on stderr, prefixed `nkvm:` and the
//! level, so a device model's warning (a bad access, a failed request)
//! reaches the operator. `NKVM_LOG=debug` (or `info`, `trace`, `off`)
//! changes the level; the default is `warn`.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLog;

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            // One write per line, so lines of several threads stay whole.
            let line = format!("nkvm: {}: {}\n", record.level().as_str().to_lowercase(), record.args());
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

/// The level `NKVM_LOG` names, or `warn`.
fn level(setting: Option<&str>) -> LevelFilter {
    setting.and_then(|s| s.trim().parse().ok()).unwrap_or(LevelFilter::Warn)
}

/// Installs the logger (once; a second call changes nothing).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level(std::env::var("NKVM_LOG").ok().as_deref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_comes_from_nkvm_log_or_is_warn() {
        assert_eq!(level(None), LevelFilter::Warn);
        assert_eq!(level(Some("debug")), LevelFilter::Debug);
        assert_eq!(level(Some("off")), LevelFilter::Off);
        assert_eq!(level(Some("nonsense")), LevelFilter::Warn);
    }
}
