//! A guest access over a socket region in the sizes the wire carries:
//! KVM splits an access that crosses a page into pieces of 3, 5, 6 or 7
//! bytes, which go as the 1-, 2- and 4-byte accesses that make them up.

use nkvm_wire::ioregion::{AccessSize, Client};
use nkvm_wire::spin::SpinStream;
use nkvm_wire::WireError;

/// One access of `size` bytes (1 to 8) over a socket region. The wire
/// carries 1, 2, 4 and 8 bytes; KVM splits an access that crosses a page
/// into pieces of 3, 5, 6 or 7 bytes, which go as consecutive accesses
/// of the sizes that make them up, lowest address first (the value
/// little-endian across them, as the CPU's own split would be).
pub(super) fn socket_access(
    c: &mut Client<SpinStream, SpinStream>,
    offset: u64,
    size: u8,
    write: Option<u64>,
    posted: bool,
) -> Result<u64, WireError> {
    if let Ok(access) = AccessSize::from_bytes(u64::from(size)) {
        return match write {
            Some(data) if posted => c.post(offset, access, data).map(|_| 0),
            Some(data) => c.write(offset, access, data).map(|_| 0),
            None => c.read(offset, access),
        };
    }
    let (mut value, mut done) = (0u64, 0u8);
    while done < size.min(8) {
        let piece = [4u8, 2, 1].into_iter().find(|&p| p <= size - done).unwrap_or(1);
        let access = AccessSize::from_bytes(u64::from(piece))?;
        let at = offset + u64::from(done);
        let shift = 8 * u32::from(done);
        match write {
            Some(data) if posted => c.post(at, access, data >> shift)?,
            Some(data) => c.write(at, access, data >> shift)?,
            None => value |= c.read(at, access)? << shift,
        }
        done += piece;
    }
    Ok(value)
}
