//! Local CAN endpoints: things on this workstation that send and receive CAN frames and can stand in for
//! a dongle as one side of a group, so that a diagnostic tool reaches the remote vehicle through an
//! interface it already knows.
//!
//! Three kinds exist besides USB and LAN dongles:
//! - [`socketcan`] (Linux only): a SocketCAN interface such as `can0` or `vcan0`, classic and FD frames,
//!   with error frames turned into the bus status. Its bit timing belongs to the kernel (`ip link`).
//! - [`slcan`]: an adapter speaking the Lawicel ASCII protocol on a serial port (a CANable, say), with
//!   its bitrate set by `S0`..`S8` and CAN FD where the adapter has the `d/D/b/B` extension.
//! - [`socketcand`]: a TCP server speaking socketcand's raw mode, so that tools which speak socketcand
//!   (python-can's `socketcand` interface, Kayak) use a group side without SocketCAN. Here the agent is
//!   the bus: frames from the group go to every connected tool, frames from a tool go to the group.
//!
//! Each open endpoint is a [`CanEndpoint`]: the same handle for every kind, with the shape of a dongle
//! session's frame path ([`CanEndpoint::take_frames`], [`CanEndpoint::send_frames`]), its
//! [`EndpointInfo`] (kind, whether it can set bit timing, FD) and [`CanEndpoint::configure`], which
//! refuses with [`EndpointError::TimingNotSettable`] where the endpoint cannot set timing rather than
//! pretending. Behind the handle, each kind is a task owning its I/O: this module and its children are
//! the only code doing I/O on local endpoints, as `transport` is for dongles.
//!
//! Endpoints are named by a spec ([`EndpointSpec`]: `socketcan:can0`, `slcan:/dev/ttyACM0@500000`,
//! `socketcand:127.0.0.1:29536`), kept in the agent's folder ([`EndpointStore`], `endpoints.json`) and
//! served by the daemon through an [`EndpointSet`]. Each gets a stable derived device id
//! ([`local_device_id`]), so that the server can treat it as a dongle of the agent's user.
//!
//! Nothing that arrives from a serial port or a TCP client can panic the agent or make it allocate
//! without bound: lines and commands have a fixed maximum length, malformed ones are counted and
//! skipped, and every queue is bounded with its overflow counted.

pub mod set;
pub mod slcan;
pub mod slcan_rates;
#[cfg(target_os = "linux")]
pub mod socketcan;
pub mod socketcand;
pub mod spec;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::CanSettings;
use firmware_proto::ext::batch;
use firmware_proto::ids::DeviceId;
use firmware_proto::remp::CanMode;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::frame::Frame;

pub use set::{EndpointEvent, EndpointSet, LocalEndpoint, SetOptions};
pub use spec::{EndpointKind, EndpointSpec, SlcanSettings, SpecError};
pub use store::{EndpointStore, StoreError};

/// The first two bytes of every local endpoint's device id ("10ca", for "local"), so that a person
/// reading ids can tell them from dongles'. The server must not rely on it: see [`local_device_id`].
pub const LOCAL_ID_MARKER: [u8; 2] = [0x10, 0xca];

// The device id of the local endpoint `identity` (see [`EndpointSpec::identity`]) of agent `agent_id`:
// the scheme the server checks reports against.
//
// The id is stable for as long as the agent keeps its registration and the endpoint its identity
// (kind and place, not its bitrate), and differs between agents, so two workstations with a `can0`
// each get two dongles. 48 bits of hash keep the chance of two endpoints colliding negligible at any
// realistic number of them, and the marker keeps them out of the way of dongle ids in practice; the
// server refuses a local id that is already a real dongle's.
pub use control_proto::local_device_id;

/// Whether `device_id` carries the local-endpoint marker. A hint for people and logs only.
pub fn looks_local(device_id: &DeviceId) -> bool {
    device_id.as_bytes()[..2] == LOCAL_ID_MARKER
}

/// What can go wrong with a local endpoint. Messages say what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("{identity} cannot set {what}: {how}")]
    TimingNotSettable {
        identity: String,
        what: &'static str,
        how: String,
    },
    #[error("{identity} does not support {what}")]
    Unsupported {
        identity: String,
        what: &'static str,
    },
    #[error("{identity} is closed (unplugged, or the agent stopped serving it)")]
    Closed { identity: String },
    #[error("{identity} did not answer {what} within {after:?}")]
    Timeout {
        identity: String,
        what: &'static str,
        after: Duration,
    },
    #[error(
        "could not open the serial port {path}: {source} (is it plugged in, is it free, and may this user open it? on Linux, join the 'dialout' group)"
    )]
    Serial {
        path: String,
        #[source]
        source: tokio_serial::Error,
    },
    #[error(
        "the device on {path} does not answer as an slcan adapter: {detail}. Is it an slcan (Lawicel) adapter, and is the serial baud rate right (add ,baud=N to the spec)?"
    )]
    NotSlcan { path: String, detail: String },
    #[error("the slcan adapter on {path} refused {command} ({why})")]
    Refused {
        path: String,
        command: String,
        why: &'static str,
    },
    #[error("could not listen for socketcand clients on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("SocketCAN interface {interface}: {detail}")]
    SocketCan { interface: String, detail: String },
    #[error("I/O on {identity} failed: {source}")]
    Io {
        identity: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    BadFrame(String),
}

/// Tunables of an open endpoint.
#[derive(Debug, Clone)]
pub struct EndpointOptions {
    /// How many received frames may wait for the consumer before new ones are dropped and counted.
    pub frame_queue: usize,
    /// How long an adapter may take to answer one command (slcan).
    pub answer_timeout: Duration,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        Self {
            frame_queue: 8192,
            answer_timeout: Duration::from_secs(1),
        }
    }
}

/// What an endpoint is, as the daemon reports it and `endpoint list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub kind: EndpointKind,
    /// The endpoint's identity, the input of its device id (`slcan:/dev/ttyACM0`).
    pub identity: String,
    /// Where it is: the interface, the serial port, or the address the socketcand server listens on
    /// (the bound address, so port 0 in a spec shows the port the system chose).
    pub location: String,
    /// Whether [`CanEndpoint::configure`] can set the bitrate.
    pub can_set_timing: bool,
    /// Whether the endpoint carries CAN FD frames.
    pub fd: bool,
    /// The adapter's own description (slcan's answer to `V`), where it has one.
    pub version: Option<String>,
    /// The nominal bitrate in use, where the agent knows it.
    pub bitrate: Option<u32>,
    /// The data-phase bitrate in use (CAN FD), where the agent knows it.
    pub data_bitrate: Option<u32>,
}

impl EndpointInfo {
    /// The dongle capability bits a device report should carry for this endpoint, so that the server
    /// validates it as it does a dongle: CAN FD where the endpoint carries FD, frame batches (it takes
    /// frames in any number), bus status for the kinds that report one. Never pairing, forget or
    /// session authentication: a local endpoint has no token.
    pub fn capabilities(&self) -> u32 {
        use firmware_proto::caps;
        let mut bits = caps::CAN_BATCH;
        if self.fd {
            bits |= caps::CAN_FD;
        }
        if self.kind != EndpointKind::Socketcand {
            bits |= caps::BUS_STATUS;
        }
        bits
    }
}

/// The configuration an endpoint applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Effective {
    pub bitrate: u32,
    pub data_bitrate: Option<u32>,
    pub mode: CanMode,
    /// `None`: the adapter uses its own sample point, which the agent cannot read.
    pub sample_point_permille: Option<u16>,
    /// What was asked and not applied, in words, for the reply and the log.
    pub notes: Vec<String>,
}

/// The fault-confinement state of the controller behind an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusState {
    ErrorActive,
    /// An error counter at 96 or above.
    ErrorWarning,
    ErrorPassive,
    BusOff,
    /// The controller is stopped (a SocketCAN interface that is down).
    Stopped,
}

impl BusState {
    /// The nearest state of the dongle protocol's BUS_STATUS, where there is one.
    pub fn to_remp(self) -> Option<firmware_proto::ext::BusState> {
        use firmware_proto::ext::BusState as Remp;
        match self {
            Self::ErrorActive | Self::ErrorWarning => Some(Remp::ErrorActive),
            Self::ErrorPassive => Some(Remp::ErrorPassive),
            Self::BusOff => Some(Remp::BusOff),
            Self::Stopped => None,
        }
    }
}

/// The bus status of an endpoint, as far as it can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusHealth {
    /// `None` where the endpoint cannot tell (a socketcand port has no controller).
    pub state: Option<BusState>,
    pub tec: Option<u8>,
    pub rec: Option<u8>,
    /// Error frames (SocketCAN) or error flags (slcan `F`) seen.
    pub error_frames: u64,
    /// Times the controller reported a receive or transmit overflow.
    pub overflows: u64,
    /// The last error the controller reported, in words.
    pub last_error: Option<String>,
}

/// Counters of an endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Frames taken from the bus or the tool, on their way to the group.
    pub frames_in: AtomicU64,
    /// Of those, frames dropped because the receive queue was full.
    pub frames_dropped: AtomicU64,
    /// Frames handed to the bus or the tools, from the group.
    pub frames_out: AtomicU64,
    /// Frames from the group that did not reach the bus: the adapter or the kernel refused them, no
    /// tool was connected to take them, or a tool read too slowly.
    pub frames_out_lost: AtomicU64,
    /// Lines or commands that did not parse, skipped.
    pub malformed: AtomicU64,
    /// Frames that cannot cross a group (remote frames), skipped.
    pub unsupported: AtomicU64,
}

/// A copy of [`EndpointStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub frames_in: u64,
    pub frames_dropped: u64,
    pub frames_out: u64,
    pub frames_out_lost: u64,
    pub malformed: u64,
    pub unsupported: u64,
}

impl EndpointStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            frames_in: get(&self.frames_in),
            frames_dropped: get(&self.frames_dropped),
            frames_out: get(&self.frames_out),
            frames_out_lost: get(&self.frames_out_lost),
            malformed: get(&self.malformed),
            unsupported: get(&self.unsupported),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What the handle and its task share.
pub(crate) struct Shared {
    pub stats: EndpointStats,
    pub health: Mutex<BusHealth>,
    pub started: Instant,
}

impl Shared {
    fn new() -> Self {
        Self {
            stats: EndpointStats::default(),
            health: Mutex::new(BusHealth::default()),
            started: Instant::now(),
        }
    }

    /// Queues a frame for the consumer, or counts it dropped when the queue is full.
    pub fn deliver(&self, frames: &mpsc::Sender<Frame>, frame: Frame) {
        bump(&self.stats.frames_in, 1);
        if frames.try_send(frame).is_err() {
            bump(&self.stats.frames_dropped, 1);
        }
    }

    /// Microseconds since the endpoint opened: the frame clock of endpoints without one of their own.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn update_health(&self, f: impl FnOnce(&mut BusHealth)) {
        f(&mut self.health.lock().unwrap());
    }
}

/// A request from the handle to the endpoint's task.
pub(crate) enum Request {
    /// Frames to put on the bus (already checked against the endpoint's abilities).
    Send(Vec<Frame>),
    /// A CAN configuration, with the answer's way back.
    Configure(
        CanSettings,
        oneshot::Sender<Result<Effective, EndpointError>>,
    ),
    /// Refresh the bus status from the controller where it can be asked.
    Status(oneshot::Sender<BusHealth>),
}

/// What a kind's `open` hands its task: the frame queue, the counters and the requests.
pub(crate) struct Plumbing {
    pub frames: mpsc::Sender<Frame>,
    pub shared: Arc<Shared>,
    pub requests: mpsc::Receiver<Request>,
}

/// An opened endpoint of one kind: what it is, and the task that serves it until it closes.
pub(crate) struct Driver {
    pub info: EndpointInfo,
    pub run: BoxFuture<'static, ()>,
}

/// Aborts a spawned task when dropped, so that a kind's helper tasks never outlive its driver.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One open local endpoint, whatever its kind. Cheap to share behind an `Arc`; dropping the last
/// handle closes the endpoint.
pub struct CanEndpoint {
    /// What the endpoint is; its bitrates change with [`CanEndpoint::configure`].
    info: Mutex<EndpointInfo>,
    requests: mpsc::Sender<Request>,
    frames: Mutex<Option<mpsc::Receiver<Frame>>>,
    shared: Arc<Shared>,
    closed: watch::Receiver<bool>,
    answer_timeout: Duration,
}

impl std::fmt::Debug for CanEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanEndpoint")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

impl CanEndpoint {
    /// Opens the endpoint `spec` names: the serial port and the slcan handshake, the TCP listener, or
    /// the SocketCAN socket. Fails with a clear error when the thing is missing or is not what the spec
    /// says.
    pub async fn open(
        spec: &EndpointSpec,
        options: &EndpointOptions,
    ) -> Result<Self, EndpointError> {
        let shared = Arc::new(Shared::new());
        let (frames_tx, frames_rx) = mpsc::channel(options.frame_queue.max(1));
        let (requests_tx, requests_rx) = mpsc::channel(64);
        let plumbing = Plumbing {
            frames: frames_tx,
            shared: shared.clone(),
            requests: requests_rx,
        };
        let driver = match spec {
            EndpointSpec::Slcan(settings) => slcan::open(settings, options, plumbing).await?,
            EndpointSpec::Socketcand { addr } => socketcand::open(*addr, plumbing).await?,
            #[cfg(target_os = "linux")]
            EndpointSpec::SocketCan { interface } => socketcan::open(interface, plumbing).await?,
            #[cfg(not(target_os = "linux"))]
            EndpointSpec::SocketCan { interface } => {
                drop(plumbing);
                return Err(EndpointError::SocketCan {
                    interface: interface.clone(),
                    detail: "SocketCAN exists only on Linux".into(),
                });
            }
        };
        let (closed_tx, closed_rx) = watch::channel(false);
        let run = driver.run;
        // The task owns the port or socket. It ends when the port goes away, or when this handle is
        // dropped: its request queue closes, and the task closes the adapter's channel on its way out.
        tokio::spawn(async move {
            run.await;
            let _ = closed_tx.send(true);
        });
        Ok(Self {
            info: Mutex::new(driver.info),
            requests: requests_tx,
            frames: Mutex::new(Some(frames_rx)),
            shared,
            closed: closed_rx,
            answer_timeout: options.answer_timeout,
        })
    }

    pub fn info(&self) -> EndpointInfo {
        self.info.lock().unwrap().clone()
    }

    pub fn identity(&self) -> String {
        self.info.lock().unwrap().identity.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The bus status as last seen, without asking the controller.
    pub fn health(&self) -> BusHealth {
        self.shared.health.lock().unwrap().clone()
    }

    /// The frames the endpoint takes from its bus or its tools, once: the first caller takes the queue.
    pub fn take_frames(&self) -> Option<mpsc::Receiver<Frame>> {
        self.frames.lock().unwrap().take()
    }

    /// Resolves when the endpoint has closed (the adapter was unplugged, the interface went away).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.requests.is_closed()
    }

    fn closed_error(&self) -> EndpointError {
        EndpointError::Closed {
            identity: self.identity(),
        }
    }

    /// Puts frames on the bus (or hands them to the connected tools). Each frame is checked first: a
    /// classic frame has at most 8 bytes, an FD frame a length CAN FD can carry, and FD frames need an
    /// endpoint that carries FD. Waits while the endpoint's queue is full, as a dongle's link does.
    pub async fn send_frames(&self, frames: &[Frame]) -> Result<(), EndpointError> {
        let fd = self.info.lock().unwrap().fd;
        for frame in frames {
            check_frame(frame, fd, &self.identity())?;
        }
        if frames.is_empty() {
            return Ok(());
        }
        self.requests
            .send(Request::Send(frames.to_vec()))
            .await
            .map_err(|_| self.closed_error())
    }

    /// Applies a CAN configuration, the one the server sends dongles, where the endpoint can. A
    /// SocketCAN interface takes its timing from the kernel and a socketcand port has no bus of its
    /// own: both refuse with [`EndpointError::TimingNotSettable`], saying what to do instead. What
    /// the endpoint's kind cannot set is refused, or where harmless (the sample point) applied without
    /// and said in [`Effective::notes`]; the data-phase bitrate of a CAN FD endpoint stays as its spec
    /// set it, since the configuration carries none.
    pub async fn configure(&self, config: &CanSettings) -> Result<Effective, EndpointError> {
        let info = self.info();
        let identity = info.identity.clone();
        match info.kind {
            EndpointKind::SocketCan => {
                let iface = info.location;
                return Err(EndpointError::TimingNotSettable {
                    identity,
                    what: "the bit timing",
                    how: format!(
                        "a SocketCAN interface takes it from the kernel; as root run `ip link set {iface} down && ip link set {iface} type can bitrate {} && ip link set {iface} up`",
                        config.bitrate
                    ),
                });
            }
            EndpointKind::Socketcand => {
                return Err(EndpointError::TimingNotSettable {
                    identity,
                    what: "the bit timing",
                    how: "a socketcand port has no CAN bus of its own: its tools see frames, and the timing that matters is the other side's".into(),
                });
            }
            EndpointKind::Slcan => {}
        }
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Configure(*config, tx))
            .await
            .map_err(|_| self.closed_error())?;
        // Closing, setting the bitrates and reopening are several commands, each with its own wait.
        let wait = self.answer_timeout * 8;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => {
                if let Ok(effective) = &result {
                    let mut info = self.info.lock().unwrap();
                    info.bitrate = Some(effective.bitrate);
                    info.data_bitrate = effective.data_bitrate;
                }
                result
            }
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => Err(EndpointError::Timeout {
                identity,
                what: "the configuration",
                after: wait,
            }),
        }
    }

    /// Asks the controller for its bus status where it can be asked (slcan `F`, the SocketCAN
    /// interface's state), and answers the last known status otherwise.
    pub async fn bus_status(&self) -> Result<BusHealth, EndpointError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Status(tx))
            .await
            .map_err(|_| self.closed_error())?;
        match tokio::time::timeout(self.answer_timeout * 2, rx).await {
            Ok(Ok(health)) => Ok(health),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => Ok(self.health()),
        }
    }
}

/// Checks that `frame` is one the endpoint can carry.
pub(crate) fn check_frame(frame: &Frame, fd: bool, identity: &str) -> Result<(), EndpointError> {
    let len = frame.data().len();
    if frame.is_fd() {
        if !fd {
            return Err(EndpointError::Unsupported {
                identity: identity.to_string(),
                what: "CAN FD frames",
            });
        }
        if u8::try_from(len).ok().and_then(batch::len_to_dlc).is_none() {
            return Err(EndpointError::BadFrame(format!(
                "a CAN FD frame cannot carry {len} bytes (0 to 8, 12, 16, 20, 24, 32, 48 or 64)"
            )));
        }
    } else if len > 8 {
        return Err(EndpointError::BadFrame(format!(
            "a classic CAN frame carries at most 8 bytes, not {len}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::CanId;
    use uuid::Uuid;

    #[test]
    fn device_ids_are_stable_marked_and_differ_by_agent_and_place() {
        let agent: Uuid = "6f1c2a9e-0b7d-4c38-9a51-3e2f8d4b7c10".parse().unwrap();
        let other: Uuid = "00000000-0000-4000-8000-000000000001".parse().unwrap();
        let a = local_device_id(agent, "socketcan:can0");
        assert_eq!(a, local_device_id(agent, "socketcan:can0"));
        assert!(a.to_string().starts_with("10ca"), "{a}");
        assert!(looks_local(&a));
        assert_ne!(a, local_device_id(other, "socketcan:can0"));
        assert_ne!(a, local_device_id(agent, "socketcan:can1"));
        // The scheme written out, so that the server can recompute it byte for byte.
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("local:{agent}:socketcan:can0").as_bytes());
        assert_eq!(&a.as_bytes()[2..], &digest[..6]);
    }

    #[test]
    fn capabilities_follow_the_kind() {
        use firmware_proto::caps;
        let info = |kind, fd| EndpointInfo {
            kind,
            identity: String::new(),
            location: String::new(),
            can_set_timing: false,
            fd,
            version: None,
            bitrate: None,
            data_bitrate: None,
        };
        let sl = info(EndpointKind::Slcan, false).capabilities();
        assert_eq!(sl, caps::CAN_BATCH | caps::BUS_STATUS);
        let tcp = info(EndpointKind::Socketcand, true).capabilities();
        assert_eq!(tcp, caps::CAN_BATCH | caps::CAN_FD);
        assert!(
            !caps::has(sl | tcp, caps::FORGET_TOKEN) && !caps::has(sl | tcp, caps::SESSION_AUTH)
        );
    }

    #[test]
    fn frames_are_checked_against_the_endpoint() {
        let id = CanId::standard(0x123).unwrap();
        let classic = Frame::classic(id, &[1, 2, 3]).unwrap();
        assert!(check_frame(&classic, false, "x").is_ok());
        let fd = Frame::with_flags(id, batch::flags::FD, &[0; 12]).unwrap();
        assert!(matches!(
            check_frame(&fd, false, "x"),
            Err(EndpointError::Unsupported { .. })
        ));
        assert!(check_frame(&fd, true, "x").is_ok());
        let odd = Frame::with_flags(id, batch::flags::FD, &[0; 13]).unwrap();
        assert!(matches!(
            check_frame(&odd, true, "x"),
            Err(EndpointError::BadFrame(_))
        ));
        let long = Frame::with_flags(id, 0, &[0; 12]).unwrap();
        assert!(check_frame(&long, true, "x").is_err());
    }
}
