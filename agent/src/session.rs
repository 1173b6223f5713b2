//! A session with one dongle: typed requests and answers over a [`Link`], with correlation ids and
//! timeouts.
//!
//! The daemon, the HIL suite and the benchmarks all drive dongles through this type, so that the code the
//! tests exercise is the code users run. A session starts from the dongle's ANNOUNCE (its identity,
//! version and capabilities), authenticates with the dongle's token when it has one (raw token in every
//! packet for plain REMP v1; the challenge-response and per-packet MAC when the dongle offers the session
//! extension), and then serves requests while a reader task routes the dongle's packets: answers to the
//! request waiting for them, CAN frames to a bounded queue whose overflow is counted.
//!
//! Answers are matched by correlation id where the packet has one (PAIRING, CLI, FORGET) and by message type
//! otherwise (CAN_CONFIG, BUS_STATUS, AUTH), with at most one such request in flight per type:
//! in a MAC session the dongle's seq is its own counter, so it cannot echo ours.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto::MAX_PACKET_LEN;
use firmware_proto::caps;
use firmware_proto::discovery::{self, PairingState};
use firmware_proto::ext::auth::{self, AuthMessage, AuthStatus};
use firmware_proto::ext::batch::{self};
use firmware_proto::ext::session::{Role, SessionMac};
use firmware_proto::ext::{BusStatus, BusStatusAction, Forget, ForgetAction, ForgetStatus};
use firmware_proto::ids::{CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::TelemetrySource;
use firmware_proto::remp::{
    self, CanConfig, CanFrame, CliRequest, CliStatus, Header, MsgType, Packet, PairingAck,
    PairingStart, PairingSubmit, Payload,
};
use rand::RngExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use std::net::SocketAddr;

use crate::bus_pace::{self, BusPace};
use crate::transport::Link;
use crate::transport::udp::UdpHub;

/// Frames are their own module; the session hands them over, so it names them too.
pub use crate::frame::Frame;

/// The only REMP major version there is.
pub const SUPPORTED_PROTO_VER: u16 = 1;

/// What a session can fail with. Messages name what was asked and what to do; never a token or a PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("the dongle did not answer {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the link to the dongle closed (unplugged, or its socket went away)")]
    Closed,
    #[error(
        "the dongle speaks REMP version {found}, and this agent speaks version {SUPPORTED_PROTO_VER}: \
         update the agent or the dongle firmware"
    )]
    VersionMismatch { found: u16 },
    #[error(
        "this request needs the dongle's token, and the agent has none for {0}: pair the dongle first"
    )]
    NoToken(DeviceId),
    #[error(
        "the dongle refused the session authentication ({0:?}): its token differs from ours; it may have been reset"
    )]
    AuthRefused(AuthStatus),
    #[error("the dongle does not offer {0}")]
    Unsupported(&'static str),
    #[error("could not encode the request: {0}")]
    Encode(firmware_proto::Error),
}

/// The dongle as its ANNOUNCE describes it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DongleInfo {
    pub device_id: DeviceId,
    pub fw_build: String,
    pub udp_port: u16,
    pub capabilities: u32,
    pub proto_ver: u16,
    pub lan_ip: Option<[u8; 4]>,
    pub pairing_mode: bool,
    pub pairing_nonce: Option<[u8; 16]>,
}

impl DongleInfo {
    pub fn from_announce(a: &discovery::Announce<'_>) -> Self {
        Self {
            device_id: a.device_id,
            fw_build: a.fw_build.unwrap_or_default().to_string(),
            udp_port: a.udp_port,
            capabilities: a.capabilities,
            proto_ver: a.proto_ver,
            lan_ip: a.lan_ip,
            pairing_mode: a.pairing_state == PairingState::Pairing,
            pairing_nonce: a.pairing_nonce,
        }
    }

    /// Whether the dongle announces every bit of `capability`.
    pub fn has(&self, capability: u32) -> bool {
        caps::has(self.capabilities, capability)
    }
}

/// Asks the dongle on `link` who it is: sends DISCOVER and waits for its ANNOUNCE, skipping anything
/// else that arrives meanwhile.
pub async fn identify(link: &mut Link, wait: Duration) -> Result<DongleInfo, SessionError> {
    let mut buf = [0u8; 64];
    let n = discovery::encode_discover(1, &mut buf).map_err(SessionError::Encode)?;
    link.outgoing
        .send(buf[..n].to_vec())
        .await
        .map_err(|_| SessionError::Closed)?;
    let deadline = Instant::now() + wait;
    loop {
        let packet = tokio::time::timeout_at(deadline, link.incoming.recv())
            .await
            .map_err(|_| SessionError::Timeout {
                what: "DISCOVER",
                after: wait,
            })?
            .ok_or(SessionError::Closed)?;
        if let Ok(discovery::Packet {
            body: discovery::Body::Announce(a),
            ..
        }) = discovery::decode(&packet)
        {
            return Ok(DongleInfo::from_announce(&a));
        }
    }
}

/// Asks the LAN dongle whose discovery socket is `discovery` who it is, through the hub's shared socket,
/// and returns its ANNOUNCE and the address it serves REMP on (its address with the announced port).
pub async fn identify_lan(
    hub: &UdpHub,
    discovery: SocketAddr,
    wait: Duration,
) -> Result<(DongleInfo, SocketAddr), SessionError> {
    let mut announces = hub.announces();
    let seq: u32 = rand::rng().random();
    hub.discover(discovery, seq)
        .await
        .map_err(|_| SessionError::Closed)?;
    let deadline = Instant::now() + wait;
    loop {
        let datagram = match tokio::time::timeout_at(deadline, announces.recv()).await {
            Ok(Ok(d)) => d,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(_)) => return Err(SessionError::Closed),
            Err(_) => {
                return Err(SessionError::Timeout {
                    what: "DISCOVER",
                    after: wait,
                });
            }
        };
        if datagram.from.ip() != discovery.ip() {
            continue;
        }
        if let Ok(discovery::Packet {
            header,
            body: discovery::Body::Announce(a),
        }) = discovery::decode(&datagram.bytes)
        {
            // Legacy headers echo only the low 16 bits of the seq.
            if header.seq != seq && header.seq != seq & 0xffff {
                continue;
            }
            let info = DongleInfo::from_announce(&a);
            let remp = SocketAddr::new(datagram.from.ip(), a.udp_port);
            return Ok((info, remp));
        }
    }
}

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How long a request waits for its answer (a CLI request waits for its own timeout plus this).
    pub request_timeout: Duration,
    /// How many received frames may wait for the consumer before new ones are dropped and counted.
    pub frame_queue: usize,
    /// Use the session-authentication extension when the dongle offers it.
    pub use_session_auth: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(2),
            frame_queue: 8192,
            use_session_auth: true,
        }
    }
}

/// The answer to a CLI request, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliOutcome {
    pub status: CliStatus,
    pub truncated: bool,
    pub exit_code: u16,
    /// The output; bytes that are not UTF-8 are replaced.
    pub output: String,
}

/// A command typed on the dongle's UART console and its outcome (REMP CLI_TELEMETRY), owned, from a
/// report that carried the dongle's token or session MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UartReport {
    /// The dongle's id for the report.
    pub corr_id: CorrelationId,
    pub source: TelemetrySource,
    pub command: String,
    /// The output; bytes that are not UTF-8 are replaced.
    pub output: String,
    pub exit_code: u16,
    pub truncated: bool,
    pub error: bool,
}

/// How many UART reports may wait for the consumer before new ones are dropped and counted.
const TELEMETRY_QUEUE: usize = 64;

/// Counters of a session.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub frames_in: AtomicU64,
    /// Frames dropped because the consumer's queue was full.
    pub frames_dropped: AtomicU64,
    pub frames_out: AtomicU64,
    /// Packets that did not decode, failed their MAC, or answered nothing pending.
    pub packets_ignored: AtomicU64,
    /// UART reports dropped because the consumer's queue was full.
    pub telemetry_dropped: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Corr(CorrelationId),
    Type(u8),
}

/// An answer, owned, as the reader hands it to the waiting request.
#[derive(Debug)]
enum Answer {
    Pairing(PairingAck),
    Config(CanConfig),
    Cli(CliOutcome),
    Forget(Forget),
    BusStatus(BusStatus),
    Auth(AuthMessage),
}

enum Auth {
    None,
    Token(DongleToken),
    Mac(SessionMac),
}

struct Shared {
    device_id: DeviceId,
    auth: Mutex<Auth>,
    pending: Mutex<HashMap<Key, oneshot::Sender<Answer>>>,
    seq: AtomicU32,
    started: Instant,
    stats: SessionStats,
    /// The dongle's bitrate from its last CAN_CONFIG answer; 0 until one arrives.
    bitrate: AtomicU32,
    /// The model of the dongle's transmit queue that paces frames to it.
    pace: Mutex<BusPace>,
}

/// A session with one dongle. Cheap to share behind an `Arc`; requests may run concurrently.
pub struct DongleSession {
    info: DongleInfo,
    config: SessionConfig,
    outgoing: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    frames: Mutex<Option<mpsc::Receiver<Frame>>>,
    telemetry: Mutex<Option<mpsc::Receiver<UartReport>>>,
    closed: watch::Receiver<bool>,
    /// Serialises the requests that are matched by type.
    typed: tokio::sync::Mutex<()>,
    reader: tokio::task::AbortHandle,
}

impl Drop for DongleSession {
    fn drop(&mut self) {
        // The reader holds the link's receiving end; stopping it lets the transport close the port.
        self.reader.abort();
    }
}

impl std::fmt::Debug for DongleSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DongleSession")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl DongleSession {
    /// Asks the dongle on `link` who it is (DISCOVER, then its ANNOUNCE), checks its protocol version
    /// and starts the session. This is how a serial port becomes a dongle.
    pub async fn open(mut link: Link, config: SessionConfig) -> Result<Self, SessionError> {
        let info = identify(&mut link, config.request_timeout).await?;
        Self::start(link, info, config)
    }

    /// Starts a session with a dongle already identified (a LAN dongle found by the UDP hub).
    pub fn start(
        link: Link,
        info: DongleInfo,
        config: SessionConfig,
    ) -> Result<Self, SessionError> {
        if info.proto_ver != SUPPORTED_PROTO_VER {
            return Err(SessionError::VersionMismatch {
                found: info.proto_ver,
            });
        }
        let shared = Arc::new(Shared {
            device_id: info.device_id,
            auth: Mutex::new(Auth::None),
            pending: Mutex::default(),
            seq: AtomicU32::new(1),
            started: Instant::now(),
            stats: SessionStats::default(),
            bitrate: AtomicU32::new(0),
            pace: Mutex::default(),
        });
        let (frames_tx, frames_rx) = mpsc::channel(config.frame_queue);
        let (telemetry_tx, telemetry_rx) = mpsc::channel(TELEMETRY_QUEUE);
        let (closed_tx, closed_rx) = watch::channel(false);
        let sinks = Sinks {
            frames: frames_tx,
            telemetry: telemetry_tx,
        };
        let reader =
            tokio::spawn(read_loop(link.incoming, shared.clone(), sinks, closed_tx)).abort_handle();
        Ok(Self {
            info,
            config,
            outgoing: link.outgoing,
            shared,
            frames: Mutex::new(Some(frames_rx)),
            telemetry: Mutex::new(Some(telemetry_rx)),
            closed: closed_rx,
            typed: tokio::sync::Mutex::new(()),
            reader,
        })
    }

    pub fn info(&self) -> &DongleInfo {
        &self.info
    }

    pub fn device_id(&self) -> DeviceId {
        self.info.device_id
    }

    pub fn stats(&self) -> &SessionStats {
        &self.shared.stats
    }

    /// The frames the dongle receives from its bus, once: the first caller takes the queue.
    pub fn take_frames(&self) -> Option<mpsc::Receiver<Frame>> {
        self.frames.lock().unwrap().take()
    }

    /// The commands typed on the dongle's UART console, as it reports them, once: the first caller
    /// takes the queue. Only reports signed with the session's token or MAC arrive here.
    pub fn take_telemetry(&self) -> Option<mpsc::Receiver<UartReport>> {
        self.telemetry.lock().unwrap().take()
    }

    /// Resolves when the link has closed (the dongle was unplugged or went away).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Whether this session authenticates with the session extension's challenge-response (the dongle
    /// offers it and the configuration allows it), where a wrong token is refused in words.
    pub fn uses_session_auth(&self) -> bool {
        self.config.use_session_auth && self.info.has(caps::SESSION_AUTH)
    }

    /// Whether the session holds credentials (a token or a session MAC) to send what needs them.
    pub fn is_authenticated(&self) -> bool {
        !matches!(*self.shared.auth.lock().unwrap(), Auth::None)
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Authenticates to the dongle with `token`: through the challenge-response when the dongle offers
    /// session authentication (and the config allows it), otherwise by carrying the raw token in every
    /// request, as plain REMP v1 does.
    pub async fn authenticate(&self, token: DongleToken) -> Result<(), SessionError> {
        if self.config.use_session_auth && self.info.has(caps::SESSION_AUTH) {
            let host_nonce: [u8; 16] = rand::rng().random();
            let answer = self
                .typed_request(
                    MsgType::Auth,
                    Payload::Auth(AuthMessage::Challenge { host_nonce }),
                    "AUTH challenge",
                )
                .await?;
            let Answer::Auth(AuthMessage::Response {
                status,
                dongle_nonce,
                dongle_proof,
            }) = answer
            else {
                return Err(SessionError::AuthRefused(AuthStatus::Error));
            };
            if status != AuthStatus::Ok {
                return Err(SessionError::AuthRefused(status));
            }
            let device_id = self.info.device_id;
            let expected = auth::dongle_proof(&token, &device_id, &host_nonce, &dongle_nonce);
            if !auth::proof_matches(&expected, &dongle_proof) {
                return Err(SessionError::AuthRefused(AuthStatus::BadProof));
            }
            let host_proof = auth::host_proof(&token, &device_id, &host_nonce, &dongle_nonce);
            let answer = self
                .typed_request(
                    MsgType::Auth,
                    Payload::Auth(AuthMessage::Confirm { host_proof }),
                    "AUTH confirm",
                )
                .await?;
            match answer {
                Answer::Auth(AuthMessage::Result {
                    status: AuthStatus::Ok,
                }) => {}
                Answer::Auth(AuthMessage::Result { status }) => {
                    return Err(SessionError::AuthRefused(status));
                }
                _ => return Err(SessionError::AuthRefused(AuthStatus::Error)),
            }
            let mac = SessionMac::new(Role::Host, &token, &device_id, &host_nonce, &dongle_nonce);
            *self.shared.auth.lock().unwrap() = Auth::Mac(mac);
        } else {
            *self.shared.auth.lock().unwrap() = Auth::Token(token);
        }
        Ok(())
    }

    /// Forgets the credentials (after an unpair).
    pub fn deauthenticate(&self) {
        *self.shared.auth.lock().unwrap() = Auth::None;
    }

    /// Opens the dongle's pairing window: it shows a PIN and answers with the window's nonce.
    pub async fn pairing_start(&self, corr_id: CorrelationId) -> Result<PairingAck, SessionError> {
        let answer = self
            .corr_request(
                corr_id,
                Payload::PairingStart(PairingStart { corr_id }),
                "PAIRING start",
                self.config.request_timeout,
            )
            .await?;
        match answer {
            Answer::Pairing(ack) => Ok(ack),
            _ => unreachable!("pairing answers are routed by kind"),
        }
    }

    /// Submits the PIN the technician read, the window's nonce and the token the dongle is to keep.
    pub async fn pairing_submit(
        &self,
        corr_id: CorrelationId,
        pin: Pin,
        pairing_nonce: [u8; 16],
        token: DongleToken,
    ) -> Result<PairingAck, SessionError> {
        let answer = self
            .corr_request(
                corr_id,
                Payload::PairingSubmit(PairingSubmit {
                    corr_id,
                    pin,
                    pairing_nonce,
                    token,
                }),
                "PAIRING submit",
                self.config.request_timeout,
            )
            .await?;
        match answer {
            Answer::Pairing(ack) => Ok(ack),
            _ => unreachable!("pairing answers are routed by kind"),
        }
    }

    /// Reads the dongle's CAN configuration.
    pub async fn can_config_get(&self) -> Result<CanConfig, SessionError> {
        self.config_request(CanConfig::get(), "CAN_CONFIG get")
            .await
    }

    /// Applies a CAN configuration; the answer carries the status and the effective values.
    pub async fn can_config_set(&self, mut config: CanConfig) -> Result<CanConfig, SessionError> {
        config.action = remp::ConfigAction::Set;
        self.config_request(config, "CAN_CONFIG set").await
    }

    async fn config_request(
        &self,
        config: CanConfig,
        what: &'static str,
    ) -> Result<CanConfig, SessionError> {
        match self
            .typed_request(MsgType::CanConfig, Payload::CanConfig(config), what)
            .await?
        {
            Answer::Config(c) => {
                self.learn_bitrate(&c);
                Ok(c)
            }
            _ => unreachable!("config answers are routed by kind"),
        }
    }

    /// Keeps the bitrate of the dongle's answer to our own CAN_CONFIG request (every answer carries the
    /// effective configuration, a refused one's too) to pace the frames sent to it. Only an answer
    /// that matched a request counts, never a packet that arrived unasked, and a bitrate outside what
    /// a CAN controller runs at is not believed.
    fn learn_bitrate(&self, answer: &CanConfig) {
        if answer.status == remp::ConfigStatus::Invalid
            || !firmware_proto::remp::BITRATE_RANGE.contains(&answer.bitrate)
        {
            return;
        }
        let before = self.shared.bitrate.swap(answer.bitrate, Ordering::Relaxed);
        if before != answer.bitrate {
            // Frames counted at the old bitrate would hold the new one's pace.
            *self.shared.pace.lock().unwrap() = BusPace::default();
        }
    }

    /// Runs a command on the dongle's CLI and waits up to `wait` (plus the request timeout) for its
    /// answer. `corr_id` is the server's command id, so the answer can be matched all the way back.
    pub async fn cli(
        &self,
        corr_id: CorrelationId,
        command: &str,
        allow_dangerous: bool,
        wait: Duration,
    ) -> Result<CliOutcome, SessionError> {
        let flags = if allow_dangerous {
            CliRequest::FLAG_ALLOW_DANGEROUS
        } else {
            0
        };
        let answer = self
            .corr_request(
                corr_id,
                Payload::CliRequest(CliRequest {
                    flags,
                    corr_id,
                    command,
                }),
                "CLI request",
                wait + self.config.request_timeout,
            )
            .await?;
        match answer {
            Answer::Cli(outcome) => Ok(outcome),
            _ => unreachable!("CLI answers are routed by kind"),
        }
    }

    /// Asks the dongle to forget its token (the owner unpaired it).
    pub async fn forget(&self) -> Result<Forget, SessionError> {
        if !self.info.has(caps::FORGET_TOKEN) {
            return Err(SessionError::Unsupported("the forget-token extension"));
        }
        let corr_id = CorrelationId(rand::rng().random());
        let request = Forget {
            action: ForgetAction::Request,
            status: ForgetStatus::Ok,
            corr_id,
        };
        match self
            .corr_request(
                corr_id,
                Payload::Forget(request),
                "FORGET",
                self.config.request_timeout,
            )
            .await?
        {
            Answer::Forget(f) => Ok(f),
            _ => unreachable!("forget answers are routed by kind"),
        }
    }

    /// Reads the bus state and error counters.
    pub async fn bus_status(&self) -> Result<BusStatus, SessionError> {
        if !self.info.has(caps::BUS_STATUS) {
            return Err(SessionError::Unsupported("the bus-status extension"));
        }
        match self
            .typed_request(
                MsgType::BusStatus,
                Payload::BusStatus(BusStatus::request()),
                "BUS_STATUS",
            )
            .await?
        {
            Answer::BusStatus(s) => Ok(s),
            _ => unreachable!("bus status answers are routed by kind"),
        }
    }

    /// Sends frames for the dongle to transmit on its bus: in batches where the dongle offers them,
    /// otherwise one REMP CAN packet per classic frame. FD frames need the batch extension.
    pub async fn send_frames(&self, frames: &[Frame]) -> Result<(), SessionError> {
        self.send_frames_counting(frames).await.1
    }

    /// [`DongleSession::send_frames`], also saying how many of the frames, from the first, went onto the
    /// link before an error: those must not be sent again, and the rest must not count as delivered.
    pub async fn send_frames_counting(
        &self,
        frames: &[Frame],
    ) -> (usize, Result<(), SessionError>) {
        let mut sent = 0;
        let result = self.send_frames_into(frames, &mut sent).await;
        self.shared
            .stats
            .frames_out
            .fetch_add(sent as u64, Ordering::Relaxed);
        (sent, result)
    }

    async fn send_frames_into(
        &self,
        frames: &[Frame],
        sent: &mut usize,
    ) -> Result<(), SessionError> {
        let mut rest = frames;
        while !rest.is_empty() {
            // The frames that may be written now, at least one (after waiting for it); see `bus_pace`.
            let now_allowed = self.paced(rest).await;
            let mut part = &rest[..now_allowed];
            while !part.is_empty() {
                let taken = self.send_packet_of(part).await?;
                *sent += taken;
                part = &part[taken..];
            }
            rest = &rest[now_allowed..];
        }
        Ok(())
    }

    /// Waits until the first of `frames` may be written to the dongle without overrunning its bus, and
    /// says how many, from the first, may be written now. Without a known bitrate, all of them.
    async fn paced(&self, frames: &[Frame]) -> usize {
        let bitrate = self.shared.bitrate.load(Ordering::Relaxed);
        if bitrate == 0 || frames.is_empty() {
            return frames.len();
        }
        loop {
            // Asked again after every wait, so that the frames count from when they go (`bus_pace`).
            let now = tokio::time::Instant::now();
            let (at, allowed) = self
                .shared
                .pace
                .lock()
                .unwrap()
                .next_write(now, frames.iter().map(|f| bus_pace::frame_time(f, bitrate)));
            if allowed > 0 {
                return allowed;
            }
            tokio::time::sleep_until(at).await;
        }
    }

    /// Sends one packet of frames from the start of `frames` (a batch where the dongle offers them,
    /// otherwise one classic frame) and says how many it carried.
    async fn send_packet_of(&self, frames: &[Frame]) -> Result<usize, SessionError> {
        if self.info.has(caps::CAN_BATCH) {
            // A batch fills a packet's payload, which leaves room for the header and the token or
            // MAC; a buffer of a whole packet would make batches the encoder must refuse.
            let mut buf = vec![0u8; firmware_proto::remp::MAX_PAYLOAD_LEN];
            let mut writer = batch::BatchWriter::new(&mut buf).map_err(SessionError::Encode)?;
            let mut taken = 0;
            for frame in frames {
                if writer.push(&frame.record()).is_err() {
                    break;
                }
                taken += 1;
            }
            if taken == 0 {
                return Err(SessionError::Encode(firmware_proto::Error::TooLarge {
                    field: "frame",
                    max: firmware_proto::remp::MAX_PAYLOAD_LEN,
                }));
            }
            let len = writer.finish().map_err(SessionError::Encode)?;
            let batch = batch::Batch::parse(&buf[..len]).map_err(SessionError::Encode)?;
            self.send(MsgType::CanBatch, Payload::CanBatch(batch))
                .await?;
            Ok(taken)
        } else {
            let frame = &frames[0];
            if frame.is_fd() {
                return Err(SessionError::Unsupported(
                    "CAN FD frames (the batch extension)",
                ));
            }
            let can = CanFrame::new(frame.id, frame.data()).map_err(SessionError::Encode)?;
            self.send(MsgType::Can, Payload::Can(can)).await?;
            Ok(1)
        }
    }

    async fn corr_request(
        &self,
        corr_id: CorrelationId,
        payload: Payload<'_>,
        what: &'static str,
        wait: Duration,
    ) -> Result<Answer, SessionError> {
        let msg_type = payload.msg_type().expect("known payloads have a type");
        self.request(Key::Corr(corr_id), msg_type, payload, what, wait)
            .await
    }

    async fn typed_request(
        &self,
        msg_type: MsgType,
        payload: Payload<'_>,
        what: &'static str,
    ) -> Result<Answer, SessionError> {
        let _one_at_a_time = self.typed.lock().await;
        self.request(
            Key::Type(msg_type.to_u8()),
            msg_type,
            payload,
            what,
            self.config.request_timeout,
        )
        .await
    }

    async fn request(
        &self,
        key: Key,
        msg_type: MsgType,
        payload: Payload<'_>,
        what: &'static str,
        wait: Duration,
    ) -> Result<Answer, SessionError> {
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().unwrap().insert(key, tx);
        let pending = PendingGuard {
            shared: &self.shared,
            key,
        };
        self.send(msg_type, payload).await?;
        // The reader fails every waiting request when the link closes, but only those waiting then: a
        // request registered after that moment would wait out its whole timeout. Watching the closed
        // flag ends it at once. `biased` lets an answer that arrived just before the close win.
        let mut closed = self.closed.clone();
        let answer = tokio::select! {
            biased;
            answer = timeout(wait, rx) => answer,
            _ = closed.wait_for(|c| *c) => return Err(SessionError::Closed),
        };
        drop(pending);
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(SessionError::Closed),
            Err(_) => Err(SessionError::Timeout { what, after: wait }),
        }
    }

    /// Encodes and queues one packet, with the credentials its type needs.
    async fn send(&self, msg_type: MsgType, payload: Payload<'_>) -> Result<(), SessionError> {
        // The link's writer may outlive its reader for a moment, and would take a packet it can no longer
        // deliver: once the link is known closed, say so instead of queueing into the void.
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        // Encoded on the stack; only the packet's own length is copied to the heap for the link.
        let mut buf = [0u8; MAX_PACKET_LEN];
        let len = {
            let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
            let mut header = Header::new(msg_type, self.info.device_id, seq);
            header.timestamp_us = self.shared.started.elapsed().as_micros() as u64;
            let mut auth = self.shared.auth.lock().unwrap();
            match (&mut *auth, msg_type.requires_token()) {
                (_, false) => remp::encode(&Packet { header, payload }, &mut buf),
                (Auth::Token(token), true) => {
                    header.token = token.as_bytes();
                    remp::encode(&Packet { header, payload }, &mut buf)
                }
                (Auth::Mac(mac), true) => mac.seal(&Packet { header, payload }, &mut buf),
                (Auth::None, true) => return Err(SessionError::NoToken(self.info.device_id)),
            }
            .map_err(SessionError::Encode)?
        };
        self.outgoing
            .send(buf[..len].to_vec())
            .await
            .map_err(|_| SessionError::Closed)
    }
}

/// Removes a pending entry however its request ends (answer, timeout or cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    key: Key,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap().remove(&self.key);
    }
}

/// Where the reader puts what the dongle sends unasked.
struct Sinks {
    frames: mpsc::Sender<Frame>,
    telemetry: mpsc::Sender<UartReport>,
}

async fn read_loop(
    mut incoming: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    sinks: Sinks,
    closed: watch::Sender<bool>,
) {
    while let Some(bytes) = incoming.recv().await {
        if !route(&bytes, &shared, &sinks) {
            shared.stats.packets_ignored.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The link is gone: every waiting request learns it at once instead of timing out.
    shared.pending.lock().unwrap().clear();
    let _ = closed.send(true);
}

/// Handles one packet from the dongle; false when it was ignored.
fn route(bytes: &[u8], shared: &Shared, sinks: &Sinks) -> bool {
    let frames = &sinks.frames;
    if bytes.starts_with(&discovery::MAGIC) {
        // A spontaneous ANNOUNCE (e.g. after the pairing window opened) carries nothing we wait for.
        return true;
    }
    let packet = {
        let Ok((header, _)) = remp::decode_header(bytes) else {
            return false;
        };
        if header.device_id != shared.device_id {
            return false;
        }
        if header.has_session_mac() {
            let mut auth = shared.auth.lock().unwrap();
            let Auth::Mac(mac) = &mut *auth else {
                return false;
            };
            match mac.open(bytes) {
                Ok(p) => p,
                Err(_) => return false,
            }
        } else {
            match remp::decode(bytes) {
                Ok(p) => p,
                Err(_) => return false,
            }
        }
    };
    let (key, answer) = match packet.payload {
        Payload::Can(frame) => {
            let mut f = Frame::classic(frame.id, frame.data()).expect("dlc <= 8");
            f.timestamp_us = packet.header.timestamp_us;
            f.loopback = frame.flags & CanFrame::FLAG_LOOPBACK != 0;
            deliver(shared, frames, f);
            return true;
        }
        Payload::CanBatch(batch) => {
            // The batch was validated whole when it was parsed, so its records are well formed.
            for record in batch.iter() {
                if let Some(mut f) = Frame::with_flags(
                    record.id,
                    record.flags & !batch::flags::LOOPBACK,
                    record.data,
                ) {
                    f.timestamp_us = record.timestamp_us;
                    f.loopback = record.flags & batch::flags::LOOPBACK != 0;
                    deliver(shared, frames, f);
                }
            }
            return true;
        }
        Payload::CliTelemetry(t) => {
            // Sent unasked, so signed: a sealed packet passed its MAC above; a plain one must carry
            // the token this session authenticated with. Anything else is somebody else's words.
            let signed = packet.header.has_session_mac()
                || matches!(&*shared.auth.lock().unwrap(), Auth::Token(token) if token.ct_eq(packet.header.token));
            if !signed {
                return false;
            }
            let report = UartReport {
                corr_id: t.corr_id,
                source: t.source,
                command: t.command.to_string(),
                output: String::from_utf8_lossy(t.output).into_owned(),
                exit_code: t.exit_code,
                truncated: t.truncated(),
                error: t.error(),
            };
            if sinks.telemetry.try_send(report).is_err() {
                shared
                    .stats
                    .telemetry_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            return true;
        }
        Payload::PairingAck(ack) => (Key::Corr(ack.corr_id), Answer::Pairing(ack)),
        Payload::CliResponse(r) => (
            Key::Corr(r.corr_id),
            Answer::Cli(CliOutcome {
                status: r.status,
                truncated: r.flags & remp::CliResponse::FLAG_TRUNCATED != 0,
                exit_code: r.exit_code,
                output: String::from_utf8_lossy(r.output).into_owned(),
            }),
        ),
        Payload::CanConfig(c) if c.action == remp::ConfigAction::Response => {
            (Key::Type(MsgType::CanConfig.to_u8()), Answer::Config(c))
        }
        Payload::Forget(f) if f.action == ForgetAction::Ack => {
            (Key::Corr(f.corr_id), Answer::Forget(f))
        }
        Payload::BusStatus(s) if s.action == BusStatusAction::Report => {
            (Key::Type(MsgType::BusStatus.to_u8()), Answer::BusStatus(s))
        }
        Payload::Auth(m) => (Key::Type(MsgType::Auth.to_u8()), Answer::Auth(m)),
        _ => return false,
    };
    let waiter = shared.pending.lock().unwrap().remove(&key);
    match waiter {
        Some(tx) => {
            let _ = tx.send(answer);
            true
        }
        // A late answer, after its request timed out: ignored, as the server ignores late results.
        None => false,
    }
}

fn deliver(shared: &Shared, frames: &mpsc::Sender<Frame>, frame: Frame) {
    shared.stats.frames_in.fetch_add(1, Ordering::Relaxed);
    if frames.try_send(frame).is_err() {
        shared.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::remp::{CliTelemetry, Header, Packet};

    const DEV: DeviceId = DeviceId([0xd1; 8]);

    /// A report from the "dongle", signed with `token` in its header.
    fn report(token: &[u8], command: &str) -> Vec<u8> {
        let mut header = Header::new(MsgType::CliTelemetry, DEV, 7);
        header.token = token;
        let payload = Payload::CliTelemetry(CliTelemetry {
            source: TelemetrySource::Uart,
            flags: CliTelemetry::FLAG_TRUNCATED,
            corr_id: CorrelationId([9; 16]),
            exit_code: 0,
            command,
            output: b"ok\n",
        });
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn only_reports_signed_with_the_sessions_token_reach_the_telemetry_queue() {
        let (to_session, incoming) = mpsc::channel(16);
        let (outgoing, _sent) = mpsc::channel(16);
        let link = Link {
            outgoing,
            incoming,
            stats: Arc::default(),
            peer: "test".into(),
        };
        let info = DongleInfo {
            device_id: DEV,
            fw_build: "test".into(),
            udp_port: 0,
            capabilities: 0,
            proto_ver: SUPPORTED_PROTO_VER,
            lan_ip: None,
            pairing_mode: false,
            pairing_nonce: None,
        };
        let session = DongleSession::start(link, info, SessionConfig::default()).unwrap();
        let mut reports = session.take_telemetry().unwrap();
        let token = DongleToken::from_bytes([0x42; 32]);
        // Before the session holds a token, nobody can be told apart from the dongle.
        to_session
            .send(report(token.as_bytes(), "early"))
            .await
            .unwrap();
        while session.stats().packets_ignored.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        session.authenticate(token).await.unwrap();
        to_session
            .send(report(&[0x43; 32], "forged"))
            .await
            .unwrap();
        to_session.send(report(&[], "unsigned")).await.unwrap();
        to_session
            .send(report(token.as_bytes(), "version"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), reports.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.command, "version");
        assert!(got.truncated && !got.error);
        assert_eq!((got.output.as_str(), got.exit_code), ("ok\n", 0));
        assert!(reports.try_recv().is_err(), "nothing else got through");
        assert_eq!(session.stats().packets_ignored.load(Ordering::Relaxed), 3);
    }
}
