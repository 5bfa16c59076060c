//! The VM side's record of the requests awaiting a reply, which is how a
//! reply for a tag never sent is caught.

use std::collections::HashMap;

use super::{Reply, Request};
use crate::error::WireError;

/// Non-posted requests sent and not yet answered, by tag; also hands out
/// fresh tags.
#[derive(Debug, Clone, Default)]
pub struct InFlight {
    pending: HashMap<u32, Request>,
    next_tag: u32,
}

impl InFlight {
    /// Nothing in flight; tags start at 0.
    pub fn new() -> InFlight {
        InFlight::default()
    }

    /// A tag not in flight: the next in sequence (wrapping), skipping tags
    /// still awaiting a reply.
    pub fn next_tag(&mut self) -> u32 {
        loop {
            let tag = self.next_tag;
            self.next_tag = self.next_tag.wrapping_add(1);
            if !self.pending.contains_key(&tag) {
                return tag;
            }
        }
    }

    /// Record `request` as sent. Posted writes are not recorded: no reply
    /// will come for them.
    ///
    /// # Errors
    ///
    /// [`WireError::DuplicateTag`] if a request with the same tag awaits
    /// its reply (nothing is recorded then).
    pub fn track(&mut self, request: &Request) -> Result<(), WireError> {
        if !request.expects_reply() {
            return Ok(());
        }
        let tag = request.tag();
        if self.pending.contains_key(&tag) {
            return Err(WireError::DuplicateTag { tag });
        }
        self.pending.insert(tag, *request);
        Ok(())
    }

    /// Match `reply` to its request and forget the request.
    ///
    /// # Errors
    ///
    /// [`WireError::UnknownTag`] for a reply to a tag never sent (or posted,
    /// or already answered); [`WireError::ReplyMismatch`] if it answers
    /// another operation; [`WireError::ReplySizeMismatch`] if a read reply
    /// has another size than the read.
    pub fn complete(&mut self, reply: &Reply) -> Result<Request, WireError> {
        let tag = reply.tag();
        let request = self.pending.remove(&tag).ok_or(WireError::UnknownTag { tag })?;
        if request.op() != reply.op() {
            return Err(WireError::ReplyMismatch { tag, request: request.op(), reply: reply.op() });
        }
        if let (Request::Read { size, .. }, Reply::Read { size: got, .. }) = (request, reply) {
            if size != *got {
                return Err(WireError::ReplySizeMismatch { tag, request: size, reply: *got });
            }
        }
        Ok(request)
    }

    /// Number of requests awaiting a reply.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no request awaits a reply.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioregion::{AccessSize, Space};

    fn read(tag: u32, size: AccessSize) -> Request {
        Request::Read { tag, space: Space::Mmio, offset: 0, size }
    }

    fn write(tag: u32, posted: bool) -> Request {
        Request::Write { tag, space: Space::Mmio, offset: 0, size: AccessSize::Byte, data: 1, posted }
    }

    #[test]
    fn reply_completes_its_request_once() {
        let mut f = InFlight::new();
        let tag = f.next_tag();
        f.track(&read(tag, AccessSize::Word)).unwrap();
        assert_eq!(f.len(), 1);
        let reply = Reply::Read { tag, size: AccessSize::Word, data: 7 };
        assert_eq!(f.complete(&reply).unwrap(), read(tag, AccessSize::Word));
        assert!(f.is_empty());
        assert!(matches!(f.complete(&reply), Err(WireError::UnknownTag { tag: t }) if t == tag));
    }

    #[test]
    fn reply_for_tag_never_sent_is_rejected() {
        let mut f = InFlight::new();
        let err = f.complete(&Reply::Sync { tag: 42 }).unwrap_err();
        assert!(matches!(err, WireError::UnknownTag { tag: 42 }));
    }

    #[test]
    fn posted_writes_expect_no_reply() {
        let mut f = InFlight::new();
        f.track(&write(3, true)).unwrap();
        assert!(f.is_empty());
        assert!(matches!(f.complete(&Reply::Write { tag: 3 }), Err(WireError::UnknownTag { tag: 3 })));
    }

    #[test]
    fn duplicate_tag_is_refused() {
        let mut f = InFlight::new();
        f.track(&write(9, false)).unwrap();
        assert!(matches!(f.track(&read(9, AccessSize::Byte)), Err(WireError::DuplicateTag { tag: 9 })));
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn mismatched_replies_are_rejected() {
        let mut f = InFlight::new();
        f.track(&read(1, AccessSize::Dword)).unwrap();
        assert!(matches!(
            f.complete(&Reply::Write { tag: 1 }),
            Err(WireError::ReplyMismatch {
                tag: 1,
                request: crate::ioregion::Op::Read,
                reply: crate::ioregion::Op::Write
            })
        ));
        f.track(&read(2, AccessSize::Dword)).unwrap();
        let wrong_size = Reply::Read { tag: 2, size: AccessSize::Byte, data: 0 };
        assert!(matches!(f.complete(&wrong_size), Err(WireError::ReplySizeMismatch { tag: 2, .. })));
    }

    #[test]
    fn next_tag_skips_tags_in_flight_and_wraps() {
        let mut f = InFlight::new();
        f.track(&read(0, AccessSize::Byte)).unwrap();
        f.track(&read(1, AccessSize::Byte)).unwrap();
        assert_eq!(f.next_tag(), 2);
        f.next_tag = u32::MAX;
        assert_eq!(f.next_tag(), u32::MAX);
        assert_eq!(f.next_tag(), 2);
    }
}
