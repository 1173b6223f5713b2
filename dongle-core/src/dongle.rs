//! The dongle itself: packets and frames in, answers, frames and events out.
//!
//! [`Dongle`] is pure logic: it does no I/O and takes the time and its random numbers from its
//! host, so every behaviour can be unit tested by feeding it bytes and a time. The host's
//! transports feed it decoded link packets; the host carries out its [`Output`]s (the simulator's
//! runtime, or a firmware's main loop).
//!
//! Wall-clock time. The cool-down's end is kept in flash as wall-clock milliseconds, so that a
//! restart does not lift it. The host gives the wall clock once, at boot ([`Dongle::new`]); the
//! core counts on from there with the monotonic clock. What a boot restores is at most one full
//! cool-down: a board without a real-time clock passes 0 at every boot, so a cool-down stored before
//! a restart lasts up to its full length again after it (longer than asked, never a lock-out longer
//! than one cool-down).
//!
//! Authentication. CAN, CAN_CONFIG, CLI and the extension requests need the stored 32-byte
//! token in the header (compared in constant time) or, with the session extension, a valid
//! session MAC with a seq above the last accepted one. A packet that fails is dropped without an
//! answer and counted in `auth_failures`, as PROTOCOL.md specifies for the firmware: an answer would
//! tell an attacker which guesses get further than others. A host learns that its token no longer
//! works (a factory reset, say) from requests that go unanswered while PAIRING and DISCOVER are
//! answered, and, with the session extension, from an AUTH response with status not_paired. A sealed
//! packet whose seq is not above the last accepted one (a replay) is also counted in
//! `replays_refused`.
//!
//! With the session extension, token packets are still accepted, so hosts that speak plain
//! REMP v1 keep working; answers to sealed requests are sealed, and unsolicited packets
//! (frames to the host) are sealed whenever a session is established.
//!
//! Frames reach the host only once a host has sent an authenticated packet since power-up (on
//! UDP: to the address the last packet came from, as the firmware answers the port it last
//! heard), so a dongle never streams its bus to an unauthenticated party.

use core::fmt;
use core::time::Duration;

use firmware_proto::discovery::{self, Announce, PairingState};
use firmware_proto::ext::auth::{dongle_proof, host_proof, proof_matches};
use firmware_proto::ext::{
    AuthMessage, AuthStatus, Batch, BatchWriter, BusState, BusStatus, BusStatusAction, Forget,
    ForgetAction, ForgetStatus, Role, SessionMac,
};
use firmware_proto::ids::{CorrelationId, DeviceId, Pin};
use firmware_proto::remp::{
    self, CanConfig, CliResponse, CliStatus, CliTelemetry, ConfigAction, ConfigStatus, Header,
    MAX_PAYLOAD_LEN, MsgType, Packet, PairingAck, PairingStatus, Payload, TelemetrySource,
    TimingLimits,
};
use firmware_proto::{MAX_PACKET_LEN, caps};
use rand::{Rng, RngExt};

use crate::cli::{self, CliAction, CliContext, PairingView};
use crate::flash::Flash;
use crate::frame::Frame;
use crate::pairing::{Pairing, StartOutcome, SubmitOutcome};
use crate::text::{Text, bounded, utf8_prefix};
use crate::time::{Instant, since};
use crate::timing::{self, TimingError};

/// Which REMP extensions the dongle speaks (and announces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extensions {
    /// CAN_BATCH (type 0x10).
    pub batch: bool,
    /// BUS_STATUS (type 0x11).
    pub bus_status: bool,
    /// FORGET (type 0x12).
    pub forget: bool,
    /// AUTH (type 0x13) and session MACs.
    pub session: bool,
}

impl Extensions {
    /// Plain REMP v1.
    pub const NONE: Extensions = Extensions {
        batch: false,
        bus_status: false,
        forget: false,
        session: false,
    };
    /// Every extension.
    pub const ALL: Extensions = Extensions {
        batch: true,
        bus_status: true,
        forget: true,
        session: true,
    };

    /// Parses `none`, `all` or a comma-separated list of `batch`, `bus-status`, `forget`,
    /// `session`.
    pub fn parse(list: &str) -> Result<Self, UnknownExtension> {
        let mut ext = Extensions::NONE;
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "none" => {}
                "all" => ext = Extensions::ALL,
                "batch" => ext.batch = true,
                "bus-status" => ext.bus_status = true,
                "forget" => ext.forget = true,
                "session" => ext.session = true,
                other => return Err(UnknownExtension(bounded(other))),
            }
        }
        Ok(ext)
    }

    /// The capability bits of these extensions.
    pub fn caps(&self) -> u32 {
        let mut bits = 0;
        if self.batch {
            bits |= caps::CAN_BATCH;
        }
        if self.bus_status {
            bits |= caps::BUS_STATUS;
        }
        if self.forget {
            bits |= caps::FORGET_TOKEN;
        }
        if self.session {
            bits |= caps::SESSION_AUTH;
        }
        bits
    }
}

/// A word [`Extensions::parse`] does not know (cut at 32 bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown extension {0:?}: use batch, bus-status, forget, session, all or none")]
pub struct UnknownExtension(pub Text<32>);

/// The longest firmware build string a dongle announces, in bytes.
pub const FW_BUILD_LEN: usize = 64;
/// How much of a UART command's output the console shows, in bytes.
pub const CONSOLE_OUTPUT_LEN: usize = 256;
/// The longest link description the CLI shows, in bytes.
pub const LINK_LEN: usize = 128;

/// The fixed properties of a dongle.
#[derive(Debug, Clone)]
pub struct DongleConfig {
    /// The firmware build string announced in TLV 0x02.
    pub fw_build: Text<FW_BUILD_LEN>,
    /// The firmware build number in every REMP header.
    pub fw_build_number: u16,
    /// The extensions spoken.
    pub extensions: Extensions,
    /// The controller is an FDCAN that announces CAN FD.
    pub fd: bool,
    /// The UDP port announced (0: no UDP service).
    pub udp_port: u16,
    /// The LAN address announced.
    pub lan_ip: Option<[u8; 4]>,
    /// A one-line description of the link for the CLI.
    pub link: Text<LINK_LEN>,
    /// The pairing window.
    pub pairing_window: Duration,
    /// The cool-down after too many wrong PINs.
    pub cooldown: Duration,
    /// The CLI's command time limit.
    pub cli_timeout: Duration,
    /// The CLI's output limit in bytes.
    pub cli_output_limit: usize,
    /// The CAN kernel clock.
    pub can_clock_hz: u32,
}

impl Default for DongleConfig {
    fn default() -> Self {
        Self {
            fw_build: build_string("dongle-sim", env!("CARGO_PKG_VERSION")),
            fw_build_number: FW_BUILD_NUMBER,
            extensions: Extensions::NONE,
            fd: false,
            udp_port: 0,
            lan_ip: None,
            link: bounded("none"),
            pairing_window: crate::pairing::WINDOW,
            cooldown: crate::pairing::COOLDOWN,
            cli_timeout: cli::DEFAULT_TIMEOUT,
            cli_output_limit: cli::DEFAULT_OUTPUT_LIMIT,
            can_clock_hz: timing::CAN_CLOCK_HZ,
        }
    }
}

/// The firmware build number the simulator reports.
pub const FW_BUILD_NUMBER: u16 = 700;

/// The build string `"{name} {version} build {FW_BUILD_NUMBER}"`, cut at [`FW_BUILD_LEN`] bytes.
pub fn build_string(name: &str, version: &str) -> Text<FW_BUILD_LEN> {
    let mut text = crate::text::Written::<FW_BUILD_LEN>::new();
    let _ = fmt::Write::write_fmt(
        &mut text,
        format_args!("{name} {version} build {FW_BUILD_NUMBER}"),
    );
    bounded(text.as_str())
}

/// Something the dongle shows on its display or log (the simulator's event stream, a firmware's
/// UART log). Exhaustive on purpose: a host that shows events must decide how to show a new one.
// `UartAnswered` carries the console's text: with no heap to put it in, the enum is its size. Events
// are made, shown and dropped one at a time.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Event {
    /// The dongle shows a PIN: a pairing window opened. This stands for the dongle's display.
    Pin {
        /// The dongle.
        device_id: DeviceId,
        /// The PIN (its `Debug` is redacted; use `as_str`).
        pin: Pin,
        /// Seconds the window stays open.
        seconds: u16,
    },
    /// The right PIN arrived: the dongle stores the token.
    Paired,
    /// A wrong PIN.
    InvalidPin {
        /// Wrong PINs still allowed.
        attempts_left: u8,
    },
    /// Too many wrong PINs.
    Cooldown {
        /// Seconds of cool-down.
        seconds: u16,
    },
    /// The pairing window closed without a pairing.
    PairingExpired,
    /// A packet without the right token or MAC was refused.
    AuthRefused {
        /// Its REMP type.
        msg_type: u8,
    },
    /// A sealed packet with an old seq was refused.
    ReplayRefused {
        /// The seq it carried.
        seq: u32,
    },
    /// A session handshake completed.
    SessionEstablished,
    /// A CAN configuration was applied.
    ConfigApplied {
        /// The effective bitrate.
        bitrate: u32,
    },
    /// A CAN configuration was refused.
    ConfigRefused {
        /// Why.
        reason: TimingError,
    },
    /// The host made the dongle forget its token.
    TokenForgotten,
    /// Token, pairing state and configuration were erased.
    FactoryReset,
    /// A command typed on the UART console ran (what its console shows).
    UartAnswered {
        /// The exit code.
        exit_code: u16,
        /// The output as the console shows it: its first [`CONSOLE_OUTPUT_LEN`] bytes (the report to
        /// the host carries it up to the CLI's output limit).
        output: Text<CONSOLE_OUTPUT_LEN>,
        /// Whether it was reported to the host (only a claimed dongle reports).
        reported: bool,
    },
}

/// The dongle's counters. They only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Link packets handed to the dongle.
    pub packets_in: u64,
    /// Packets that did not decode.
    pub malformed: u64,
    /// REMP packets for another device id.
    pub wrong_device: u64,
    /// Packets of a type the dongle does not serve (or an extension that is off).
    pub unknown_type: u64,
    /// ANNOUNCEs sent.
    pub announces: u64,
    /// Packets refused for a wrong or missing token or MAC.
    pub auth_failures: u64,
    /// Sealed packets refused as replays.
    pub replays_refused: u64,
    /// Pairing starts received.
    pub pairing_starts: u64,
    /// Wrong PINs received.
    pub pin_failures: u64,
    /// Frames received from the host.
    pub frames_from_host: u64,
    /// Frames put onto the bus.
    pub frames_to_bus: u64,
    /// Frames the mode (listen-only, tx_pause) kept off the bus.
    pub tx_refused: u64,
    /// Frames sent to the host.
    pub frames_to_host: u64,
    /// Frames not sent because no authenticated host is known.
    pub frames_unforwarded: u64,
    /// FD frames dropped because the dongle or the host link cannot carry them.
    pub fd_dropped: u64,
    /// Bus frames ignored in a loopback mode.
    pub bus_ignored: u64,
    /// Frames echoed to the host in a loopback mode.
    pub loopback_echoes: u64,
    /// CLI commands received.
    pub cli_commands: u64,
    /// Commands typed on the UART console.
    pub uart_commands: u64,
    /// UART commands reported to the host (CLI_TELEMETRY); not when the dongle has no token.
    pub telemetry_sent: u64,
    /// Packets lost because the host queue was full.
    pub lost_to_host: u64,
    /// Frames from the host lost because the transmit queue was full (counted by the board).
    pub lost_to_bus: u64,
}

/// A CLI answer to send later (a `sleep`), encoded when it is due.
#[derive(Debug, Clone)]
pub struct Deferred {
    seq: u32,
    sealed: bool,
    corr_id: CorrelationId,
    status: CliStatus,
    flags: u8,
    exit_code: u16,
    output: heapless::Vec<u8, MAX_PAYLOAD_LEN>,
}

/// A packet for the host, encoded.
pub type PacketBuf = heapless::Vec<u8, MAX_PACKET_LEN>;

/// Where the dongle puts its outputs, in order: a `Vec` on a host with a heap (the `alloc`
/// feature), or a board's driver that carries each out as it comes (see
/// [`crate::board::StreamHost`]), so the core itself never holds more than one. A sink must take
/// every output: one it cannot keep is carried out or counted, never a reason to panic.
pub trait Outputs {
    /// Takes one output.
    fn push(&mut self, output: Output);
}

#[cfg(any(test, feature = "alloc"))]
impl Outputs for alloc::vec::Vec<Output> {
    fn push(&mut self, output: Output) {
        alloc::vec::Vec::push(self, output);
    }
}

/// A command's output as the console shows it: cut to [`CONSOLE_OUTPUT_LEN`] bytes, ending in `...`
/// when it was cut.
fn console_text(output: &[u8]) -> Text<CONSOLE_OUTPUT_LEN> {
    const MORE: &str = "...";
    let text = utf8_prefix(output);
    if text.len() <= CONSOLE_OUTPUT_LEN && text.len() == output.len() {
        return bounded(text);
    }
    let cut = bounded::<{ CONSOLE_OUTPUT_LEN - MORE.len() }>(text);
    let mut shown: Text<CONSOLE_OUTPUT_LEN> = bounded(&cut);
    // Cannot fail: the cut leaves room for the marker.
    let _ = shown.push_str(MORE);
    shown
}

/// Encodes a packet with `encode` straight into a [`PacketBuf`]; None when it does not encode.
fn encoded<E>(encode: impl FnOnce(&mut [u8]) -> Result<usize, E>) -> Option<PacketBuf> {
    let mut buf = PacketBuf::new();
    buf.resize_default(MAX_PACKET_LEN).ok()?;
    let n = encode(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// What the dongle asks its runtime to do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send this packet to the host.
    ToHost(PacketBuf),
    /// Encode and send this answer after a delay.
    ToHostLater {
        /// The delay.
        after: Duration,
        /// The answer.
        reply: Deferred,
    },
    /// Put this frame on the bus.
    ToBus(Frame),
    /// Report this event.
    Event(Event),
    /// The flash changed to this: store it before carrying out what follows (an answer that says
    /// "paired" must not reach the host before the token is stored).
    FlashChanged(Flash),
}

/// How a request proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    Token,
    Session,
}

/// The dongle, over the host's instant type `I` and random number generator `R`.
pub struct Dongle<I: Instant, R: Rng> {
    cfg: DongleConfig,
    flash: Flash,
    pairing: Pairing<I>,
    boot: I,
    /// The host's wall clock at `boot`, in milliseconds (see the module's notes).
    wall_at_boot_ms: u64,
    rng: R,
    tx_seq: u32,
    session: Option<SessionMac>,
    pending_auth: Option<([u8; 16], [u8; 16])>,
    host_authenticated: bool,
    counters: Counters,
}

impl<I: Instant, R: Rng> core::fmt::Debug for Dongle<I, R> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The flash holds the token: only its presence is shown.
        f.debug_struct("Dongle")
            .field("device_id", &self.flash.device_id)
            .field("claimed", &self.flash.token.is_some())
            .field("boot", &self.boot)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<I: Instant, R: Rng> Dongle<I, R> {
    /// A dongle booting at `now` with the given flash. `wall_now_ms` is the host's wall clock
    /// (milliseconds since the Unix epoch, or 0 on a board without one); `rng` supplies PINs and
    /// nonces and must be a cryptographic generator seeded from real entropy.
    pub fn new(cfg: DongleConfig, flash: Flash, now: I, wall_now_ms: u64, rng: R) -> Self {
        let mut pairing = Pairing::new(cfg.pairing_window, cfg.cooldown);
        // The cool-down end is wall-clock time in flash, so that a restart does not lift it. At most one
        // cool-down is restored: a board without a clock (wall time 0 at every boot) or a host clock
        // that jumped back would otherwise turn a stored end into a lock-out of any length.
        let cooldown_ms = u64::try_from(cfg.cooldown.as_millis()).unwrap_or(u64::MAX);
        let left = flash
            .cooldown_until_unix_ms
            .map(|end| end.saturating_sub(wall_now_ms).min(cooldown_ms));
        pairing.set_cooldown_until(
            left.filter(|&ms| ms > 0)
                .map(|ms| now + Duration::from_millis(ms)),
        );
        Self {
            cfg,
            flash,
            pairing,
            boot: now,
            wall_at_boot_ms: wall_now_ms,
            rng,
            tx_seq: 0,
            session: None,
            pending_auth: None,
            host_authenticated: false,
            counters: Counters::default(),
        }
    }

    /// The flash contents.
    pub fn flash(&self) -> &Flash {
        &self.flash
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        self.flash.device_id
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The configuration.
    pub fn config(&self) -> &DongleConfig {
        &self.cfg
    }

    /// Sets the link description and announced UDP port and address.
    /// The description is cut at [`LINK_LEN`] bytes.
    pub fn set_link(&mut self, link: &str, udp_port: u16, lan_ip: Option<[u8; 4]>) {
        self.cfg.link = bounded(link);
        self.cfg.udp_port = udp_port;
        self.cfg.lan_ip = lan_ip;
    }

    /// Counts packets the runtime could not queue for the host.
    pub fn note_lost_to_host(&mut self, n: u64) {
        self.counters.lost_to_host += n;
    }

    /// Counts frames the board could not queue for the bus (its transmit queue was full).
    pub fn note_lost_to_bus(&mut self, n: u64) {
        self.counters.lost_to_bus += n;
    }

    /// Whether a host has authenticated since power-up (frames flow to it).
    pub fn host_authenticated(&self) -> bool {
        self.host_authenticated
    }

    fn uptime_us(&self, now: I) -> u64 {
        u64::try_from(since(now, self.boot).as_micros()).unwrap_or(u64::MAX)
    }

    /// The host's wall clock at `now`, counted on from boot with the monotonic clock.
    fn wall_ms(&self, now: I) -> u64 {
        let up = u64::try_from(since(now, self.boot).as_millis()).unwrap_or(u64::MAX);
        self.wall_at_boot_ms.saturating_add(up)
    }

    /// The capability bits announced.
    pub fn capabilities(&self) -> u32 {
        self.cfg.extensions.caps() | if self.cfg.fd { caps::CAN_FD } else { 0 }
    }

    /// Encodes an ANNOUNCE answering a DISCOVER with `seq`.
    pub fn announce(&mut self, now: I, seq: u32) -> Option<PacketBuf> {
        let window = self.pairing.open_window(now);
        let announce = Announce {
            device_id: self.flash.device_id,
            fw_build: Some(&self.cfg.fw_build),
            udp_port: self.cfg.udp_port,
            capabilities: self.capabilities(),
            proto_ver: u16::from(remp::VERSION),
            lan_ip: self.cfg.lan_ip,
            pairing_state: if window.is_some() {
                PairingState::Pairing
            } else {
                PairingState::Normal
            },
            pairing_nonce: window.map(|(_, nonce)| nonce),
        };
        let packet = encoded(|buf| discovery::encode_announce(&announce, seq, buf))?;
        self.counters.announces += 1;
        Some(packet)
    }

    /// Answers a Discovery packet: an ANNOUNCE for a DISCOVER. `Err` when it does not decode.
    pub fn discovery_reply(
        &mut self,
        now: I,
        bytes: &[u8],
    ) -> Result<Option<PacketBuf>, firmware_proto::Error> {
        match discovery::decode(bytes) {
            Ok(p) if matches!(p.body, discovery::Body::Discover) => {
                Ok(self.announce(now, p.header.seq))
            }
            Ok(_) => {
                self.counters.unknown_type += 1;
                Ok(None)
            }
            Err(e) => {
                self.counters.malformed += 1;
                Err(e)
            }
        }
    }

    /// Handles one link packet (Discovery or REMP). Returns false when it did not decode, so
    /// that a stream link can count it as rejected.
    pub fn handle_packet(&mut self, now: I, bytes: &[u8], out: &mut impl Outputs) -> bool {
        self.counters.packets_in += 1;
        self.tick(now, out);
        if bytes.starts_with(&discovery::MAGIC) {
            return match self.discovery_reply(now, bytes) {
                Ok(reply) => {
                    if let Some(packet) = reply {
                        out.push(Output::ToHost(packet));
                    }
                    true
                }
                Err(_) => false,
            };
        }
        let Ok(packet) = remp::decode(bytes) else {
            self.counters.malformed += 1;
            return false;
        };
        if packet.header.device_id != self.flash.device_id {
            self.counters.wrong_device += 1;
            return true;
        }
        let auth = if packet.header.has_session_mac() {
            match self
                .session
                .as_mut()
                .filter(|_| self.cfg.extensions.session)
            {
                Some(session) => match session.open(bytes) {
                    Ok(_) => Auth::Session,
                    Err(firmware_proto::Error::Replay { seq, .. }) => {
                        self.counters.replays_refused += 1;
                        self.counters.auth_failures += 1;
                        out.push(Output::Event(Event::ReplayRefused { seq }));
                        return true;
                    }
                    Err(_) => Auth::None,
                },
                None => Auth::None,
            }
        } else if self
            .flash
            .token
            .is_some_and(|t| t.ct_eq(packet.header.token))
        {
            Auth::Token
        } else {
            Auth::None
        };
        self.dispatch(now, &packet, auth, out);
        true
    }

    fn extension_enabled(&self, t: MsgType) -> bool {
        let e = &self.cfg.extensions;
        match t {
            MsgType::CanBatch => e.batch,
            MsgType::BusStatus => e.bus_status,
            MsgType::Forget => e.forget,
            MsgType::Auth => e.session,
            _ => true,
        }
    }

    fn dispatch(&mut self, now: I, packet: &Packet<'_>, auth: Auth, out: &mut impl Outputs) {
        let seq = packet.header.seq;
        let sealed = auth == Auth::Session;
        if !self.extension_enabled(packet.header.msg_type) {
            // A dongle without the extension does not know the type, as v1 firmware would not.
            self.counters.unknown_type += 1;
            return;
        }
        match packet.payload {
            Payload::PairingStart(start) => {
                return self.pairing_start(now, seq, start.corr_id, out);
            }
            Payload::PairingSubmit(submit) => return self.pairing_submit(now, seq, &submit, out),
            Payload::Auth(message) => return self.auth(now, seq, message, out),
            Payload::Can(_)
            | Payload::CanBatch(_)
            | Payload::CanConfig(_)
            | Payload::CliRequest(_)
            | Payload::BusStatus(_)
            | Payload::Forget(_) => {}
            _ => {
                self.counters.unknown_type += 1;
                return;
            }
        }
        if auth == Auth::None {
            return self.refuse(packet, out);
        }
        self.host_authenticated = true;
        match packet.payload {
            Payload::Can(frame) => {
                let frame = Frame::from_can_frame(&frame);
                self.transmit(now, core::iter::once(frame), out);
            }
            Payload::CanBatch(batch) => {
                self.transmit(now, batch.iter().map(|r| Frame::from_record(&r)), out);
            }
            Payload::CanConfig(config) => self.can_config(now, seq, sealed, &config, out),
            Payload::CliRequest(request) => self.cli(
                now,
                seq,
                sealed,
                request.corr_id,
                request.command,
                request.flags,
                out,
            ),
            Payload::BusStatus(status) if status.action == BusStatusAction::Request => {
                let report = BusStatus {
                    action: BusStatusAction::Report,
                    state: BusState::ErrorActive,
                    tec: 0,
                    rec: 0,
                    rx_overflow: 0,
                    // Every frame the dongle lost to a full queue, either way; the count wraps.
                    lost_frames: (self.counters.lost_to_host + self.counters.lost_to_bus) as u32,
                };
                self.reply(now, seq, sealed, Payload::BusStatus(report), out);
            }
            Payload::Forget(forget) if forget.action == ForgetAction::Request => {
                let status = if self.flash.token.is_some() {
                    ForgetStatus::Ok
                } else {
                    ForgetStatus::NotPaired
                };
                let ack = Forget {
                    action: ForgetAction::Ack,
                    status,
                    corr_id: forget.corr_id,
                };
                // The ack is sealed with the session before the session is dropped with the token.
                self.reply(now, seq, sealed, Payload::Forget(ack), out);
                self.forget_token(out);
                out.push(Output::Event(Event::TokenForgotten));
            }
            _ => self.counters.unknown_type += 1,
        }
    }

    fn refuse(&mut self, packet: &Packet<'_>, out: &mut impl Outputs) {
        self.counters.auth_failures += 1;
        out.push(Output::Event(Event::AuthRefused {
            msg_type: packet.header.msg_type.to_u8(),
        }));
    }

    /// Encodes a packet from the dongle; sealed with the session when `sealed`.
    fn encode(
        &mut self,
        now: I,
        seq: u32,
        sealed: bool,
        payload: Payload<'_>,
    ) -> Option<PacketBuf> {
        let msg_type = payload.msg_type()?;
        let mut header = Header::new(msg_type, self.flash.device_id, seq);
        header.fw_build = self.cfg.fw_build_number;
        header.timestamp_us = self.uptime_us(now);
        let packet = Packet { header, payload };
        if sealed {
            let session = self.session.as_mut()?;
            encoded(|buf| session.seal(&packet, buf))
        } else {
            encoded(|buf| remp::encode(&packet, buf))
        }
    }

    fn reply(
        &mut self,
        now: I,
        seq: u32,
        sealed: bool,
        payload: Payload<'_>,
        out: &mut impl Outputs,
    ) {
        if let Some(packet) = self.encode(now, seq, sealed, payload) {
            out.push(Output::ToHost(packet));
        }
    }

    /// Encodes an unsolicited packet signed as the dongle: sealed with the session's MAC when a host
    /// has one, else with the dongle's token in the header. None without a token.
    fn unsolicited_signed(&mut self, now: I, payload: Payload<'_>) -> Option<PacketBuf> {
        if self.session.is_some() {
            return self.unsolicited(now, payload);
        }
        let token = self.flash.token?;
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let mut header = Header::new(payload.msg_type()?, self.flash.device_id, self.tx_seq);
        header.fw_build = self.cfg.fw_build_number;
        header.timestamp_us = self.uptime_us(now);
        header.token = token.as_bytes();
        encoded(|buf| remp::encode(&Packet { header, payload }, buf))
    }

    /// Encodes an unsolicited packet with the dongle's own sequence number.
    fn unsolicited(&mut self, now: I, payload: Payload<'_>) -> Option<PacketBuf> {
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let sealed = self.session.is_some();
        self.encode(now, self.tx_seq, sealed, payload)
    }

    fn pairing_start(&mut self, now: I, seq: u32, corr_id: CorrelationId, out: &mut impl Outputs) {
        self.counters.pairing_starts += 1;
        let rng = &mut self.rng;
        let digits: [u8; 6] = core::array::from_fn(|_| b'0' + rng.random_range(0..10u8));
        let Ok(pin) = Pin::from_bytes(digits) else {
            return;
        };
        let nonce: [u8; 16] = rng.random();
        let claimed = self.flash.token.is_some();
        let (status, seconds, nonce) = match self.pairing.start(now, claimed, pin, nonce) {
            StartOutcome::Opened { seconds, nonce } => {
                out.push(Output::Event(Event::Pin {
                    device_id: self.flash.device_id,
                    pin,
                    seconds,
                }));
                (PairingStatus::Ok, seconds, Some(nonce))
            }
            StartOutcome::Cooldown { seconds } => (PairingStatus::Cooldown, seconds, None),
            StartOutcome::Claimed => (PairingStatus::Error, 0, None),
        };
        let ack = PairingAck {
            status,
            seconds,
            corr_id,
            pairing_nonce: nonce,
        };
        self.reply(now, seq, false, Payload::PairingAck(ack), out);
    }

    fn pairing_submit(
        &mut self,
        now: I,
        seq: u32,
        submit: &firmware_proto::remp::PairingSubmit,
        out: &mut impl Outputs,
    ) {
        let claimed = self.flash.token.is_some();
        let outcome = self
            .pairing
            .submit(now, claimed, &submit.pin, &submit.pairing_nonce);
        let (status, seconds) = match outcome {
            SubmitOutcome::Paired => {
                self.flash.token = Some(submit.token);
                out.push(Output::FlashChanged(self.flash.clone()));
                out.push(Output::Event(Event::Paired));
                (PairingStatus::Ok, 0)
            }
            SubmitOutcome::InvalidPin { attempts_left } => {
                self.counters.pin_failures += 1;
                out.push(Output::Event(Event::InvalidPin { attempts_left }));
                (PairingStatus::InvalidPin, 0)
            }
            SubmitOutcome::Cooldown { seconds } => {
                if self
                    .flash
                    .cooldown_until_unix_ms
                    .is_none_or(|end| end <= self.wall_ms(now))
                {
                    // This submit started the cool-down (the fifth wrong PIN): keep it in flash.
                    self.counters.pin_failures += 1;
                    self.flash.cooldown_until_unix_ms =
                        Some(self.wall_ms(now) + u64::from(seconds) * 1000);
                    out.push(Output::FlashChanged(self.flash.clone()));
                    out.push(Output::Event(Event::Cooldown { seconds }));
                }
                (PairingStatus::Cooldown, seconds)
            }
            SubmitOutcome::Error(_) => (PairingStatus::Error, 0),
        };
        let ack = PairingAck {
            status,
            seconds,
            corr_id: submit.corr_id,
            pairing_nonce: None,
        };
        self.reply(now, seq, false, Payload::PairingAck(ack), out);
    }

    fn auth(&mut self, now: I, seq: u32, message: AuthMessage, out: &mut impl Outputs) {
        let id = self.flash.device_id;
        let answer = match (message, self.flash.token) {
            (AuthMessage::Challenge { .. }, None) => AuthMessage::Response {
                status: AuthStatus::NotPaired,
                dongle_nonce: [0; 16],
                dongle_proof: [0; 32],
            },
            (AuthMessage::Challenge { host_nonce }, Some(token)) => {
                let dongle_nonce: [u8; 16] = self.rng.random();
                self.pending_auth = Some((host_nonce, dongle_nonce));
                AuthMessage::Response {
                    status: AuthStatus::Ok,
                    dongle_nonce,
                    dongle_proof: dongle_proof(&token, &id, &host_nonce, &dongle_nonce),
                }
            }
            (AuthMessage::Confirm { .. }, None) => AuthMessage::Result {
                status: AuthStatus::NotPaired,
            },
            (AuthMessage::Confirm { host_proof: proof }, Some(token)) => {
                match self.pending_auth.take() {
                    None => AuthMessage::Result {
                        status: AuthStatus::Error,
                    },
                    Some((host_nonce, dongle_nonce)) => {
                        let expected = host_proof(&token, &id, &host_nonce, &dongle_nonce);
                        if proof_matches(&expected, &proof) {
                            self.session = Some(SessionMac::new(
                                Role::Dongle,
                                &token,
                                &id,
                                &host_nonce,
                                &dongle_nonce,
                            ));
                            self.host_authenticated = true;
                            out.push(Output::Event(Event::SessionEstablished));
                            AuthMessage::Result {
                                status: AuthStatus::Ok,
                            }
                        } else {
                            self.counters.auth_failures += 1;
                            out.push(Output::Event(Event::AuthRefused {
                                msg_type: MsgType::Auth.to_u8(),
                            }));
                            AuthMessage::Result {
                                status: AuthStatus::BadProof,
                            }
                        }
                    }
                }
            }
            _ => {
                self.counters.unknown_type += 1;
                return;
            }
        };
        self.reply(now, seq, false, Payload::Auth(answer), out);
    }

    fn can_config(
        &mut self,
        now: I,
        seq: u32,
        sealed: bool,
        request: &CanConfig,
        out: &mut impl Outputs,
    ) {
        let status = match request.action {
            ConfigAction::Get => ConfigStatus::Ok,
            ConfigAction::Set => {
                let (limits, _) = TimingLimits::of_controller(self.cfg.fd);
                match timing::apply(request, &limits, self.cfg.can_clock_hz) {
                    Ok(settings) => {
                        self.flash.can = settings;
                        out.push(Output::FlashChanged(self.flash.clone()));
                        out.push(Output::Event(Event::ConfigApplied {
                            bitrate: settings.bitrate,
                        }));
                        ConfigStatus::Ok
                    }
                    Err(e) => {
                        out.push(Output::Event(Event::ConfigRefused { reason: e }));
                        match e {
                            TimingError::Invalid(_) => ConfigStatus::Invalid,
                            TimingError::ApplyFailed(_) => ConfigStatus::ApplyFailed,
                        }
                    }
                }
            }
            ConfigAction::Response => {
                self.counters.unknown_type += 1;
                return;
            }
        };
        let response = self.flash.can.to_response(status);
        self.reply(now, seq, sealed, Payload::CanConfig(response), out);
    }

    #[allow(clippy::too_many_arguments)]
    fn cli(
        &mut self,
        now: I,
        seq: u32,
        sealed: bool,
        corr_id: CorrelationId,
        command: &str,
        flags: u8,
        out: &mut impl Outputs,
    ) {
        self.counters.cli_commands += 1;
        let allow_dangerous = flags & firmware_proto::remp::CliRequest::FLAG_ALLOW_DANGEROUS != 0;
        let answer = self.run_cli(now, command, allow_dangerous);
        let limit = self
            .cfg
            .cli_output_limit
            .min(MAX_PAYLOAD_LEN - CliResponse::FIXED_LEN);
        let (output, truncated) = cli::truncate(answer.output.as_bytes(), limit);
        let reply = Deferred {
            seq,
            sealed,
            corr_id,
            status: answer.status,
            flags: if truncated {
                CliResponse::FLAG_TRUNCATED
            } else {
                0
            },
            exit_code: answer.exit_code,
            // Cannot be cut: `limit` is below the payload size.
            output: heapless::Vec::from_slice(output).unwrap_or_default(),
        };
        if answer.delay.is_zero() {
            if let Some(packet) = self.encode_deferred(now, &reply) {
                out.push(Output::ToHost(packet));
            }
        } else {
            out.push(Output::ToHostLater {
                after: answer.delay,
                reply,
            });
        }
        if answer.action == Some(CliAction::FactoryReset) {
            self.factory_reset(out);
        }
    }

    /// A command typed on the dongle's UART console: it runs as a remote one does (a delay it asks
    /// for is not waited out here, since nobody waits on a reply), its output is shown on the console
    /// (`Event::UartAnswered`), and it is reported to the host as CLI_TELEMETRY signed with the
    /// dongle's token. An unclaimed dongle has no token and reports nothing: it has no owner to tell.
    pub fn uart_command(&mut self, now: I, command: &str, out: &mut impl Outputs) {
        self.counters.uart_commands += 1;
        // Whoever types on the UART has the board in hand: nothing is refused as dangerous.
        let answer = self.run_cli(now, command, true);
        let limit = self.cfg.cli_output_limit.min(
            MAX_PAYLOAD_LEN
                .saturating_sub(CliTelemetry::FIXED_LEN)
                .saturating_sub(command.len()),
        );
        let (output, truncated) = cli::truncate(answer.output.as_bytes(), limit);
        let mut flags = 0;
        if truncated {
            flags |= CliTelemetry::FLAG_TRUNCATED;
        }
        if answer.status != CliStatus::Ok {
            flags |= CliTelemetry::FLAG_ERROR;
        }
        let report = CliTelemetry {
            source: TelemetrySource::Uart,
            flags,
            corr_id: CorrelationId(self.rng.random()),
            exit_code: answer.exit_code,
            command,
            output,
        };
        let packet = self
            .flash
            .token
            .is_some()
            .then(|| self.unsolicited_signed(now, Payload::CliTelemetry(report)))
            .flatten();
        out.push(Output::Event(Event::UartAnswered {
            exit_code: answer.exit_code,
            output: console_text(output),
            reported: packet.is_some(),
        }));
        if let Some(packet) = packet {
            self.counters.telemetry_sent += 1;
            out.push(Output::ToHost(packet));
        }
        if answer.action == Some(CliAction::FactoryReset) {
            self.factory_reset(out);
        }
    }

    /// Encodes a deferred CLI answer now that it is due.
    pub fn encode_deferred(&mut self, now: I, d: &Deferred) -> Option<PacketBuf> {
        let response = CliResponse {
            status: d.status,
            flags: d.flags,
            corr_id: d.corr_id,
            exit_code: d.exit_code,
            output: &d.output,
        };
        self.encode(now, d.seq, d.sealed, Payload::CliResponse(response))
    }

    /// Runs a CLI command against what the dongle knows at `now`.
    fn run_cli(&self, now: I, command: &str, allow_dangerous: bool) -> cli::CliAnswer {
        let pairing = if let Some(until) = self.pairing.cooldown_until(now) {
            PairingView::Cooldown {
                seconds_left: since(until, now).as_secs(),
            }
        } else if let Some(seconds_left) = self.pairing.window_seconds_left(now) {
            PairingView::Window {
                seconds_left,
                wrong_pins: self.pairing.wrong_attempts(),
            }
        } else if self.flash.token.is_some() {
            PairingView::Claimed
        } else {
            PairingView::Idle
        };
        let c = &self.counters;
        let stats = [
            ("packets_in", c.packets_in),
            ("malformed", c.malformed),
            ("auth_failures", c.auth_failures),
            ("replays_refused", c.replays_refused),
            ("frames_from_host", c.frames_from_host),
            ("frames_to_bus", c.frames_to_bus),
            ("frames_to_host", c.frames_to_host),
            ("tx_refused", c.tx_refused),
            ("lost_to_host", c.lost_to_host),
            ("lost_to_bus", c.lost_to_bus),
        ];
        let context = CliContext {
            fw_build: &self.cfg.fw_build,
            device_id: self.flash.device_id,
            uptime_s: since(now, self.boot).as_secs(),
            claimed: self.flash.token.is_some(),
            pairing,
            link: &self.cfg.link,
            can: self.flash.can,
            stats: &stats,
            timeout: self.cfg.cli_timeout,
            announces: c.announces,
            capabilities: self.capabilities(),
            pairing_mode: self.pairing.window_seconds_left(now).is_some(),
            clock_us: self.uptime_us(now),
        };
        cli::run(command, allow_dangerous, &context)
    }

    /// Frames from the host: onto the bus and/or back to the host, as the mode says.
    fn transmit(
        &mut self,
        now: I,
        frames: impl Iterator<Item = Frame> + Clone,
        out: &mut impl Outputs,
    ) {
        use firmware_proto::remp::CanMode;
        let mode = self.flash.can.mode;
        let paused = self.flash.can.flags & CanConfig::FLAG_TX_PAUSE != 0;
        let echoing = !paused && matches!(mode, CanMode::Loopback | CanMode::ExtLoop);
        let fd = self.cfg.fd;
        // Frames the controller takes: an FD frame needs an FD controller.
        let taken = move |frame: &Frame| !frame.is_fd() || fd;
        for frame in frames.clone() {
            self.counters.frames_from_host += 1;
            if !taken(&frame) {
                self.counters.fd_dropped += 1;
                continue;
            }
            if echoing {
                self.counters.loopback_echoes += 1;
            }
            let frame = frame.with_origin(frame.is_simulated(), false);
            match mode {
                _ if paused => self.counters.tx_refused += 1,
                CanMode::ListenOnly => self.counters.tx_refused += 1,
                CanMode::Normal | CanMode::ExtLoop => {
                    self.counters.frames_to_bus += 1;
                    out.push(Output::ToBus(frame));
                }
                CanMode::Loopback => {}
            }
        }
        if !echoing {
            return;
        }
        // The echoes, read from the frames a second time rather than gathered (the core keeps no
        // list): packed into as few packets as the first pass's frames would be.
        let echoes = frames
            .filter(taken)
            .map(|f| f.with_origin(f.is_simulated(), true));
        self.frames_to_host(now, echoes, out);
    }

    /// Frames seen on the bus (or made by the generator or replay, which stand for the bus).
    pub fn on_bus_frames(&mut self, now: I, frames: &[Frame], out: &mut impl Outputs) {
        use firmware_proto::remp::CanMode;
        if matches!(self.flash.can.mode, CanMode::Loopback | CanMode::ExtLoop) {
            // In both loopback modes the controller disregards its RX pin.
            self.counters.bus_ignored += frames.len() as u64;
            return;
        }
        let frames = frames
            .iter()
            .map(|f| f.with_origin(f.is_simulated(), false));
        self.frames_to_host(now, frames, out);
    }

    /// Sends frames to the host: CAN_BATCH packets with the batch extension, else one CAN
    /// packet per classic frame.
    fn frames_to_host(
        &mut self,
        now: I,
        frames: impl Iterator<Item = Frame>,
        out: &mut impl Outputs,
    ) {
        if !self.host_authenticated || self.flash.token.is_none() {
            self.counters.frames_unforwarded += frames.count() as u64;
            return;
        }
        let fd_usable = self.cfg.fd && self.cfg.extensions.batch;
        let mut fd_dropped = 0u64;
        let mut usable = frames
            .filter(|f| {
                let usable = !f.is_fd() || fd_usable;
                fd_dropped += u64::from(!usable);
                usable
            })
            .peekable();
        if self.cfg.extensions.batch {
            let ts = self.uptime_us(now);
            while usable.peek().is_some() {
                let mut buf = [0u8; MAX_PAYLOAD_LEN];
                let (len, taken) = {
                    let Ok(mut writer) = BatchWriter::new(&mut buf) else {
                        break;
                    };
                    let mut taken = 0u64;
                    // A frame that does not fit stays in the iterator for the next batch.
                    while let Some(frame) = usable.peek() {
                        if writer.push(&frame.to_record(ts)).is_err() {
                            break;
                        }
                        usable.next();
                        taken += 1;
                    }
                    match writer.finish() {
                        Ok(len) => (len, taken),
                        Err(_) => break,
                    }
                };
                if taken == 0 {
                    break;
                }
                let Ok(batch) = Batch::parse(buf.get(..len).unwrap_or(&[])) else {
                    break;
                };
                if let Some(packet) = self.unsolicited(now, Payload::CanBatch(batch)) {
                    self.counters.frames_to_host += taken;
                    out.push(Output::ToHost(packet));
                }
            }
        } else {
            for frame in usable.by_ref() {
                let Some(can) = frame.to_can_frame() else {
                    continue;
                };
                if let Some(packet) = self.unsolicited(now, Payload::Can(can)) {
                    self.counters.frames_to_host += 1;
                    out.push(Output::ToHost(packet));
                }
            }
        }
        drop(usable);
        self.counters.fd_dropped += fd_dropped;
    }

    fn forget_token(&mut self, out: &mut impl Outputs) {
        self.flash.token = None;
        self.session = None;
        self.pending_auth = None;
        self.host_authenticated = false;
        out.push(Output::FlashChanged(self.flash.clone()));
    }

    /// Erases token, pairing state, cool-down and CAN configuration, as the button on the
    /// board does. The device id stays.
    pub fn factory_reset(&mut self, out: &mut impl Outputs) {
        self.forget_token(out);
        self.pairing.reset();
        self.flash.cooldown_until_unix_ms = None;
        self.flash.can = Default::default();
        out.push(Output::Event(Event::FactoryReset));
    }

    /// Loses everything that lives in RAM, as on a power cycle: session, pairing window,
    /// authenticated host, uptime.
    pub fn power_cycle(&mut self, now: I, wall_now_ms: u64) {
        self.session = None;
        self.pending_auth = None;
        self.host_authenticated = false;
        self.pairing.power_cycle();
        self.boot = now;
        self.wall_at_boot_ms = wall_now_ms;
    }

    /// Notices time passing: closes an expired pairing window.
    pub fn tick(&mut self, now: I, out: &mut impl Outputs) {
        if self.pairing.poll_expired(now) {
            out.push(Output::Event(Event::PairingExpired));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::ids::DongleToken;
    use firmware_proto::remp::{CanFrame, CliRequest, PairingStart, PairingSubmit};
    use rand::SeedableRng;
    use tokio::time::Instant;

    const ID: DeviceId = DeviceId([1, 2, 3, 4, 5, 6, 7, 8]);
    const TOKEN: [u8; 32] = [0x42; 32];

    type Dongle = super::Dongle<Instant, rand::rngs::StdRng>;

    fn dongle(ext: Extensions) -> Dongle {
        let cfg = DongleConfig {
            extensions: ext,
            ..DongleConfig::default()
        };
        Dongle::new(
            cfg,
            Flash::new(ID),
            Instant::now(),
            0,
            rand::rngs::StdRng::seed_from_u64(7),
        )
    }

    fn packet(payload: Payload<'_>, token: &[u8]) -> Vec<u8> {
        let mut header = Header::new(payload.msg_type().unwrap(), ID, 7);
        header.token = token;
        let mut buf = vec![0u8; MAX_PACKET_LEN];
        let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn answers(out: &[Output]) -> Vec<Vec<u8>> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToHost(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect()
    }

    fn pair(d: &mut Dongle) {
        let now = Instant::now();
        let mut out = Vec::new();
        let start = PairingStart {
            corr_id: CorrelationId([1; 16]),
        };
        d.handle_packet(now, &packet(Payload::PairingStart(start), &[]), &mut out);
        let (pin, nonce) = out
            .iter()
            .find_map(|o| match o {
                Output::Event(Event::Pin { pin, .. }) => Some(*pin),
                _ => None,
            })
            .zip(d.pairing.open_window(now).map(|w| w.1))
            .unwrap();
        let submit = PairingSubmit {
            corr_id: CorrelationId([2; 16]),
            pin,
            pairing_nonce: nonce,
            token: DongleToken::from_bytes(TOKEN),
        };
        out.clear();
        d.handle_packet(now, &packet(Payload::PairingSubmit(submit), &[]), &mut out);
        let sent = answers(&out);
        let ack = remp::decode(&sent[0]).unwrap();
        assert!(matches!(
            ack.payload,
            Payload::PairingAck(PairingAck {
                status: PairingStatus::Ok,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_uart_command_is_reported_signed_with_the_token_only_once_claimed() {
        let mut d = dongle(Extensions::NONE);
        let now = Instant::now();
        let mut out = Vec::new();
        d.uart_command(now, "version", &mut out);
        assert!(answers(&out).is_empty(), "unclaimed: nobody to tell");
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Event(Event::UartAnswered {
                reported: false,
                ..
            })
        )));
        pair(&mut d);
        out.clear();
        d.uart_command(now, "version", &mut out);
        d.uart_command(now, "no-such-command", &mut out);
        let sent = answers(&out);
        assert_eq!(sent.len(), 2);
        let report = remp::decode(&sent[0]).unwrap();
        assert_eq!(
            report.header.token,
            &TOKEN[..],
            "signed with the dongle's token"
        );
        let Payload::CliTelemetry(t) = report.payload else {
            panic!("a CLI_TELEMETRY report");
        };
        assert_eq!(t.source, TelemetrySource::Uart);
        assert_eq!((t.command, t.exit_code, t.error()), ("version", 0, false));
        assert!(
            std::str::from_utf8(t.output)
                .unwrap()
                .contains("dongle-sim")
        );
        let Payload::CliTelemetry(failed) = remp::decode(&sent[1]).unwrap().payload else {
            panic!("a CLI_TELEMETRY report");
        };
        assert!(failed.error() && failed.exit_code != 0);
        assert_ne!(t.corr_id, failed.corr_id);
        assert_eq!(d.counters.telemetry_sent, 2);
        assert_eq!(d.counters.uart_commands, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn token_packets_need_the_token() {
        let mut d = dongle(Extensions::NONE);
        pair(&mut d);
        let now = Instant::now();
        let cli = CliRequest {
            flags: 0,
            corr_id: CorrelationId([3; 16]),
            command: "version",
        };
        let mut out = Vec::new();
        d.handle_packet(now, &packet(Payload::CliRequest(cli), &[0; 32]), &mut out);
        // A wrong token gets no answer at all, only a count.
        assert!(answers(&out).is_empty());
        assert_eq!(d.counters().auth_failures, 1);
        out.clear();
        d.handle_packet(now, &packet(Payload::CliRequest(cli), &TOKEN), &mut out);
        let sent = answers(&out);
        let reply = remp::decode(&sent[0]).unwrap();
        let Payload::CliResponse(r) = reply.payload else {
            panic!()
        };
        assert_eq!(r.status, CliStatus::Ok);
        assert_eq!(reply.header.seq, 7);
    }

    /// Configures a paired dongle for 500 kbit/s in `mode`; returns the request, to change it again.
    fn set_mode(d: &mut Dongle, mode: firmware_proto::remp::CanMode) -> CanConfig {
        let mut set = CanConfig {
            action: ConfigAction::Set,
            bitrate: 500_000,
            sample_point_permille: 875,
            ..CanConfig::get()
        };
        set.mode = mode;
        let mut out = Vec::new();
        d.handle_packet(
            Instant::now(),
            &packet(Payload::CanConfig(set), &TOKEN),
            &mut out,
        );
        set
    }

    #[tokio::test(start_paused = true)]
    async fn loopback_echoes_and_listen_only_stays_silent() {
        let mut d = dongle(Extensions::NONE);
        pair(&mut d);
        let now = Instant::now();
        let mut out = Vec::new();
        let mut set = set_mode(&mut d, firmware_proto::remp::CanMode::Loopback);
        let frame = CanFrame::new(
            firmware_proto::ids::CanId::standard(0x123).unwrap(),
            &[1, 2],
        )
        .unwrap();
        d.handle_packet(now, &packet(Payload::Can(frame), &TOKEN), &mut out);
        assert!(!out.iter().any(|o| matches!(o, Output::ToBus(_))));
        let sent = answers(&out);
        let echo = remp::decode(&sent[0]).unwrap();
        let Payload::Can(echo) = echo.payload else {
            panic!()
        };
        assert_eq!(echo.flags, CanFrame::FLAG_LOOPBACK);
        set.mode = firmware_proto::remp::CanMode::ListenOnly;
        out.clear();
        d.handle_packet(now, &packet(Payload::CanConfig(set), &TOKEN), &mut out);
        out.clear();
        d.handle_packet(now, &packet(Payload::Can(frame), &TOKEN), &mut out);
        assert!(out.is_empty());
        assert_eq!(d.counters().tx_refused, 1);
    }

    /// The CAN ids of the frames in the CAN_BATCH packets among `out`, in order.
    fn batched_ids(out: &[Output]) -> Vec<u32> {
        answers(out)
            .iter()
            .flat_map(|p| {
                let Payload::CanBatch(batch) = remp::decode(p).unwrap().payload else {
                    panic!("not a CAN_BATCH");
                };
                batch
                    .iter()
                    .map(|r| Frame::from_record(&r).id().raw())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The core holds no list of frames: echoes are read from the host's frames a second time and bus
    /// frames are packed as they come, packet after packet. Nothing may be lost or reordered on the
    /// way, and echoes are packed as tightly as before.
    #[tokio::test(start_paused = true)]
    async fn many_echoes_and_bus_frames_reach_the_host_all_and_in_order() {
        let mut d = dongle(Extensions::ALL);
        pair(&mut d);
        let now = Instant::now();
        let mut out = Vec::new();
        let mut set = set_mode(&mut d, firmware_proto::remp::CanMode::ExtLoop);

        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let mut writer = BatchWriter::new(&mut buf).unwrap();
        let mut sent = 0u32;
        while sent < 200 {
            let id = firmware_proto::ids::CanId::standard(sent as u16).unwrap();
            let frame = Frame::classic(id, &[sent as u8]).unwrap();
            if writer.push(&frame.to_record(0)).is_err() {
                break;
            }
            sent += 1;
        }
        assert!(sent > 50, "only {sent} frames fit one batch");
        let len = writer.finish().unwrap();
        let batch = Batch::parse(&buf[..len]).unwrap();
        d.handle_packet(now, &packet(Payload::CanBatch(batch), &TOKEN), &mut out);
        let to_bus: Vec<u32> = out
            .iter()
            .filter_map(|o| match o {
                Output::ToBus(f) => Some(f.id().raw()),
                _ => None,
            })
            .collect();
        assert_eq!(to_bus, (0..sent).collect::<Vec<_>>());
        assert_eq!(batched_ids(&out), (0..sent).collect::<Vec<_>>());
        assert_eq!(answers(&out).len(), 1, "the echoes of one batch fit one");
        assert_eq!(d.counters().loopback_echoes, u64::from(sent));

        set.mode = firmware_proto::remp::CanMode::Normal;
        d.handle_packet(now, &packet(Payload::CanConfig(set), &TOKEN), &mut out);
        out.clear();
        let frames: Vec<Frame> = (0..1000u32)
            .map(|i| {
                let id = firmware_proto::ids::CanId::extended(i).unwrap();
                Frame::classic(id, &[0; 8]).unwrap()
            })
            .collect();
        d.on_bus_frames(now, &frames, &mut out);
        assert!(answers(&out).len() > 1, "1000 frames fit one packet?");
        assert_eq!(batched_ids(&out), (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_extensions_are_unknown_types() {
        let mut d = dongle(Extensions::NONE);
        pair(&mut d);
        let mut out = Vec::new();
        let forget = Forget {
            action: ForgetAction::Request,
            status: ForgetStatus::Ok,
            corr_id: CorrelationId([0; 16]),
        };
        d.handle_packet(
            Instant::now(),
            &packet(Payload::Forget(forget), &TOKEN),
            &mut out,
        );
        assert!(out.is_empty());
        assert!(d.flash().token.is_some());
        let mut d = dongle(Extensions::ALL);
        pair(&mut d);
        d.handle_packet(
            Instant::now(),
            &packet(Payload::Forget(forget), &TOKEN),
            &mut out,
        );
        assert!(d.flash().token.is_none());
    }

    #[test]
    fn the_console_shows_a_long_output_cut_and_marked() {
        assert_eq!(console_text(b"ok\n").as_str(), "ok\n");
        let long = "x".repeat(CONSOLE_OUTPUT_LEN + 1);
        let shown = console_text(long.as_bytes());
        assert_eq!(shown.len(), CONSOLE_OUTPUT_LEN);
        assert!(shown.ends_with("xx..."), "{shown}");
        // Output cut by the CLI's limit in the middle of a character is marked too.
        assert_eq!(
            console_text("ab\u{e9}".as_bytes()[..3].as_ref()).as_str(),
            "ab..."
        );
    }

    #[test]
    fn extension_lists_parse() {
        assert_eq!(Extensions::parse("all"), Ok(Extensions::ALL));
        assert_eq!(Extensions::parse("none"), Ok(Extensions::NONE));
        let e = Extensions::parse("batch,session").unwrap();
        assert!(e.batch && e.session && !e.forget);
        assert!(Extensions::parse("turbo").is_err());
    }

    /// A board without a clock starts its wall clock at 0 at every boot, so a cool-down end stored
    /// after a long uptime must not become a lock-out of that length at the next boot: what is
    /// restored is at most one cool-down.
    #[tokio::test(start_paused = true)]
    async fn a_stored_cooldown_never_outlasts_one_cooldown_after_a_restart() {
        let mut flash = Flash::new(ID);
        // Stored 30 days into an uptime, on a board whose wall clock started at 0.
        flash.cooldown_until_unix_ms = Some(30 * 24 * 3600 * 1000 + 300_000);
        let d = Dongle::new(
            DongleConfig::default(),
            flash,
            Instant::now(),
            0,
            rand::rngs::StdRng::seed_from_u64(7),
        );
        let now = Instant::now();
        let until = d.pairing.cooldown_until(now).expect("still cooling down");
        assert!(
            until - now <= DongleConfig::default().cooldown,
            "a restart restored {:?} of cool-down",
            until - now
        );
    }
}
