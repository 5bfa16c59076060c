//! isa-debug-exit's [`Snapshot`]: the device holds no state (each write
//! reports at once), so its body is empty; the blob still carries the name
//! and a version, so a machine's device set is checked whole and a later
//! format can add fields.
//!
//! Body, format version 1: empty.

use super::DebugExit;
use crate::snapshot::stateless_snapshot;

stateless_snapshot!(DebugExit, "isa-debug-exit");

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;
    use crate::power::PowerEvent;
    use crate::snapshot::Snapshot;
    use crate::IoDevice;

    #[test]
    fn the_empty_state_round_trips_and_the_device_still_reports() {
        let (tx, rx) = channel();
        let blob = DebugExit::new(channel().0).snapshot();
        let mut copy = DebugExit::new(tx);
        copy.restore(&blob).unwrap();
        copy.write(0, &[1]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::TestExit { status: 3 }));
        crate::snapshot::check::refuses_damage(&blob, || DebugExit::new(channel().0));
        assert!(copy.restore(&[blob, vec![0]].concat()).is_err(), "a byte past the CRC");
    }
}
