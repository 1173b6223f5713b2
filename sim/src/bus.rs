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
use std::time::Duration;

use firmware_proto::ext::CanRecord;
use tokio::net::UnixDatagram;
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
    path: PathBuf,
    dir: PathBuf,
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
        Ok(Self { socket, path, dir })
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
            own: self.path.clone(),
            members: Vec::new(),
            refreshed: None,
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
    endpoint: Endpoint,
    peers: Peers,
    pending: VecDeque<Frame>,
    malformed: u64,
}

impl std::fmt::Debug for BusTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusTap")
            .field("socket", &self.endpoint.path)
            .finish()
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
            endpoint,
            peers,
            pending: VecDeque::new(),
            malformed: 0,
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
            if !self.endpoint.recv(&mut self.pending).await? {
                self.malformed += 1;
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
        self.malformed
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
