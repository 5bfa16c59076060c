//! The device side of the I/O-region protocol against real sockets.

use std::thread;

use nkvm_wire::ioregion::{read_frame, write_frame, AccessSize, Client, Space};

use super::*;

const REGION: RegionInfo = RegionInfo { id: 7, space: Space::Pio, base: 0x3f8, len: 0x10 };

/// 16 bytes of memory and a log of (write?, offset, data).
#[derive(Debug, Default)]
struct Memory {
    bytes: [u8; 16],
    log: Vec<(bool, u64, Vec<u8>)>,
}

impl IoDevice for Memory {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        data.copy_from_slice(&self.bytes[at..at + data.len()]);
        self.log.push((false, offset, data.to_vec()));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.log.push((true, offset, data.to_vec()));
    }

    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.bytes.repeat(3))
    }

    fn load_state(&mut self, state: &[u8]) -> Option<Result<(), String>> {
        match state.len() {
            48 => {
                self.bytes.copy_from_slice(&state[..16]);
                Some(Ok(()))
            }
            n => Some(Err(format!("a memory state is 48 bytes, not {n}"))),
        }
    }
}

/// A device with no saved state.
struct Stateless;

impl IoDevice for Stateless {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[test]
fn a_state_request_is_answered_after_the_writes_before_it() {
    let (vm, server) = spawn_server();
    let mut c = Client::over(vm, REGION).unwrap();
    assert_eq!(c.handshake().version, 2);
    c.post(0, AccessSize::Qword, 0x0807_0605_0403_0201).unwrap();
    c.post(15, AccessSize::Byte, 0xee).unwrap();
    let state = c.save_state().unwrap();
    assert_eq!(state.len(), 48, "two chunks of 32 and 16 bytes");
    assert_eq!(state[..8], [1, 2, 3, 4, 5, 6, 7, 8], "the posted writes are in the state");
    assert_eq!(state[15], 0xee);
    assert_eq!(c.read(15, AccessSize::Byte).unwrap(), 0xee, "the stream goes on after the state");
    drop(c);
    let (_, result) = server.join().unwrap();
    assert_eq!(result.unwrap().states, 1);

    // A model without state says so; the connection goes on.
    let (vm, dev) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || serve(dev, &mut Stateless));
    let mut c = Client::over(vm, REGION).unwrap();
    assert_eq!(c.save_state().unwrap_err().to_string(), "the device model has no saved state");
    assert_eq!(c.read(0, AccessSize::Byte).unwrap(), 0);
    drop(c);
    assert_eq!(server.join().unwrap().unwrap().states, 1);
}

#[test]
fn a_state_is_taken_or_refused_with_the_models_reason() {
    let (vm, server) = spawn_server();
    let mut c = Client::over(vm, REGION).unwrap();
    c.post(0, AccessSize::Qword, u64::MAX).unwrap();
    let state: Vec<u8> = (1..=16u8).cycle().take(48).collect();
    c.load_state(&state).unwrap();
    assert_eq!(c.read(0, AccessSize::Qword).unwrap(), 0x0807_0605_0403_0201, "the state replaced the write");
    let err = c.load_state(&[0; 70]).unwrap_err().to_string();
    assert_eq!(err, "the device model refused the state: a memory state is 48 bytes, not 70");
    assert_eq!(c.read(15, AccessSize::Byte).unwrap(), 16, "a refused state changes nothing");
    drop(c);
    assert_eq!(server.join().unwrap().1.unwrap().loads, 2);

    let (vm, dev) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || serve(dev, &mut Stateless));
    let mut c = Client::over(vm, REGION).unwrap();
    assert_eq!(c.load_state(&[1, 2, 3]).unwrap_err().to_string(), "the device model has no saved state");
    assert_eq!(c.read(0, AccessSize::Byte).unwrap(), 0);
    drop(c);
    assert_eq!(server.join().unwrap().unwrap().loads, 1);
}

#[test]
fn version_1_has_no_state_transfer_on_either_side() {
    // A device speaking only version 1: the client does not ask.
    let (vm, dev) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let writer = dev.try_clone().unwrap();
        Server::handshake(dev, writer, VersionRange::CURRENT).unwrap().serve(&mut Memory::default())
    });
    let mut c = Client::over(vm, REGION).unwrap();
    let err = c.save_state().unwrap_err().to_string();
    assert_eq!(err, "the device speaks version 1 of the I/O-region protocol; state transfer needs version 2");
    drop(c);
    assert_eq!(server.join().unwrap().unwrap().states, 0);

    // A VM side that agreed on version 1 and asks all the same is dropped.
    let request = nkvm_wire::ioregion::StateRequest { tag: 1 }.encode();
    let (result, _) = serve_raw(&request);
    assert!(matches!(result, Err(WireError::StateNotInVersion { version: 1 })), "{result:?}");
}

/// Serve a `Memory` on one end of a socketpair in a thread.
/// The server thread: the device it served and how serving ended.
type ServerThread = thread::JoinHandle<(Memory, Result<ServeStats, WireError>)>;

fn spawn_server() -> (UnixStream, ServerThread) {
    let (vm, dev) = UnixStream::pair().unwrap();
    let handle = thread::spawn(move || {
        let mut memory = Memory::default();
        let result = serve(dev, &mut memory);
        (memory, result)
    });
    (vm, handle)
}

/// Handshake by hand; returns the two halves of the VM side.
fn vm_side(vm: UnixStream) -> (UnixStream, UnixStream) {
    let mut w = vm.try_clone().unwrap();
    ioregion::vm_handshake(&mut &vm, &mut w, REGION, VersionRange::CURRENT).unwrap();
    (vm, w)
}

#[test]
fn serves_reads_writes_posted_writes_and_syncs() {
    let (vm, server) = spawn_server();
    let vm_thread = thread::spawn(move || {
        let mut c = Client::over(vm, REGION).unwrap();
        c.post(0, AccessSize::Dword, 0x4433_2211).unwrap();
        c.post(4, AccessSize::Byte, 0x55).unwrap();
        c.write(8, AccessSize::Qword, 0x0807_0605_0403_0201).unwrap();
        let value = c.read(2, AccessSize::Word).unwrap();
        c.post(15, AccessSize::Byte, 0xff).unwrap();
        c.sync().unwrap();
        value
    });
    assert_eq!(vm_thread.join().unwrap(), 0x4433);
    let (memory, result) = server.join().unwrap();
    assert_eq!(result.unwrap(), ServeStats { reads: 1, writes: 1, posted_writes: 3, syncs: 1, states: 0, loads: 0 });
    assert_eq!(memory.bytes[..5], [0x11, 0x22, 0x33, 0x44, 0x55]);
    assert_eq!(memory.bytes[15], 0xff);
    let order: Vec<_> = memory.log.iter().map(|(w, off, _)| (*w, *off)).collect();
    assert_eq!(order, [(true, 0), (true, 4), (true, 8), (false, 2), (true, 15)]);
}

#[test]
fn posted_writes_are_never_answered_and_batches_are_served_in_order() {
    let (vm, server) = spawn_server();
    let (mut r, mut w) = vm_side(vm);
    let mut burst = Vec::new();
    for i in 0..200u32 {
        let request = Request::Write {
            tag: i,
            space: Space::Pio,
            offset: u64::from(i % 16),
            size: AccessSize::Byte,
            data: u64::from(i as u8),
            posted: true,
        };
        burst.extend_from_slice(&request.encode());
    }
    for tag in 200..210 {
        let read = Request::Read { tag, space: Space::Pio, offset: 0, size: AccessSize::Qword };
        burst.extend_from_slice(&read.encode());
    }
    w.write_all(&burst).unwrap();
    for tag in 200..210 {
        let reply = read_frame(&mut r).unwrap();
        // Byte i of the memory was last written by write 192 + i.
        let expected = u64::from_le_bytes([192, 193, 194, 195, 196, 197, 198, 199]);
        assert_eq!(reply, Some(IoFrame::Reply(Reply::Read { tag, size: AccessSize::Qword, data: expected })));
    }
    drop((r, w));
    let (_, result) = server.join().unwrap();
    assert_eq!(result.unwrap().posted_writes, 200);
}

/// Send `bytes` after the handshake; return what the server said and
/// what the device saw.
fn serve_raw(bytes: &[u8]) -> (Result<ServeStats, WireError>, Memory) {
    let (vm, server) = spawn_server();
    let (r, mut w) = vm_side(vm);
    w.write_all(bytes).unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let (memory, result) = server.join().unwrap();
    drop(r);
    (result, memory)
}

#[test]
fn access_outside_the_region_is_refused_without_touching_the_device() {
    let request =
        Request::Write { tag: 1, space: Space::Pio, offset: 0xf, size: AccessSize::Word, data: 0xffff, posted: true };
    let (result, memory) = serve_raw(&request.encode());
    let err = result.unwrap_err();
    assert!(matches!(err, WireError::OutsideRegion { offset: 0xf, .. }), "{err}");
    assert!(memory.log.is_empty());
}

#[test]
fn malformed_requests_end_the_connection_with_a_named_error() {
    let read = Request::Read { tag: 1, space: Space::Pio, offset: 0, size: AccessSize::Byte }.encode();
    let mut bad_size = read;
    bad_size[10] = 3;
    let mut bad_op = read;
    bad_op[8] = 9;
    let mut oversized = read;
    oversized[4..8].copy_from_slice(&0x1000_0000u32.to_le_bytes());
    let mut mmio = read;
    mmio[9] = Space::Mmio.code();
    let cases: [(&[u8], &str); 6] = [
        (&bad_size, "access size 3 is not 1, 2, 4 or 8"),
        (&bad_op, "unknown op 9"),
        (&oversized, "oversized frame"),
        (&read[..20], "short read"),
        (&mmio, "MMIO request on a PIO region"),
        (&Reply::Sync { tag: 1 }.encode(), "unexpected reply frame"),
    ];
    for (bytes, message) in cases {
        let (result, memory) = serve_raw(bytes);
        let err = result.unwrap_err();
        assert!(err.to_string().contains(message), "{err} / {message}");
        assert!(memory.log.is_empty());
    }
}

#[test]
fn a_request_before_the_handshake_is_refused() {
    let (vm, server) = spawn_server();
    let request = Request::Sync { tag: 0 };
    write_frame(&mut &vm, &IoFrame::Request(request)).unwrap();
    let (_, result) = server.join().unwrap();
    assert!(matches!(result, Err(WireError::UnexpectedFrame { expected: "hello", found: "request" })));
}

#[test]
fn accept_serves_a_connection_on_a_path() {
    let dir = std::env::temp_dir().join(format!("nkvm-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("region.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let vm_thread = thread::spawn(move || {
        let mut c = Client::over(UnixStream::connect(&path).unwrap(), REGION).unwrap();
        c.write(1, AccessSize::Byte, 0x42).unwrap();
        c.read(1, AccessSize::Byte).unwrap()
    });
    let mut server = Server::accept(&listener).unwrap();
    assert_eq!(*server.region(), REGION);
    assert_eq!(server.version(), 2);
    let mut memory = Memory::default();
    let stats = server.serve(&mut memory).unwrap();
    assert_eq!(vm_thread.join().unwrap(), 0x42);
    assert_eq!((stats.reads, stats.writes), (1, 1));
    let _ = std::fs::remove_dir_all(&dir);
}
