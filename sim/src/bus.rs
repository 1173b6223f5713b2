//! A virtual CAN bus shared by simulators and taps, also across processes.
//!
//! A bus is a folder, `<root>/<name>/`, holding one Unix datagram socket per member, named
//! `<pid>-<random>.sock`. The root is `$DONGLE_SIM_BUS_DIR`, else
//! `$XDG_RUNTIME_DIR/dongle-sim-bus`, else `/tmp/dongle-sim-bus`. A member sends each datagram
//! to every other member over a socket connected to that member, so that a full receive queue
//! makes the sender wait (up to [`SEND_TIMEOUT`], then the datagram is counted lost for that
//! member) instead of failing at once. One sender's datagrams reach each receiver in the order
//! sent. Membership is re-read from the folder every [`REFRESH_INTERVAL`] and after a failed
//! send; a socket file nobody listens on any more (its process died) is removed when found.
//!
//! A datagram is `"DSB1"` followed by up to [`MAX_FRAMES_PER_DATAGRAM`] CAN_BATCH records (the
//! record layout of `firmware_proto::ext::batch`), which keeps the datagram count low: Linux
//! queues only a few datagrams per socket by default.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use firmware_proto::ext::CanRecord;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::frame::Frame;

/// How long a send to one member may wait for room in its queue.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(200);
/// How often membership is re-read.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(200);
/// Frames packed into one datagram at most.
pub const MAX_FRAMES_PER_DATAGRAM: usize = 32;
/// Members a sender keeps track of at most.
pub const MAX_MEMBERS: usize = 64;
const MAGIC: &[u8; 4] = b"DSB1";
const MAX_DATAGRAM: usize = MAGIC.len() + MAX_FRAMES_PER_DATAGRAM * (14 + 64);

/// Why a bus could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The name has characters other than letters, digits, `-`, `_` and `.`, or is too long.
    #[error("invalid bus name {0:?}: use 1 to 32 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// The folder or socket could not be made.
    #[error("bus {path}: {source}")]
    Io {
        /// The folder or socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// The folder that holds the bus folders.
pub fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("DONGLE_SIM_BUS_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("dongle-sim-bus"),
        None => PathBuf::from("/tmp/dongle-sim-bus"),
    }
}

fn check_name(name: &str) -> Result<(), BusError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(BusError::InvalidName(name.into()))
    }
}

/// Encodes up to [`MAX_FRAMES_PER_DATAGRAM`] frames; returns how many it took.
fn encode_datagram(frames: &[Frame], out: &mut Vec<u8>) -> usize {
    out.clear();
    out.extend_from_slice(MAGIC);
    let mut taken = 0;
    let mut record = [0u8; 14 + 64];
    for frame in frames.iter().take(MAX_FRAMES_PER_DATAGRAM) {
        // The loopback bit describes a frame's way back to its own host, not the bus.
        let frame = frame.with_origin(frame.is_simulated(), false);
        if let Ok(n) = frame.to_record(0).encode(&mut record) {
            out.extend_from_slice(record.get(..n).unwrap_or(&[]));
            taken += 1;
        }
    }
    taken
}

/// Decodes a datagram; `None` when it is not a bus datagram or a record is malformed.
fn decode_datagram(mut bytes: &[u8], out: &mut VecDeque<Frame>) -> Option<()> {
    bytes = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut frames = Vec::new();
    while !bytes.is_empty() && frames.len() < MAX_FRAMES_PER_DATAGRAM {
        let (record, used) = CanRecord::decode(bytes).ok()?;
        frames.push(Frame::from_record(&record));
        bytes = bytes.get(used..)?;
    }
    if !bytes.is_empty() {
        return None;
    }
    out.extend(frames);
    Some(())
}

/// The receiving socket of one member; its file is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct Endpoint {
    socket: UnixDatagram,
    file: SocketFile,
    dir: PathBuf,
}

/// A member's socket file, removed when it is dropped so that senders stop finding the member.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Endpoint {
    /// Binds a new member socket in the bus folder.
    pub(crate) fn bind(root: &Path, name: &str) -> Result<Self, BusError> {
        check_name(name)?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| BusError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join(format!(
            "{}-{:016x}.sock",
            std::process::id(),
            rand::random::<u64>()
        ));
        let socket = UnixDatagram::bind(&path).map_err(|source| BusError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            socket,
            file: SocketFile(path),
            dir,
        })
    }

    /// Waits for the next datagram and appends its frames to `out`; returns false for a
    /// datagram that was not a valid bus datagram (it is skipped).
    pub(crate) async fn recv(&self, out: &mut VecDeque<Frame>) -> io::Result<bool> {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        let n = self.socket.recv(&mut buf).await?;
        Ok(n <= MAX_DATAGRAM && decode_datagram(buf.get(..n).unwrap_or(&[]), out).is_some())
    }

    pub(crate) fn peers(&self) -> Peers {
        Peers {
            dir: self.dir.clone(),
            own: self.file.0.clone(),
            members: Vec::new(),
            refreshed: None,
        }
    }
}

struct Member {
    path: PathBuf,
    socket: UnixDatagram,
}

/// The other members of a bus, as seen by one sender.
pub(crate) struct Peers {
    dir: PathBuf,
    own: PathBuf,
    members: Vec<Member>,
    refreshed: Option<Instant>,
}

/// What one send achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Members the datagram reached.
    pub delivered: usize,
    /// Members it did not reach (queue full past the timeout, or member gone).
    pub lost: usize,
}

impl Peers {
    /// Re-reads the folder: connects to new members, forgets vanished ones and removes the
    /// files of dead ones.
    pub(crate) fn refresh(&mut self) {
        self.refreshed = Some(Instant::now());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            self.members.clear();
            return;
        };
        let mut seen = Vec::new();
        for entry in entries.flatten().take(4 * MAX_MEMBERS) {
            let path = entry.path();
            if path == self.own || path.extension().is_none_or(|e| e != "sock") {
                continue;
            }
            seen.push(path);
        }
        self.members.retain(|m| seen.contains(&m.path));
        for path in seen {
            if self.members.len() >= MAX_MEMBERS {
                break;
            }
            if self.members.iter().any(|m| m.path == path) {
                continue;
            }
            let connected = UnixDatagram::unbound().and_then(|s| s.connect(&path).map(|()| s));
            match connected {
                Ok(socket) => self.members.push(Member { path, socket }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // Nobody listens on it: its process is gone without cleaning up.
                    let _ = std::fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
    }

    fn refresh_if_due(&mut self) {
        if self
            .refreshed
            .is_none_or(|t| t.elapsed() >= REFRESH_INTERVAL)
        {
            self.refresh();
        }
    }

    /// The number of other members.
    pub(crate) fn count(&mut self) -> usize {
        self.refresh_if_due();
        self.members.len()
    }

    /// Sends `frames` to every other member, in datagrams of up to 32 frames.
    pub(crate) async fn send(&mut self, frames: &[Frame]) -> SendReport {
        self.refresh_if_due();
        let mut report = SendReport::default();
        let mut datagram = Vec::with_capacity(MAX_DATAGRAM);
        let mut rest = frames;
        let mut failed = false;
        while !rest.is_empty() {
            let taken = encode_datagram(rest, &mut datagram).max(1);
            rest = rest.get(taken..).unwrap_or(&[]);
            for member in &self.members {
                match tokio::time::timeout(SEND_TIMEOUT, member.socket.send(&datagram)).await {
                    Ok(Ok(_)) => report.delivered += 1,
                    Ok(Err(_)) | Err(_) => {
                        report.lost += 1;
                        failed = true;
                    }
                }
            }
        }
        if failed {
            self.refresh();
        }
        report
    }
}

/// A passive bus member for tests and tools: sends frames onto a bus and receives what the
/// other members send.
pub struct BusTap {
    incoming: Incoming,
    peers: Peers,
    pending: VecDeque<Frame>,
    malformed: Arc<AtomicU64>,
}

/// Where a tap's frames come from.
enum Incoming {
    /// Its socket, read when the caller receives: a caller that does not read for a while makes the
    /// senders wait, and past [`SEND_TIMEOUT`] they lose datagrams to it.
    Socket(Endpoint),
    /// A queue that a thread of the tap's own fills from its socket, whenever the caller reads.
    Recorded {
        datagrams: mpsc::Receiver<Vec<Frame>>,
        file: SocketFile,
    },
}

/// Datagrams a recording tap keeps for its caller at most (up to 32 frames each); past it the
/// recorder waits, and senders then wait as they do for any member.
const RECORDED_DATAGRAMS: usize = 65_536;
/// How often a recorder that has nothing to read looks whether its tap is gone.
const RECORDER_POLL: Duration = Duration::from_millis(100);

impl std::fmt::Debug for BusTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match &self.incoming {
            Incoming::Socket(endpoint) => &endpoint.file.0,
            Incoming::Recorded { file, .. } => &file.0,
        };
        f.debug_struct("BusTap").field("socket", path).finish()
    }
}

impl BusTap {
    /// Joins bus `name` under [`default_root`].
    pub fn join(name: &str) -> Result<Self, BusError> {
        Self::join_at(&default_root(), name)
    }

    /// Joins bus `name` under `root`.
    pub fn join_at(root: &Path, name: &str) -> Result<Self, BusError> {
        let endpoint = Endpoint::bind(root, name)?;
        let peers = endpoint.peers();
        Ok(Self {
            incoming: Incoming::Socket(endpoint),
            peers,
            pending: VecDeque::new(),
            malformed: Arc::default(),
        })
    }

    /// Joins bus `name` under `root` as a recorder: a thread of the tap's own reads what the other
    /// members send as it comes, so that a caller may read it much later (after a stream, or from
    /// a runtime that is busy with other work) without the senders losing any of it meanwhile.
    /// Linux queues only ten datagrams for a socket nobody reads.
    pub fn recorder_at(root: &Path, name: &str) -> Result<Self, BusError> {
        let Endpoint { socket, file, dir } = Endpoint::bind(root, name)?;
        let io = |source| BusError::Io {
            path: file.0.clone(),
            source,
        };
        let socket = socket.into_std().map_err(io)?;
        socket.set_nonblocking(false).map_err(io)?;
        socket.set_read_timeout(Some(RECORDER_POLL)).map_err(io)?;
        let (tx, datagrams) = mpsc::channel(RECORDED_DATAGRAMS);
        let malformed = Arc::new(AtomicU64::new(0));
        let counted = malformed.clone();
        std::thread::Builder::new()
            .name("bus-recorder".into())
            .spawn(move || record(&socket, &tx, &counted))
            .map_err(io)?;
        let peers = Peers {
            dir,
            own: file.0.clone(),
            members: Vec::new(),
            refreshed: None,
        };
        Ok(Self {
            incoming: Incoming::Recorded { datagrams, file },
            peers,
            pending: VecDeque::new(),
            malformed,
        })
    }

    /// Sends one frame to every other member; returns how many it reached.
    pub async fn send(&mut self, frame: &Frame) -> SendReport {
        self.peers.send(std::slice::from_ref(frame)).await
    }

    /// Sends frames in order to every other member.
    pub async fn send_all(&mut self, frames: &[Frame]) -> SendReport {
        self.peers.send(frames).await
    }

    /// Receives the next frame sent by another member.
    pub async fn recv(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Ok(frame);
            }
            match &mut self.incoming {
                Incoming::Socket(endpoint) => {
                    if !endpoint.recv(&mut self.pending).await? {
                        self.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Incoming::Recorded { datagrams, .. } => match datagrams.recv().await {
                    Some(frames) => self.pending.extend(frames),
                    None => {
                        return Err(io::Error::other(
                            "the bus recorder stopped: its socket failed",
                        ));
                    }
                },
            }
        }
    }

    /// The number of other members now.
    pub fn peer_count(&mut self) -> usize {
        self.peers.refresh();
        self.peers.count()
    }

    /// Waits until at least `n` other members are present; false after `timeout`.
    pub async fn wait_for_peers(&mut self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.peer_count() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Datagrams received that were not valid bus datagrams.
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
}

/// A recording tap's thread: reads datagrams into the tap's queue until the tap is dropped.
fn record(
    socket: &std::os::unix::net::UnixDatagram,
    datagrams: &mpsc::Sender<Vec<Frame>>,
    malformed: &AtomicU64,
) {
    let mut buf = [0u8; MAX_DATAGRAM + 1];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let mut frames = VecDeque::new();
                let valid = n <= MAX_DATAGRAM
                    && decode_datagram(buf.get(..n).unwrap_or(&[]), &mut frames).is_some();
                if !valid {
                    malformed.fetch_add(1, Ordering::Relaxed);
                } else if datagrams.blocking_send(frames.into()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if datagrams.is_closed() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::CanId;

    #[tokio::test]
    async fn taps_exchange_frames_in_order() {
        let root = tempfile::tempdir().unwrap();
        let mut a = BusTap::join_at(root.path(), "t1").unwrap();
        let mut b = BusTap::join_at(root.path(), "t1").unwrap();
        assert!(a.wait_for_peers(1, Duration::from_secs(2)).await);
        let id = CanId::standard(0x123).unwrap();
        let frames: Vec<Frame> = (0..500u32)
            .map(|i| Frame::classic(id, &i.to_be_bytes()).unwrap())
            .collect();
        let sender = async {
            for chunk in frames.chunks(7) {
                let r = a.send_all(chunk).await;
                assert_eq!(r.lost, 0);
            }
        };
        let receiver = async {
            for i in 0..500u32 {
                let f = b.recv().await.unwrap();
                assert_eq!(f.data(), i.to_be_bytes());
            }
        };
        tokio::join!(sender, receiver);
    }

    /// A test reads its tap after the stream it watches: Linux queues ten datagrams for an unread
    /// socket, and the senders lost the rest to a plain tap (frames went missing from the relay tests
    /// on a busy machine). A recorder keeps them all.
    #[tokio::test]
    async fn a_recorder_read_late_has_every_frame_sent_meanwhile() {
        let root = tempfile::tempdir().unwrap();
        let mut sender = BusTap::join_at(root.path(), "t3").unwrap();
        let mut recorder = BusTap::recorder_at(root.path(), "t3").unwrap();
        assert!(sender.wait_for_peers(1, Duration::from_secs(2)).await);
        let id = CanId::standard(0x123).unwrap();
        for i in 0..300u32 {
            // One datagram each, none read meanwhile.
            let frame = Frame::classic(id, &i.to_be_bytes()).unwrap();
            assert_eq!(sender.send(&frame).await.lost, 0, "frame {i} was lost");
        }
        for i in 0..300u32 {
            assert_eq!(recorder.recv().await.unwrap().data(), i.to_be_bytes());
        }
        assert_eq!(recorder.malformed(), 0);
        let socket = std::fs::read_dir(root.path().join("t3")).unwrap().count();
        drop(recorder);
        assert_eq!(
            std::fs::read_dir(root.path().join("t3")).unwrap().count(),
            socket - 1,
            "the recorder's socket file goes with it"
        );
    }

    #[tokio::test]
    async fn stale_sockets_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let stale = root.path().join("t2").join("1-dead.sock");
        {
            std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
            let _s = std::os::unix::net::UnixDatagram::bind(&stale).unwrap();
        }
        assert!(stale.exists());
        let mut tap = BusTap::join_at(root.path(), "t2").unwrap();
        assert_eq!(tap.peer_count(), 0);
        assert!(!stale.exists());
        assert!(matches!(
            BusTap::join_at(root.path(), "../x"),
            Err(BusError::InvalidName(_))
        ));
    }
}
