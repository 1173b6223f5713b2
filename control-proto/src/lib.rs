//! The control channel between an agent and the server: the JSON text messages of the WebSocket
//! `/ws/agent`. This module is the protocol's reference; the server and the agent both speak it through
//! these types, so neither can drift from the other.
//!
//! # Connection
//!
//! The agent opens `GET /ws/agent` with `Authorization: Bearer <agent token>` (the token from
//! `POST /api/v1/agents/register`). A revoked, expired or unknown token is refused with 401 before the
//! upgrade. Every message is one WebSocket text frame holding one JSON object whose `type` field names it.
//! Unknown fields are ignored by both sides, so either side may add optional fields without breaking the
//! other; a new message `type` needs a [`PROTOCOL_VERSION`] bump.
//!
//! # Agent -> server ([`AgentMessage`])
//!
//! | `type` | when | what it carries |
//! |---|---|---|
//! | `hello` | first message, once | `protocol` version, `agent_version`, `hostname`, `os`, and `interfaces` (each with its addresses and whether discovery uses it, or why not) |
//! | `heartbeat` | every 10 s | nothing; keeps the agent online (offline after 30 s of silence) |
//! | `devices` | after `welcome`, and whenever the set or a state changes | the full snapshot of the dongles the agent sees: anything not listed is no longer seen; from protocol 2 also its local CAN endpoints (`transport.kind = "local"`) |
//! | `reply` | answer to a server `request` | the request's `id` and `result` (`ok` with a body, or `error {code, message}`) |
//! | `event` | unsolicited | e.g. `token_rejected` for a claimed dongle that no longer accepts its token (the server marks it RESET_DETECTED) |
//! | `command_result` | when a command the agent accepted has ended, and again after every reconnect until acknowledged | the [`CommandResult`]: command id, outcome, exit code, output, truncated flag |
//! | `cli_telemetry` | when a dongle reports a command typed on its UART console (protocol 4), and again after every reconnect until acknowledged | the [`CliTelemetry`]: report id, device id, source, command, output, exit code, truncated and error flags |
//!
//! # Server -> agent ([`ServerMessage`])
//!
//! | `type` | when | what it carries |
//! |---|---|---|
//! | `welcome` | answer to `hello` | the `agent_id`, the heartbeat period in seconds, the server's protocol version |
//! | `request` | whenever the server needs the agent to act | an `id` (unique per connection), a `timeout_ms` after which the server stops waiting, and a [`RequestBody`] |
//! | `dongle_token` | after a pairing succeeds, and when the agent reports a claimed dongle of its own user | the plaintext token (base64) of that dongle, for the agent's vault |
//! | `command_result_ack` | after the server stored a `command_result` (or already had it) | the `command_id`; the agent drops the result from its outbox |
//! | `groups` | after `welcome`, and whenever a group of the agent's dongles changes | the full list of [`GroupSide`]s the agent should stream on `/ws/data` (anything not listed: stop) |
//! | `cli_telemetry_ack` | after the server stored a `cli_telemetry` (or already had it; protocol 4) | the `report_id`; the agent drops the report |
//! | `watch` | every 2 s while somebody watches the console of a dongle the agent serves (protocol 4) | [`Watch`]: the device ids whose own traffic the agent streams on `/ws/data` as MONITOR messages for the next `seconds` (0: stop now) |
//! | `error` | before the server closes the socket for a protocol violation, or after a `hello` of a protocol older than [`MIN_AGENT_PROTOCOL`] (`agent_too_old`: served, but told to upgrade) | `code`, `message` |
//!
//! Request bodies ([`RequestBody`], field `body.type`): `pairing_start`, `pairing_submit`, `forget`,
//! `can_config`, `command`, `send_frame`, from protocol 4 `host_command` (a network diagnostic on
//! the agent's workstation, whose output also streams as `host_output` events), and from protocol 5
//! `latency_probe` (a part in an admin's latency test of a group: see [`probe`]). The agent answers each with exactly one `reply` of the same `id`;
//! a reply after the timeout is dropped by the server. The `ok` body of each reply is [`ReplyOk`]; error
//! codes are [`ReplyErrorCode`].
//!
//! # Commands: at least once in, exactly once out
//!
//! A `command` request is answered at once with `command_accepted`: the agent has written the command to
//! its journal on disk and runs it (or has run it: a command id it already knows is never run twice, and
//! its stored result is sent again). The outcome travels separately as `command_result`, kept in the
//! agent's on-disk outbox until the server answers `command_result_ack`, so a result survives a lost
//! connection or an agent restart. The server may therefore send the same command more than once and
//! receive the same result more than once; both sides make that harmless (the server's command states
//! only move forward).
//!
//! Secrets (tokens, PINs) travel only inside `pairing_submit` and `dongle_token`, over the authenticated
//! channel; neither side logs them, and the `Debug` output of those messages redacts them.

pub mod data;
pub mod probe;

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of this message set; sent in `hello` and `welcome`.
///
/// Version 2 added local CAN endpoints: [`Transport::Local`] in device reports and
/// [`ReplyErrorCode::NotSettable`] in replies. An agent lists its local endpoints only to a server
/// whose `welcome` says 2 or more, so that an older server never meets a transport it cannot read.
/// Version 3 added [`Event::TokenAccepted`], sent only to servers whose `welcome` says 3 or more.
/// Version 4 added [`ServerMessage::Watch`] and the MONITOR data message (a dongle's own traffic for its
/// console), sent only to agents whose `hello` says 4 or more ([`ServerMessage::since`]), and
/// [`AgentMessage::CliTelemetry`] (acknowledged by `cli_telemetry_ack`), sent only to servers whose
/// `welcome` says 4 or more.
/// Version 5 added [`RequestBody::LatencyProbe`] (the dashboard's latency benchmark through a group),
/// sent only to agents whose `hello` says 5 or more.
pub const PROTOCOL_VERSION: u32 = 5;

/// The first protocol version that carries local endpoints.
pub const LOCAL_ENDPOINTS_SINCE: u32 = 2;

/// The first protocol version that carries [`Event::TokenAccepted`].
pub const TOKEN_ACCEPTED_SINCE: u32 = 3;

/// The first protocol version that carries [`ServerMessage::Watch`] and MONITOR data messages, and
/// [`AgentMessage::CliTelemetry`] with its acknowledgement.
pub const WATCH_SINCE: u32 = 4;

/// The first protocol version that carries [`RequestBody::LatencyProbe`].
pub const PROBE_SINCE: u32 = 5;

/// The heartbeat period the server asks for, in seconds.
pub const DEFAULT_HEARTBEAT_SECS: u32 = 10;

/// A dongle's device id, 16 lower-case hex characters on the wire: every message that names a device
/// carries this type, so a message that parses names only well-formed ids.
pub use firmware_proto::ids::DeviceId;

/// The PIN a user types (6 digits) and the dongle's token (32 bytes, standard base64 on the wire), as
/// [`RequestBody::PairingSubmit`] and [`DongleToken`] carry them; their `Debug` output is redacted.
pub use firmware_proto::ids::{DongleToken as Token, Pin};

/// A CAN controller's mode, by its name on the wire (`normal`, `listen_only`, `loopback`,
/// `ext_loop`).
pub use firmware_proto::remp::CanMode;

/// True when `s` is a well-formed device id (16 lower-case hex characters).
pub fn is_device_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The device id of the local endpoint `identity` (for example `socketcand:127.0.0.1:29536`) of agent
/// `agent_id`: `10 ca` followed by the first 6 bytes of
/// `SHA-256("local:" || agent_id as 36 lower-case hyphenated characters || ":" || identity)`.
///
/// Both sides compute it: the agent to name its endpoint, the server to check a report. Since the
/// agent's id is part of the input, an agent cannot claim as "local" the id of a real dongle or of
/// another agent's endpoint, and so cannot obtain either without pairing.
pub fn local_device_id(agent_id: Uuid, identity: &str) -> DeviceId {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"local:");
    hash.update(agent_id.hyphenated().to_string().as_bytes());
    hash.update(b":");
    hash.update(identity.as_bytes());
    let digest = hash.finalize();
    let mut id = [0x10, 0xca, 0, 0, 0, 0, 0, 0];
    id[2..].copy_from_slice(&digest[..6]);
    DeviceId::from_bytes(id)
}

/// A message from the agent to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(Hello),
    Heartbeat,
    Devices(Devices),
    Reply(Reply),
    Event(Event),
    CommandResult(CommandResult),
    /// A command typed on a dongle's UART console (protocol 4), sent until the server acknowledges
    /// it.
    CliTelemetry(CliTelemetry),
}

/// The first message of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    /// The workstation's network interfaces, and which the LAN discovery uses (v0.7 section 9.2).
    /// Absent from older agents.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceReport>,
}

/// One network interface of the agent's workstation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceReport {
    pub name: String,
    /// Its IPv4 addresses, dotted.
    pub addresses: Vec<String>,
    /// The LAN discovery broadcasts DISCOVER on it.
    pub used_for_discovery: bool,
    /// Why it is not used, when it is not (down, loopback, a VPN or container bridge, no broadcast).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded_because: Option<String>,
}

/// The oldest agent protocol this server version supports fully; an older agent is served but told to
/// upgrade.
pub const MIN_AGENT_PROTOCOL: u32 = 2;

/// The full set of dongles the agent sees right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Devices {
    pub dongles: Vec<DongleReport>,
}

/// One dongle as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct DongleReport {
    /// 16 lower-case hex characters.
    #[cfg_attr(
        feature = "utoipa",
        schema(value_type = String, pattern = "^[0-9a-f]{16}$")
    )]
    pub device_id: DeviceId,
    pub fw_build: String,
    #[cfg_attr(feature = "utoipa", schema(maximum = 255))]
    pub proto_ver: u8,
    /// The capability bits of the dongle's ANNOUNCE.
    #[cfg_attr(
        feature = "utoipa",
        schema(value_type = u64, maximum = 4294967295_u64)
    )]
    pub capabilities: u32,
    pub transport: Transport,
    /// The dongle is in pairing mode now.
    pub pairing_mode: bool,
    /// The dongle answers (false: known to the agent but not reachable).
    pub present: bool,
    /// The dongle says it holds a token (it is claimed as far as it knows).
    #[serde(default)]
    #[cfg_attr(feature = "utoipa", schema(required = false))]
    pub claimed: bool,
}

/// How the agent reaches a dongle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema), schema(as = DongleTransport))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Transport {
    Usb {
        path: String,
        serial_number: Option<String>,
    },
    Lan {
        /// `IP:PORT` of the dongle.
        addr: String,
    },
    /// A CAN endpoint of the agent's workstation standing in for a dongle (protocol 2): its device id
    /// is [`local_device_id`] of the agent and `identity`, and the server gives it to the agent's
    /// user without pairing.
    Local {
        /// `socketcan`, `slcan` or `socketcand`.
        endpoint: String,
        /// The endpoint's identity, the input of its device id: `slcan:/dev/ttyACM0`.
        identity: String,
        /// Where it is: the interface, the serial port, or the address a socketcand port listens on.
        location: String,
        /// Whether the agent can set its bit timing (an slcan adapter can; SocketCAN takes it from
        /// the kernel, and a socketcand port has no bus of its own).
        can_set_timing: bool,
    },
}

impl fmt::Display for Transport {
    /// The link in a few words, as the agent's `list` and `status` show it: `usb /dev/ttyACM0`,
    /// `lan 192.168.1.20:50000`, `local socketcand 127.0.0.1:29536`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usb { path, .. } => write!(f, "usb {path}"),
            Self::Lan { addr } => write!(f, "lan {addr}"),
            Self::Local {
                endpoint, location, ..
            } => write!(f, "local {endpoint} {location}"),
        }
    }
}

/// The agent's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: ReplyResult,
}

/// The outcome of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReplyResult {
    Ok { body: ReplyOk },
    Error(ReplyError),
}

/// The body of a successful reply, one per request kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyOk {
    /// The dongle is in pairing mode and shows its PIN.
    PairingStarted {
        /// The dongle's 16-byte pairing nonce, hex.
        pairing_nonce: String,
        /// How long the dongle stays in pairing mode.
        expires_in_ms: u64,
    },
    /// The dongle accepted the PIN and holds the token now.
    Paired,
    Forgotten,
    /// The dongle applied a CAN configuration; `effective` holds the values it uses.
    CanConfigApplied {
        effective: CanEffective,
    },
    /// The agent holds the command in its journal; the outcome follows as `command_result`.
    CommandAccepted,
    /// The dongle took the frame for transmission.
    FrameSent,
    /// A host command ended (protocol 4).
    HostCommandDone {
        exit_code: i32,
        /// Everything it printed (bytes that are not UTF-8 replaced), cut at the agent's limit.
        output: String,
        truncated: bool,
    },
    /// The agent sends the run's probes back from now on (protocol 5).
    ProbeArmed,
    /// The agent sent its probes and counted their echoes (protocol 5).
    ProbeDone {
        summary: ProbeSummary,
    },
}

/// What an agent does in a latency benchmark ([`RequestBody::LatencyProbe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum ProbeRole {
    /// Send `count` probes at `rate` a second into the side's stream, as if its dongle had received
    /// them, and time their echoes; answer with [`ReplyOk::ProbeDone`] once every echo is back, or once
    /// none came for `settle_ms` after the last probe left.
    Send {
        count: u32,
        rate: u32,
        settle_ms: u64,
    },
    /// For `seconds`, send every probe of the run that arrives for the side back into the side's own
    /// stream instead of putting it on the dongle's bus; answer with [`ReplyOk::ProbeArmed`] at once.
    Echo { seconds: u32 },
}

/// Round-trip times of a latency benchmark, in microseconds (nearest-rank quantiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundTrips {
    pub min_us: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// What the sending agent of a latency benchmark counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub sent: u32,
    /// Probes whose echo came back (each counted once).
    pub received: u32,
    pub duplicates: u64,
    /// Echoes that came after one of a higher number.
    pub out_of_order: u64,
    /// None when no echo came back.
    pub round_trip: Option<RoundTrips>,
}

/// The network diagnostics an agent runs on its workstation for a dongle it serves: allow-listed,
/// without arguments from the server (the agent fills in the dongle's own address), never through a
/// shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostCommand {
    /// The workstation's network interfaces and which the LAN discovery uses.
    Interfaces,
    /// `ip -brief address` (Linux).
    IpAddr,
    /// `ping -c 3` of the dongle's LAN address (LAN dongles only).
    Ping,
}

impl HostCommand {
    pub const ALL: [HostCommand; 3] = [
        HostCommand::Interfaces,
        HostCommand::IpAddr,
        HostCommand::Ping,
    ];

    /// The name the API and the console use.
    pub fn name(self) -> &'static str {
        match self {
            HostCommand::Interfaces => "interfaces",
            HostCommand::IpAddr => "ip addr",
            HostCommand::Ping => "ping",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name.trim())
    }
}

/// A CAN configuration to apply, as the server asks for it: the nominal bitrate and sample point from
/// which the dongle derives its bit timing, or with `use_raw` the raw timing fields (sent only then).
/// The server checked every range before sending it, and stores and shows it in this shape too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct CanSettings {
    pub bitrate: u32,
    pub sample_point_permille: u16,
    /// `normal`, `listen_only`, `loopback` or `ext_loop`.
    #[cfg_attr(feature = "utoipa", schema(value_type = String))]
    pub mode: CanMode,
    pub use_raw: bool,
    pub prescaler: Option<u16>,
    pub sjw: Option<u8>,
    pub tseg1: Option<u8>,
    pub tseg2: Option<u8>,
    pub auto_retx: bool,
    pub tx_pause: bool,
    pub protocol_exc: bool,
}

impl CanSettings {
    /// Settings from which a dongle derives its timing: `bitrate` at `sample_point_permille`, in
    /// `mode`, with automatic retransmission (the firmware's default) and no raw fields.
    pub fn derived(bitrate: u32, sample_point_permille: u16, mode: CanMode) -> Self {
        Self {
            bitrate,
            sample_point_permille,
            mode,
            use_raw: false,
            prescaler: None,
            sjw: None,
            tseg1: None,
            tseg2: None,
            auto_retx: true,
            tx_pause: false,
            protocol_exc: false,
        }
    }

    /// The REMP CAN_CONFIG SET request that applies these settings (raw fields absent are 0).
    pub fn to_remp(&self) -> firmware_proto::remp::CanConfig {
        use firmware_proto::remp::{self, ConfigAction, ConfigStatus};
        let flags = [
            (self.use_raw, remp::CanConfig::FLAG_USE_RAW),
            (self.auto_retx, remp::CanConfig::FLAG_AUTO_RETX),
            (self.tx_pause, remp::CanConfig::FLAG_TX_PAUSE),
            (self.protocol_exc, remp::CanConfig::FLAG_PROTOCOL_EXC),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, flag)| flags | flag);
        remp::CanConfig {
            action: ConfigAction::Set,
            status: ConfigStatus::Ok,
            bitrate: self.bitrate,
            sample_point_permille: self.sample_point_permille,
            prescaler: self.prescaler.unwrap_or(0),
            sjw: self.sjw.unwrap_or(0),
            tseg1: self.tseg1.unwrap_or(0),
            tseg2: self.tseg2.unwrap_or(0),
            mode: self.mode,
            flags,
        }
    }
}

/// The CAN configuration a dongle reports it uses after applying one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub struct CanEffective {
    pub bitrate: u32,
    pub sample_point_permille: u16,
    pub prescaler: u16,
    pub sjw: u8,
    pub tseg1: u8,
    pub tseg2: u8,
    /// `normal`, `listen_only`, `loopback` or `ext_loop`.
    #[cfg_attr(feature = "utoipa", schema(value_type = String))]
    pub mode: CanMode,
    pub use_raw: bool,
    pub auto_retx: bool,
    pub tx_pause: bool,
    pub protocol_exc: bool,
}

impl CanEffective {
    /// The values of a dongle's CAN_CONFIG response.
    pub fn from_remp(c: &firmware_proto::remp::CanConfig) -> Self {
        use firmware_proto::remp::CanConfig as C;
        Self {
            bitrate: c.bitrate,
            sample_point_permille: c.sample_point_permille,
            prescaler: c.prescaler,
            sjw: c.sjw,
            tseg1: c.tseg1,
            tseg2: c.tseg2,
            mode: c.mode,
            use_raw: c.flags & C::FLAG_USE_RAW != 0,
            auto_retx: c.flags & C::FLAG_AUTO_RETX != 0,
            tx_pause: c.flags & C::FLAG_TX_PAUSE != 0,
            protocol_exc: c.flags & C::FLAG_PROTOCOL_EXC != 0,
        }
    }
}

/// How a command ended, as the dongle (or the agent, for `error`) tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// The dongle ran the command; `exit_code` says how it went.
    Done,
    /// The dongle refused to run it (not allowed, or dangerous without the flag).
    Denied,
    /// The command failed, or the agent could not get it to the dongle (see `message`).
    Error,
    /// The dongle stopped the command at its timeout, or never answered.
    Timeout,
}

/// The end of a command, sent until the server acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: Uuid,
    pub device_id: DeviceId,
    pub outcome: CommandOutcome,
    pub exit_code: i32,
    /// What the dongle printed (bytes that are not UTF-8 replaced).
    pub output: String,
    /// The dongle cut the output at its own limit.
    pub truncated: bool,
    /// Why the agent reports `error` on its own (the dongle went away, the agent restarted mid-command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A command typed on a dongle's UART console and its outcome, as the dongle reported it (REMP
/// CLI_TELEMETRY) to the agent, which checked that the report carried the dongle's token or session
/// MAC. Sent again after every reconnect until the server answers `cli_telemetry_ack`; `report_id`
/// (the dongle's correlation id) makes a report sent twice one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CliTelemetry {
    pub report_id: Uuid,
    pub device_id: DeviceId,
    /// Where the command was typed: `uart`, or `source_N` for a source this version does not know.
    pub source: String,
    pub command: String,
    /// What the dongle printed (bytes that are not UTF-8 replaced).
    pub output: String,
    pub exit_code: i32,
    /// The dongle cut the output at its own limit.
    pub truncated: bool,
    /// The command could not run.
    pub error: bool,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyError {
    pub code: ReplyErrorCode,
    pub message: String,
}

/// The closed list of reply error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyErrorCode {
    /// The agent does not serve this dongle (any more).
    UnknownDevice,
    /// The dongle did not answer in time.
    DongleTimeout,
    /// The dongle rejected the PIN.
    InvalidPin,
    /// The dongle refuses pairing attempts for a while.
    Cooldown,
    /// The dongle is not in pairing mode (or the window ended).
    NotInPairingMode,
    /// The dongle refused the request (NACK), with its reason in the message.
    Refused,
    /// The agent does not know this request (older agent).
    Unsupported,
    /// The dongle is a local endpoint that cannot apply this setting (its bit timing is set
    /// elsewhere); the message says where (protocol 2).
    NotSettable,
    /// Anything else.
    Internal,
}

/// Something the agent noticed on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A dongle the server says is claimed rejected its token (factory reset or another token).
    TokenRejected { device_id: DeviceId },
    /// A dongle took its token: the agent authenticated to it (protocol 3). A dongle the server marked
    /// RESET_DETECTED after a rejection that was really a bad link is the owner's again.
    TokenAccepted { device_id: DeviceId },
    /// A piece of a running host command's output, a line or so at a time (protocol 4).
    HostOutput {
        run_id: Uuid,
        device_id: DeviceId,
        chunk: String,
    },
}

/// A message from the server to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome(Welcome),
    Request(Request),
    DongleToken(DongleToken),
    /// The server stored the result of this command; the agent may forget it.
    CommandResultAck {
        command_id: Uuid,
    },
    /// The group sides this agent serves now (see [`data`]).
    Groups(Groups),
    /// Dongles whose own traffic somebody watches on the console (protocol 4).
    Watch(Watch),
    /// The server stored this UART report (or already had it); the agent may forget it (protocol 4).
    CliTelemetryAck {
        report_id: Uuid,
    },
    Error {
        code: String,
        message: String,
    },
}

/// Dongles whose console somebody watches: for the next `seconds`, the agent streams the frames each of
/// them receives on `/ws/data` as MONITOR messages ([`data::Monitor`]), sampled at the agent above a
/// rate with exact counts. A dongle that is the side of a group the agent serves is not monitored: its
/// frames go to the group's stream, and the relay shows them on the console already.
///
/// Watches are not a list that replaces the previous one: each names dongles to watch (or, with
/// `seconds` 0, to stop watching) and expires on its own, so that every server instance with a console
/// open can send its own and none has to know the others'. The server repeats a watch every
/// [`WATCH_REFRESH_SECS`] while the console stays open, well within `seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub device_ids: Vec<DeviceId>,
    pub seconds: u32,
}

/// How often the server repeats a [`Watch`] while a console stays open.
pub const WATCH_REFRESH_SECS: u32 = 2;
/// How long one [`Watch`] lasts unless repeated: a few refreshes, so that one lost message does not
/// interrupt the console.
pub const WATCH_SECS: u32 = 6;
/// The longest watch an agent accepts, whatever a server asks.
pub const MAX_WATCH_SECS: u32 = 60;

/// The group sides an agent serves: the full list, replacing any earlier one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Groups {
    pub sides: Vec<GroupSide>,
}

/// One side of an ACTIVE or DEGRADED group whose dongle this agent serves: stream the dongle's frames
/// to the server on `/ws/data` tagged with `group_id` and `side`, and transmit what arrives for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSide {
    pub group_id: Uuid,
    pub side: data::Side,
    pub device_id: DeviceId,
    /// The position of the first frame of this side's stream the server has not got yet; the agent
    /// numbers its next frames from here.
    pub next_seq: u64,
}

/// The answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub agent_id: Uuid,
    pub heartbeat_secs: u32,
    pub protocol: u32,
}

/// A request the agent must answer with one `reply` of the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub timeout_ms: u64,
    pub body: RequestBody,
}

/// What the server asks of the agent.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestBody {
    /// Put the dongle in pairing mode (it draws a PIN and a nonce).
    PairingStart { device_id: DeviceId, corr_id: Uuid },
    /// Hand the dongle the PIN the user typed, its nonce and the new token.
    PairingSubmit {
        device_id: DeviceId,
        corr_id: Uuid,
        pin: Pin,
        /// 16 bytes, hex.
        pairing_nonce: String,
        token: Token,
    },
    /// Tell the dongle to forget its token, and drop it from the agent's vault.
    Forget { device_id: DeviceId },
    /// Apply a CAN configuration. Optional raw timing fields are sent only with `use_raw`.
    CanConfig {
        device_id: DeviceId,
        #[serde(flatten)]
        settings: CanSettings,
    },
    /// Run an allow-listed CLI command on the dongle; answered by `command_accepted`, ended by a
    /// `command_result`. `line` is the command and its arguments as the dongle's CLI reads them.
    Command {
        command_id: Uuid,
        device_id: DeviceId,
        line: String,
        timeout_ms: u64,
        allow_dangerous: bool,
    },
    /// Run a network diagnostic on the agent's own workstation about a dongle it serves (protocol 4);
    /// the output streams as `host_output` events tagged with `run_id`, and the reply carries all of
    /// it. An agent whose owner turned host commands off refuses.
    HostCommand {
        run_id: Uuid,
        device_id: DeviceId,
        command: HostCommand,
    },
    /// Take part in a latency benchmark through the group `group_id`, whose side `side` this agent
    /// serves (protocol 5; see [`probe`]).
    LatencyProbe {
        run_id: Uuid,
        /// The dongle of the side.
        device_id: DeviceId,
        group_id: Uuid,
        side: data::Side,
        role: ProbeRole,
    },
    /// Transmit one CAN frame by hand.
    SendFrame {
        device_id: DeviceId,
        can_id: u32,
        extended: bool,
        rtr: bool,
        /// Up to 8 bytes (64 for FD), hex.
        data: String,
        /// A CAN FD frame (the dongle must announce FD).
        #[serde(default)]
        fd: bool,
    },
}

impl fmt::Debug for RequestBody {
    // By hand, so that the PIN and the token never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PairingStart { device_id, corr_id } => f
                .debug_struct("PairingStart")
                .field("device_id", device_id)
                .field("corr_id", corr_id)
                .finish(),
            Self::PairingSubmit {
                device_id, corr_id, ..
            } => f
                .debug_struct("PairingSubmit")
                .field("device_id", device_id)
                .field("corr_id", corr_id)
                .finish_non_exhaustive(),
            Self::Forget { device_id } => f
                .debug_struct("Forget")
                .field("device_id", device_id)
                .finish(),
            Self::CanConfig {
                device_id,
                settings,
            } => f
                .debug_struct("CanConfig")
                .field("device_id", device_id)
                .field("settings", settings)
                .finish(),
            Self::Command {
                command_id,
                device_id,
                line,
                ..
            } => f
                .debug_struct("Command")
                .field("command_id", command_id)
                .field("device_id", device_id)
                .field("line", line)
                .finish_non_exhaustive(),
            Self::SendFrame {
                device_id, can_id, ..
            } => f
                .debug_struct("SendFrame")
                .field("device_id", device_id)
                .field("can_id", can_id)
                .finish_non_exhaustive(),
            Self::HostCommand {
                run_id,
                device_id,
                command,
            } => f
                .debug_struct("HostCommand")
                .field("run_id", run_id)
                .field("device_id", device_id)
                .field("command", command)
                .finish(),
            Self::LatencyProbe {
                run_id,
                device_id,
                group_id,
                side,
                role,
            } => f
                .debug_struct("LatencyProbe")
                .field("run_id", run_id)
                .field("device_id", device_id)
                .field("group_id", group_id)
                .field("side", side)
                .field("role", role)
                .finish(),
        }
    }
}

/// The token of a dongle the agent serves and its user owns.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DongleToken {
    pub device_id: DeviceId,
    pub token: Token,
}

impl fmt::Debug for DongleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DongleToken")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl AgentMessage {
    /// The JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages always serialize")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The answer to a server message that does not parse but is a request with an id: a request type
/// this side does not know, or a field it reads otherwise (a newer server). Answered as unsupported at
/// once, so that the server does not wait for its timeout. The answer names the request's type when
/// it is a plain word, and never repeats any value of the request (a PIN or a token may be among
/// them). `None` for anything else, which there is nobody to answer.
pub fn unreadable_request_reply(text: &str) -> Option<AgentMessage> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "type")]
        kind: String,
        id: u64,
        #[serde(default)]
        body: Option<serde_json::Value>,
    }
    let envelope: Envelope = serde_json::from_str(text).ok()?;
    if envelope.kind != "request" {
        return None;
    }
    let kind = envelope
        .body
        .as_ref()
        .and_then(|body| body.get("type"))
        .and_then(serde_json::Value::as_str)
        .filter(|k| !k.is_empty() && k.len() <= 40)
        .filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    let message = match kind {
        Some(kind) => format!(
            "this agent cannot read the request `{kind}` (a request it does not know, or one of its \
             fields in a form it does not read): update the agent"
        ),
        None => "this agent cannot read the request: update the agent".to_string(),
    };
    Some(AgentMessage::Reply(Reply {
        id: envelope.id,
        result: ReplyResult::Error(ReplyError {
            code: ReplyErrorCode::Unsupported,
            message,
        }),
    }))
}

impl RequestBody {
    /// The device the request is about.
    pub fn device_id(&self) -> DeviceId {
        match self {
            RequestBody::PairingStart { device_id, .. }
            | RequestBody::PairingSubmit { device_id, .. }
            | RequestBody::Forget { device_id }
            | RequestBody::CanConfig { device_id, .. }
            | RequestBody::Command { device_id, .. }
            | RequestBody::HostCommand { device_id, .. }
            | RequestBody::LatencyProbe { device_id, .. }
            | RequestBody::SendFrame { device_id, .. } => *device_id,
        }
    }
}

impl ServerMessage {
    /// The first protocol version whose agents understand this message. An agent of an older version
    /// closes its connection on a message type it does not know, so the server never sends it one.
    pub fn since(&self) -> u32 {
        match self {
            Self::Watch(_) | Self::CliTelemetryAck { .. } => WATCH_SINCE,
            Self::Request(Request {
                body: RequestBody::HostCommand { .. },
                ..
            }) => WATCH_SINCE,
            Self::Request(Request {
                body: RequestBody::LatencyProbe { .. },
                ..
            }) => PROBE_SINCE,
            _ => 1,
        }
    }

    /// The JSON text of the message.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages always serialize")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A request a newer server sends (a type this side does not know, or a field it reads otherwise)
    /// is answered as unsupported at once, rather than left to the server's timeout; the reply names
    /// the request's type and never repeats its values.
    #[test]
    fn a_request_this_side_cannot_read_is_answered_as_unsupported() {
        let text = r#"{"type": "request", "id": 7, "timeout_ms": 5000, "body": {"type": "frobnicate", "device_id": "0011223344556677", "pin": 123456}}"#;
        assert!(ServerMessage::from_json(text).is_err());
        let reply = unreadable_request_reply(text).expect("answered");
        let AgentMessage::Reply(Reply { id, result }) = reply else {
            panic!("not a reply: {reply:?}");
        };
        assert_eq!(id, 7);
        let ReplyResult::Error(ReplyError { code, message }) = result else {
            panic!("not an error: {result:?}");
        };
        assert_eq!(code, ReplyErrorCode::Unsupported);
        assert!(message.contains("frobnicate"), "{message}");
        assert!(!message.contains("123456"), "{message}");

        // A known type with a field of the wrong type: the same answer.
        let text = r#"{"type": "request", "id": 8, "timeout_ms": 5000, "body": {"type": "forget", "device_id": 5}}"#;
        assert!(matches!(
            unreadable_request_reply(text),
            Some(AgentMessage::Reply(Reply {
                id: 8,
                result: ReplyResult::Error(_)
            }))
        ));
        // Not a request, no id, or not JSON at all: nothing to answer.
        for text in [
            r#"{"type": "groups", "sides": 5}"#,
            r#"{"type": "request", "body": {"type": "frobnicate"}}"#,
            r#"{"type": "request", "id": -1}"#,
            "not json",
        ] {
            assert!(unreadable_request_reply(text).is_none(), "{text}");
        }
    }

    fn agent_round_trip(msg: AgentMessage, expected: Value) {
        let text = msg.to_json();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        assert_eq!(AgentMessage::from_json(&text).unwrap(), msg);
    }

    fn server_round_trip(msg: ServerMessage, expected: Value) {
        let text = msg.to_json();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        assert_eq!(ServerMessage::from_json(&text).unwrap(), msg);
    }

    const DEV: &str = "0123456789abcdef";

    fn dev() -> DeviceId {
        DEV.parse().unwrap()
    }

    /// A token of 32 zero bytes, and its base64.
    const TOKEN: Token = Token::from_bytes([0; 32]);
    const TOKEN_TEXT: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn hello_and_heartbeat() {
        agent_round_trip(
            AgentMessage::Hello(Hello {
                protocol: 1,
                agent_version: "0.1.0".into(),
                hostname: "bench-1".into(),
                os: "linux".into(),
                interfaces: vec![],
            }),
            json!({"type": "hello", "protocol": 1, "agent_version": "0.1.0", "hostname": "bench-1", "os": "linux"}),
        );
        agent_round_trip(AgentMessage::Heartbeat, json!({"type": "heartbeat"}));
    }

    #[test]
    fn devices_snapshot() {
        agent_round_trip(
            AgentMessage::Devices(Devices {
                dongles: vec![
                    DongleReport {
                        device_id: dev(),
                        fw_build: "1.4.2".into(),
                        proto_ver: 1,
                        capabilities: 3,
                        transport: Transport::Usb {
                            path: "/dev/ttyACM0".into(),
                            serial_number: Some("A1".into()),
                        },
                        pairing_mode: false,
                        present: true,
                        claimed: false,
                    },
                    DongleReport {
                        device_id: "fedcba9876543210".parse().unwrap(),
                        fw_build: "1.4.2".into(),
                        proto_ver: 1,
                        capabilities: 0,
                        transport: Transport::Lan {
                            addr: "192.168.1.20:50000".into(),
                        },
                        pairing_mode: true,
                        present: true,
                        claimed: true,
                    },
                ],
            }),
            json!({"type": "devices", "dongles": [
                {"device_id": DEV, "fw_build": "1.4.2", "proto_ver": 1, "capabilities": 3,
                 "transport": {"kind": "usb", "path": "/dev/ttyACM0", "serial_number": "A1"},
                 "pairing_mode": false, "present": true, "claimed": false},
                {"device_id": "fedcba9876543210", "fw_build": "1.4.2", "proto_ver": 1, "capabilities": 0,
                 "transport": {"kind": "lan", "addr": "192.168.1.20:50000"},
                 "pairing_mode": true, "present": true, "claimed": true},
            ]}),
        );
    }

    #[test]
    fn local_endpoints_and_their_ids() {
        let agent: Uuid = "6f1c2a9e-0b7d-4c38-9a51-3e2f8d4b7c10".parse().unwrap();
        let id = local_device_id(agent, "socketcand:127.0.0.1:29536");
        assert!(id.to_string().starts_with("10ca"), "{id}");
        assert_eq!(id, local_device_id(agent, "socketcand:127.0.0.1:29536"));
        assert_ne!(id, local_device_id(agent, "socketcand:127.0.0.1:29537"));
        assert_ne!(
            id,
            local_device_id(Uuid::nil(), "socketcand:127.0.0.1:29536")
        );
        agent_round_trip(
            AgentMessage::Devices(Devices {
                dongles: vec![DongleReport {
                    device_id: id,
                    fw_build: "local".into(),
                    proto_ver: 1,
                    capabilities: 2,
                    transport: Transport::Local {
                        endpoint: "socketcand".into(),
                        identity: "socketcand:127.0.0.1:29536".into(),
                        location: "127.0.0.1:29536".into(),
                        can_set_timing: false,
                    },
                    pairing_mode: false,
                    present: true,
                    claimed: true,
                }],
            }),
            json!({"type": "devices", "dongles": [
                {"device_id": id, "fw_build": "local", "proto_ver": 1, "capabilities": 2,
                 "transport": {"kind": "local", "endpoint": "socketcand",
                   "identity": "socketcand:127.0.0.1:29536", "location": "127.0.0.1:29536",
                   "can_set_timing": false},
                 "pairing_mode": false, "present": true, "claimed": true},
            ]}),
        );
        let reply: Reply = serde_json::from_value(
            json!({"id": 3, "result": {"status": "error", "code": "not_settable", "message": "m"}}),
        )
        .unwrap();
        assert!(matches!(
            reply.result,
            ReplyResult::Error(ReplyError {
                code: ReplyErrorCode::NotSettable,
                ..
            })
        ));
    }

    #[test]
    fn replies_and_events() {
        agent_round_trip(
            AgentMessage::Reply(Reply {
                id: 7,
                result: ReplyResult::Ok {
                    body: ReplyOk::PairingStarted {
                        pairing_nonce: "00".repeat(16),
                        expires_in_ms: 120_000,
                    },
                },
            }),
            json!({"type": "reply", "id": 7, "result": {"status": "ok", "body":
                {"type": "pairing_started", "pairing_nonce": "00".repeat(16), "expires_in_ms": 120000}}}),
        );
        agent_round_trip(
            AgentMessage::Reply(Reply {
                id: 8,
                result: ReplyResult::Error(ReplyError {
                    code: ReplyErrorCode::InvalidPin,
                    message: "wrong PIN".into(),
                }),
            }),
            json!({"type": "reply", "id": 8, "result": {"status": "error", "code": "invalid_pin", "message": "wrong PIN"}}),
        );
        agent_round_trip(
            AgentMessage::Event(Event::TokenRejected { device_id: dev() }),
            json!({"type": "event", "event": "token_rejected", "device_id": DEV}),
        );
        agent_round_trip(
            AgentMessage::Event(Event::TokenAccepted { device_id: dev() }),
            json!({"type": "event", "event": "token_accepted", "device_id": DEV}),
        );
    }

    #[test]
    fn server_messages() {
        let agent_id = Uuid::nil();
        server_round_trip(
            ServerMessage::Welcome(Welcome {
                agent_id,
                heartbeat_secs: 10,
                protocol: 1,
            }),
            json!({"type": "welcome", "agent_id": agent_id, "heartbeat_secs": 10, "protocol": 1}),
        );
        server_round_trip(
            ServerMessage::Request(Request {
                id: 1,
                timeout_ms: 5000,
                body: RequestBody::PairingStart {
                    device_id: dev(),
                    corr_id: agent_id,
                },
            }),
            json!({"type": "request", "id": 1, "timeout_ms": 5000, "body":
                {"type": "pairing_start", "device_id": DEV, "corr_id": agent_id}}),
        );
        server_round_trip(
            ServerMessage::Request(Request {
                id: 2,
                timeout_ms: 5000,
                body: RequestBody::PairingSubmit {
                    device_id: dev(),
                    corr_id: agent_id,
                    pin: Pin::parse("123456").unwrap(),
                    pairing_nonce: "ab".repeat(16),
                    token: TOKEN,
                },
            }),
            json!({"type": "request", "id": 2, "timeout_ms": 5000, "body":
                {"type": "pairing_submit", "device_id": DEV, "corr_id": agent_id, "pin": "123456",
                 "pairing_nonce": "ab".repeat(16), "token": TOKEN_TEXT}}),
        );
        server_round_trip(
            ServerMessage::Request(Request {
                id: 3,
                timeout_ms: 5000,
                body: RequestBody::Forget { device_id: dev() },
            }),
            json!({"type": "request", "id": 3, "timeout_ms": 5000, "body": {"type": "forget", "device_id": DEV}}),
        );
        server_round_trip(
            ServerMessage::DongleToken(DongleToken {
                device_id: dev(),
                token: TOKEN,
            }),
            json!({"type": "dongle_token", "device_id": DEV, "token": TOKEN_TEXT}),
        );
    }

    fn settings() -> CanSettings {
        CanSettings::derived(500_000, 875, CanMode::Normal)
    }

    /// The settings sit beside the device id in the request, as every protocol version had them.
    #[test]
    fn a_can_configuration_keeps_its_wire_shape() {
        server_round_trip(
            ServerMessage::Request(Request {
                id: 9,
                timeout_ms: 1000,
                body: RequestBody::CanConfig {
                    device_id: dev(),
                    settings: settings(),
                },
            }),
            json!({"type": "request", "id": 9, "timeout_ms": 1000, "body": {"type": "can_config",
                "device_id": DEV, "bitrate": 500000, "sample_point_permille": 875, "mode": "normal",
                "use_raw": false, "prescaler": null, "sjw": null, "tseg1": null, "tseg2": null,
                "auto_retx": true, "tx_pause": false, "protocol_exc": false}}),
        );
        // Raw fields left out read as absent.
        let sparse = json!({"type": "request", "id": 9, "timeout_ms": 1000, "body": {"type": "can_config",
            "device_id": DEV, "bitrate": 500000, "sample_point_permille": 875, "mode": "normal",
            "use_raw": false, "auto_retx": true, "tx_pause": false, "protocol_exc": false}});
        let ServerMessage::Request(Request {
            body: RequestBody::CanConfig { settings: read, .. },
            ..
        }) = ServerMessage::from_json(&sparse.to_string()).unwrap()
        else {
            panic!("a CAN configuration")
        };
        assert_eq!(read, settings());
    }

    #[test]
    fn settings_become_the_remp_request_and_its_answer_the_effective_values() {
        let raw = CanSettings {
            use_raw: true,
            prescaler: Some(10),
            sjw: Some(1),
            tseg1: Some(13),
            tseg2: Some(2),
            mode: CanMode::ListenOnly,
            tx_pause: true,
            ..settings()
        };
        let remp = raw.to_remp();
        assert_eq!(
            (remp.prescaler, remp.sjw, remp.tseg1, remp.tseg2, remp.mode),
            (10, 1, 13, 2, CanMode::ListenOnly)
        );
        use firmware_proto::remp::CanConfig as C;
        assert_eq!(
            remp.flags,
            C::FLAG_USE_RAW | C::FLAG_AUTO_RETX | C::FLAG_TX_PAUSE
        );
        let effective = CanEffective::from_remp(&remp);
        assert!(effective.use_raw && effective.auto_retx && effective.tx_pause);
        assert!(!effective.protocol_exc);
        assert_eq!((effective.bitrate, effective.prescaler), (500_000, 10));
        // Without use_raw the raw fields go as zeros, for the dongle to derive.
        let derived = settings().to_remp();
        assert_eq!((derived.prescaler, derived.tseg1), (0, 0));
        assert_eq!(derived.flags, C::FLAG_AUTO_RETX);
    }

    #[test]
    fn next_issue_requests_round_trip() {
        for body in [
            RequestBody::CanConfig {
                device_id: dev(),
                settings: settings(),
            },
            RequestBody::Command {
                command_id: Uuid::nil(),
                device_id: dev(),
                line: "version".into(),
                timeout_ms: 3000,
                allow_dangerous: false,
            },
            RequestBody::SendFrame {
                device_id: dev(),
                can_id: 0x7df,
                extended: false,
                rtr: false,
                data: "0201000000000000".into(),
                fd: false,
            },
        ] {
            let msg = ServerMessage::Request(Request {
                id: 9,
                timeout_ms: 1000,
                body,
            });
            assert_eq!(ServerMessage::from_json(&msg.to_json()).unwrap(), msg);
        }
    }

    #[test]
    fn command_results_and_acks() {
        let id = Uuid::nil();
        agent_round_trip(
            AgentMessage::CommandResult(CommandResult {
                command_id: id,
                device_id: dev(),
                outcome: CommandOutcome::Done,
                exit_code: 0,
                output: "sim\n".into(),
                truncated: false,
                message: None,
            }),
            json!({"type": "command_result", "command_id": id, "device_id": DEV, "outcome": "done",
                   "exit_code": 0, "output": "sim\n", "truncated": false}),
        );
        server_round_trip(
            ServerMessage::CommandResultAck { command_id: id },
            json!({"type": "command_result_ack", "command_id": id}),
        );
        agent_round_trip(
            AgentMessage::Reply(Reply {
                id: 4,
                result: ReplyResult::Ok {
                    body: ReplyOk::CanConfigApplied {
                        effective: CanEffective {
                            bitrate: 500_000,
                            sample_point_permille: 875,
                            prescaler: 10,
                            sjw: 1,
                            tseg1: 13,
                            tseg2: 2,
                            mode: CanMode::Normal,
                            use_raw: false,
                            auto_retx: true,
                            tx_pause: false,
                            protocol_exc: false,
                        },
                    },
                },
            }),
            json!({"type": "reply", "id": 4, "result": {"status": "ok", "body": {"type": "can_config_applied",
                "effective": {"bitrate": 500000, "sample_point_permille": 875, "prescaler": 10, "sjw": 1,
                "tseg1": 13, "tseg2": 2, "mode": "normal", "use_raw": false, "auto_retx": true,
                "tx_pause": false, "protocol_exc": false}}}}),
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let body = RequestBody::PairingSubmit {
            device_id: dev(),
            corr_id: Uuid::nil(),
            pin: Pin::parse("654321").unwrap(),
            pairing_nonce: "ab".repeat(16),
            token: Token::from_bytes([0x5a; 32]),
        };
        let text = format!("{body:?}");
        // 0x5a is `Z`: neither the bytes as text, nor their decimal value, nor the base64.
        assert!(
            !text.contains("654321")
                && !text.contains("ZZZZ")
                && !text.contains("90, 90")
                && !text.contains("WlpaWlpa"),
            "{text}"
        );
        let token = DongleToken {
            device_id: dev(),
            token: Token::from_bytes([0x5a; 32]),
        };
        let text = format!("{token:?}");
        assert!(
            !text.contains("90, 90") && !text.contains("WlpaWlpa"),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_are_ignored_and_device_ids_checked() {
        let msg = AgentMessage::from_json(r#"{"type":"heartbeat","extra":1}"#).unwrap();
        assert_eq!(msg, AgentMessage::Heartbeat);
        assert!(is_device_id(DEV));
        assert!(!is_device_id("0123456789ABCDEF"));
        assert!(!is_device_id("0123"));
    }

    /// A message that names a malformed id, PIN, token or mode does not parse at all, so no code past
    /// the parser ever holds one; the error says which field, never what it held.
    #[test]
    fn malformed_values_make_the_whole_message_fail() {
        let forget = |id: &str| {
            format!(
                r#"{{"type":"request","id":1,"timeout_ms":5,"body":{{"type":"forget","device_id":"{id}"}}}}"#
            )
        };
        assert!(ServerMessage::from_json(&forget(DEV)).is_ok());
        for bad in ["0123456789ABCDEF", "0123", "0123456789abcdeg"] {
            assert!(ServerMessage::from_json(&forget(bad)).is_err(), "{bad}");
        }
        let submit = |pin: &str, token: &str| {
            json!({"type": "request", "id": 2, "timeout_ms": 5, "body": {"type": "pairing_submit",
                "device_id": DEV, "corr_id": Uuid::nil(), "pin": pin, "pairing_nonce": "ab".repeat(16),
                "token": token}})
            .to_string()
        };
        assert!(ServerMessage::from_json(&submit("123456", TOKEN_TEXT)).is_ok());
        let error = ServerMessage::from_json(&submit("12345x", TOKEN_TEXT))
            .unwrap_err()
            .to_string();
        assert!(!error.contains("12345x"), "{error}");
        let error = ServerMessage::from_json(&submit("123456", "c2VjcmV0dG9rZW4="))
            .unwrap_err()
            .to_string();
        assert!(!error.contains("c2VjcmV0"), "{error}");
        let report = |mode: &str| {
            json!({"type": "reply", "id": 3, "result": {"status": "ok", "body": {
                "type": "can_config_applied", "effective": {"bitrate": 500000,
                "sample_point_permille": 875, "prescaler": 1, "sjw": 1, "tseg1": 13, "tseg2": 2,
                "mode": mode, "use_raw": false, "auto_retx": true, "tx_pause": false,
                "protocol_exc": false}}}})
            .to_string()
        };
        assert!(AgentMessage::from_json(&report("ext_loop")).is_ok());
        assert!(AgentMessage::from_json(&report("warp")).is_err());
    }
}
