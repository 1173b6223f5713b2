//! A test host: speaks the firmware-proto codec to a simulator over a real pseudo-terminal
//! (tokio-serial, stream framing) or real UDP sockets on 127.0.0.1.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dongle_sim::state::StateFile;
use dongle_sim::{Frame, SimConfig, SimEvent, SimHandle, Simulator};
use firmware_proto::discovery::{self, PairingState};
use firmware_proto::ext::auth::{dongle_proof, host_proof};
use firmware_proto::ext::{AuthMessage, AuthStatus, Role, SessionMac};
use firmware_proto::ids::{CanId, CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::{
    self, CanConfig, CliRequest, Header, MsgType, Packet, PairingAck, PairingStart, PairingSubmit,
    Payload,
};
use firmware_proto::stream::{StreamDecoder, StreamStats, encode_frame, max_frame_len};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::broadcast;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// The token tests pair with.
pub const TOKEN: [u8; 32] = [0x5A; 32];
/// A short wait for answers that should come.
pub const WAIT: Duration = Duration::from_secs(3);
/// A short wait for answers that should not come.
pub const QUIET: Duration = Duration::from_millis(300);

pub fn state_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("flash.json")
}

/// Starts a simulator.
pub async fn start(config: SimConfig) -> SimHandle {
    Simulator::start(config).await.expect("simulator starts")
}

/// Writes a state file of a claimed dongle (the token is [`TOKEN`]).
pub fn provision_claimed(path: &Path, id: DeviceId) {
    let mut flash = dongle_sim::Flash::new(id);
    flash.token = Some(DongleToken::from_bytes(TOKEN));
    flash.save(path).unwrap();
}

/// An ANNOUNCE, owned.
#[derive(Debug, Clone)]
pub struct AnnounceInfo {
    pub seq: u32,
    pub device_id: DeviceId,
    pub fw_build: Option<String>,
    pub udp_port: u16,
    pub capabilities: u32,
    pub proto_ver: u16,
    pub lan_ip: Option<[u8; 4]>,
    pub pairing_state: PairingState,
    pub nonce: Option<[u8; 16]>,
}

pub fn parse_announce(bytes: &[u8]) -> Option<AnnounceInfo> {
    let p = discovery::decode(bytes).ok()?;
    let discovery::Body::Announce(a) = p.body else {
        return None;
    };
    Some(AnnounceInfo {
        seq: p.header.seq,
        device_id: a.device_id,
        fw_build: a.fw_build.map(str::to_string),
        udp_port: a.udp_port,
        capabilities: a.capabilities,
        proto_ver: a.proto_ver,
        lan_ip: a.lan_ip,
        pairing_state: a.pairing_state,
        nonce: a.pairing_nonce,
    })
}

/// A CLI response, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliAnswer {
    pub status: remp::CliStatus,
    pub truncated: bool,
    pub exit_code: u16,
    pub output: String,
    pub corr_id: CorrelationId,
}

enum Link {
    Serial(SerialStream),
    Udp {
        socket: UdpSocket,
        remp: SocketAddr,
        discovery: Option<SocketAddr>,
    },
}

/// A host on one link to one dongle.
pub struct Host {
    link: Link,
    decoder: StreamDecoder,
    pending: VecDeque<Vec<u8>>,
    /// Frames of a batch beyond what the last `recv_frames` asked for, kept for the next call.
    spare_frames: VecDeque<Frame>,
    pub device: DeviceId,
    seq: u32,
    pub session: Option<SessionMac>,
}

impl Host {
    /// Opens the simulator's pseudo-terminal (or any path to it) as a serial port.
    pub async fn serial(path: &Path, device: DeviceId) -> Host {
        let port = tokio_serial::new(path.to_string_lossy(), 115_200)
            .open_native_async()
            .expect("open serial");
        Host::new(Link::Serial(port), device)
    }

    /// A UDP socket talking to the simulator.
    pub async fn udp(sim: &SimHandle) -> Host {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let link = Link::Udp {
            socket,
            remp: sim.udp_addr().unwrap(),
            discovery: sim.discovery_addr(),
        };
        Host::new(link, sim.device_id())
    }

    /// A host on `socket` for a UDP dongle at `remp` (for example one in another process).
    pub fn udp_to(socket: UdpSocket, remp: SocketAddr, device: DeviceId) -> Host {
        Host::new(
            Link::Udp {
                socket,
                remp,
                discovery: None,
            },
            device,
        )
    }

    /// The right host for the simulator's link.
    pub async fn connect(sim: &SimHandle) -> Host {
        match sim.serial_path() {
            Some(path) => Host::serial(&path, sim.device_id()).await,
            None => Host::udp(sim).await,
        }
    }

    fn new(link: Link, device: DeviceId) -> Host {
        Host {
            link,
            decoder: StreamDecoder::new(),
            pending: VecDeque::new(),
            spare_frames: VecDeque::new(),
            device,
            seq: 0,
            session: None,
        }
    }

    /// The host's stream decoder counters (serial).
    pub fn stream_stats(&self) -> StreamStats {
        self.decoder.stats()
    }

    /// Writes raw bytes to the serial link (for garbage tests).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Serial(port) => port.write_all(bytes).await.unwrap(),
            Link::Udp { socket, remp, .. } => {
                socket.send_to(bytes, *remp).await.unwrap();
            }
        }
    }

    /// Sends one packet (framed on serial, a datagram on UDP to the REMP port); false when
    /// the link refused it (for example an unplugged terminal).
    pub async fn send(&mut self, packet: &[u8]) -> bool {
        match &mut self.link {
            Link::Serial(port) => {
                let mut frame = vec![0u8; max_frame_len(packet.len())];
                let n = encode_frame(packet, &mut frame).unwrap();
                port.write_all(&frame[..n]).await.is_ok()
            }
            Link::Udp { socket, remp, .. } => socket.send_to(packet, *remp).await.is_ok(),
        }
    }

    /// The next packet from the dongle, if one comes within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.pending.pop_front() {
                return Some(p);
            }
            let mut buf = [0u8; 4096];
            let read = match &mut self.link {
                Link::Serial(port) => tokio::time::timeout_at(deadline, port.read(&mut buf))
                    .await
                    .ok()?,
                Link::Udp { socket, .. } => {
                    tokio::time::timeout_at(deadline, socket.recv(&mut buf))
                        .await
                        .ok()?
                }
            };
            let n = read.ok()?;
            match &self.link {
                Link::Serial(_) => {
                    let pending = &mut self.pending;
                    self.decoder
                        .push(&buf[..n], |p| pending.push_back(p.to_vec()));
                }
                Link::Udp { .. } => self.pending.push_back(buf[..n].to_vec()),
            }
        }
    }

    /// Sends DISCOVER (on the stream, or to the discovery port) and returns the ANNOUNCE.
    pub async fn discover(&mut self, seq: u32) -> Option<AnnounceInfo> {
        let mut buf = [0u8; 64];
        let n = discovery::encode_discover(seq, &mut buf).unwrap();
        match &mut self.link {
            Link::Udp {
                socket,
                discovery: Some(d),
                ..
            } => {
                socket.send_to(&buf[..n], *d).await.unwrap();
            }
            _ => {
                self.send(&buf[..n]).await;
            }
        }
        self.recv_until(WAIT, |b| parse_announce(b).is_some())
            .await
            .and_then(|b| parse_announce(&b))
    }

    /// Waits for a packet that `want` accepts, dropping others.
    pub async fn recv_until(
        &mut self,
        wait: Duration,
        want: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let p = self.recv(left).await?;
            if want(&p) {
                return Some(p);
            }
        }
    }

    /// Builds a REMP packet for the dongle, with `token` in the header.
    pub fn packet(&mut self, payload: Payload<'_>, token: &[u8]) -> Vec<u8> {
        self.seq += 1;
        let mut header = Header::new(payload.msg_type().unwrap(), self.device, self.seq);
        header.token = token;
        let mut buf = vec![0u8; firmware_proto::MAX_PACKET_LEN];
        let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Builds a packet sealed with the session.
    pub fn sealed(&mut self, payload: Payload<'_>) -> Vec<u8> {
        let header = Header::new(payload.msg_type().unwrap(), self.device, 0);
        let mut buf = vec![0u8; firmware_proto::MAX_PACKET_LEN];
        let n = self
            .session
            .as_mut()
            .unwrap()
            .seal(&Packet { header, payload }, &mut buf)
            .unwrap();
        buf.truncate(n);
        buf
    }

    /// Sends and waits for an answer of `msg_type`.
    pub async fn request(&mut self, packet: &[u8], msg_type: MsgType) -> Option<Vec<u8>> {
        self.send(packet).await;
        self.recv_type(msg_type, WAIT).await
    }

    pub async fn recv_type(&mut self, msg_type: MsgType, wait: Duration) -> Option<Vec<u8>> {
        self.recv_until(wait, |b| {
            remp::decode_header(b).is_ok_and(|(h, _)| h.msg_type == msg_type)
        })
        .await
    }

    /// Decodes a dongle packet, opening it with the session when it is sealed.
    pub fn open<'a>(&mut self, bytes: &'a [u8]) -> Packet<'a> {
        let (header, _) = remp::decode_header(bytes).unwrap();
        if header.has_session_mac() {
            self.session
                .as_mut()
                .expect("a session")
                .open(bytes)
                .expect("sealed packet verifies")
        } else {
            remp::decode(bytes).unwrap()
        }
    }

    pub async fn pairing_start(&mut self) -> PairingAck {
        let start = PairingStart {
            corr_id: CorrelationId([1; 16]),
        };
        let p = self.packet(Payload::PairingStart(start), &[]);
        let reply = self
            .request(&p, MsgType::Pairing)
            .await
            .expect("pairing ack");
        match remp::decode(&reply).unwrap().payload {
            Payload::PairingAck(ack) => ack,
            other => panic!("unexpected {other:?}"),
        }
    }

    pub async fn pairing_submit(
        &mut self,
        pin: &str,
        nonce: [u8; 16],
        token: [u8; 32],
    ) -> PairingAck {
        let submit = PairingSubmit {
            corr_id: CorrelationId([2; 16]),
            pin: Pin::parse(pin).unwrap(),
            pairing_nonce: nonce,
            token: DongleToken::from_bytes(token),
        };
        let p = self.packet(Payload::PairingSubmit(submit), &[]);
        let reply = self
            .request(&p, MsgType::Pairing)
            .await
            .expect("pairing ack");
        match remp::decode(&reply).unwrap().payload {
            Payload::PairingAck(ack) => ack,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Pairs with [`TOKEN`], reading the PIN from the simulator's events.
    pub async fn pair(&mut self, events: &mut broadcast::Receiver<SimEvent>) {
        let ack = self.pairing_start().await;
        assert_eq!(ack.status, remp::PairingStatus::Ok, "{ack:?}");
        let pin = wait_pin(events).await;
        let ack = self
            .pairing_submit(&pin, ack.pairing_nonce.unwrap(), TOKEN)
            .await;
        assert_eq!(ack.status, remp::PairingStatus::Ok, "{ack:?}");
    }

    /// Runs a CLI command with `token` (or the session, when one is up and `token` is None).
    pub async fn cli_with(
        &mut self,
        command: &str,
        flags: u8,
        token: Option<&[u8]>,
    ) -> Option<CliAnswer> {
        let request = CliRequest {
            flags,
            corr_id: CorrelationId([9; 16]),
            command,
        };
        let p = match token {
            Some(t) => self.packet(Payload::CliRequest(request), t),
            None => self.sealed(Payload::CliRequest(request)),
        };
        let reply = self.request(&p, MsgType::Cli).await?;
        match self.open(&reply).payload {
            Payload::CliResponse(r) => Some(CliAnswer {
                status: r.status,
                truncated: r.flags & remp::CliResponse::FLAG_TRUNCATED != 0,
                exit_code: r.exit_code,
                output: String::from_utf8_lossy(r.output).into_owned(),
                corr_id: r.corr_id,
            }),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub async fn cli(&mut self, command: &str) -> CliAnswer {
        self.cli_with(command, 0, Some(&TOKEN))
            .await
            .expect("CLI answer")
    }

    /// Sends a CAN_CONFIG request with the token and returns the response.
    pub async fn config(&mut self, request: CanConfig) -> Option<CanConfig> {
        let p = self.packet(Payload::CanConfig(request), &TOKEN);
        let reply = self.request(&p, MsgType::CanConfig).await?;
        match remp::decode(&reply).unwrap().payload {
            Payload::CanConfig(c) => Some(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sets the mode (500 kbit/s, 87.5 %).
    pub async fn set_mode(&mut self, mode: remp::CanMode) {
        let r = self.config(set_config(500_000, 875, mode)).await.unwrap();
        assert_eq!(r.status, remp::ConfigStatus::Ok);
    }

    /// Sends one classic frame with the token.
    pub async fn send_frame(&mut self, frame: &Frame) {
        let p = self.packet(Payload::Can(frame.to_can_frame().unwrap()), &TOKEN);
        self.send(&p).await;
    }

    /// Collects frames (CAN or CAN_BATCH packets) until `n` arrived or `wait` passed.
    pub async fn recv_frames(&mut self, n: usize, wait: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        let take = n.min(self.spare_frames.len());
        let mut frames: Vec<Frame> = self.spare_frames.drain(..take).collect();
        while frames.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(bytes) = self.recv(left).await else {
                break;
            };
            let Ok((header, _)) = remp::decode_header(&bytes) else {
                continue;
            };
            if !matches!(header.msg_type, MsgType::Can | MsgType::CanBatch) {
                continue;
            }
            match self.open(&bytes).payload {
                Payload::Can(f) => frames.push(Frame::from_can_frame(&f)),
                Payload::CanBatch(b) => frames.extend(b.iter().map(|r| Frame::from_record(&r))),
                _ => {}
            }
        }
        // A batch may carry more frames than were asked for: exactly `n` go back, the rest wait.
        if frames.len() > n {
            self.spare_frames.extend(frames.drain(n..));
        }
        frames
    }

    /// Runs the session handshake with [`TOKEN`]; returns the result status.
    pub async fn authenticate(&mut self) -> AuthStatus {
        let host_nonce = [0x11; 16];
        let p = self.packet(Payload::Auth(AuthMessage::Challenge { host_nonce }), &[]);
        let reply = self
            .request(&p, MsgType::Auth)
            .await
            .expect("auth response");
        let Payload::Auth(AuthMessage::Response {
            status,
            dongle_nonce,
            dongle_proof: proof,
        }) = remp::decode(&reply).unwrap().payload
        else {
            panic!("not an auth response")
        };
        if status != AuthStatus::Ok {
            return status;
        }
        let token = DongleToken::from_bytes(TOKEN);
        assert_eq!(
            proof,
            dongle_proof(&token, &self.device, &host_nonce, &dongle_nonce),
            "dongle proof"
        );
        let confirm = AuthMessage::Confirm {
            host_proof: host_proof(&token, &self.device, &host_nonce, &dongle_nonce),
        };
        let p = self.packet(Payload::Auth(confirm), &[]);
        let reply = self.request(&p, MsgType::Auth).await.expect("auth result");
        let Payload::Auth(AuthMessage::Result { status }) = remp::decode(&reply).unwrap().payload
        else {
            panic!("not an auth result")
        };
        if status == AuthStatus::Ok {
            self.session = Some(SessionMac::new(
                Role::Host,
                &token,
                &self.device,
                &host_nonce,
                &dongle_nonce,
            ));
        }
        status
    }
}

pub fn set_config(bitrate: u32, sp: u16, mode: remp::CanMode) -> CanConfig {
    CanConfig {
        action: remp::ConfigAction::Set,
        bitrate,
        sample_point_permille: sp,
        mode,
        flags: CanConfig::FLAG_AUTO_RETX,
        ..CanConfig::get()
    }
}

/// Waits for the next PIN event.
pub async fn wait_pin(events: &mut broadcast::Receiver<SimEvent>) -> String {
    wait_event(events, |e| match e {
        SimEvent::Dongle(dongle_sim::Event::Pin { pin, .. }) => Some(pin.as_str().to_string()),
        _ => None,
    })
    .await
}

/// Waits for an event that `pick` accepts.
pub async fn wait_event<T>(
    events: &mut broadcast::Receiver<SimEvent>,
    pick: impl Fn(&SimEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("event in time")
}

pub fn frame(text: &str) -> Frame {
    text.parse().unwrap()
}

pub fn can_id(id: u16) -> CanId {
    CanId::standard(id).unwrap()
}

/// A bus name unique to this test run.
pub fn bus_name(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}
