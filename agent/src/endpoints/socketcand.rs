//! A socketcand-compatible TCP server: tools that speak socketcand's protocol (python-can's `socketcand`
//! interface, Kayak, socketcandcl) use a group side through it, without SocketCAN.
//!
//! socketcand's protocol is ASCII, each message between `<` and `>`, with no line ends. What this
//! server speaks, from socketcand's `doc/protocol.md` and the behaviour of its raw mode:
//!
//! | client | server | when |
//! |---|---|---|
//! | (connects) | `< hi >` | at once |
//! | `< open BUS >` | `< ok >` | any bus name of at most 16 characters: this server has one bus |
//! | `< rawmode >` | `< ok >` | from now on every frame of the bus is sent to the client |
//! | `< bcmmode >` | `< ok >` | back to the broadcast-manager mode: frames stop |
//! | `< send ID LEN B0 B1 .. >` | | a classic frame: ID hex (8 digits, or above 7FF, is extended), LEN decimal 0..8, bytes hex |
//! | `< fdsend ID FLAGS LEN B0 .. >` | | a CAN FD frame: FLAGS hex (0x01 bit rate switch, 0x02 error state), LEN decimal up to 64 |
//! | `< echo >` | `< echo >` | a liveness check |
//! | | `< frame ID SECS.USECS DATA >` | a classic frame of the bus, DATA as one run of hex digits (empty for no data) |
//! | | `< fdframe ID FLAGS SECS.USECS DATA >` | a CAN FD frame of the bus |
//! | anything else | `< error TEXT >` | the broadcast manager's commands (`add`, `filter`, `subscribe`..) are not served |
//!
//! Each reply goes out in a write of its own: python-can reads `< hi >` and each `< ok >` with one
//! `recv` and compares it whole. The timestamp of a frame is the wall clock when the agent hands it
//! over, as socketcand's is the kernel's receive time.
//!
//! The agent is the bus here: frames from the group go to every client in raw mode, and a frame a client
//! sends goes to the group and to the other clients in raw mode (a real bus would show it to them too),
//! never back to its sender. Every client has a bounded share of the bus ([`CLIENT_BACKLOG`] frames);
//! a client that reads too slowly loses frames, counted. Commands are at most [`MAX_COMMAND`] bytes;
//! longer or malformed ones are counted, answered with an error and skipped. At most [`MAX_CLIENTS`]
//! clients are served at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use firmware_proto::ext::batch::{self, len_to_dlc};
use firmware_proto::ids::CanId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

use super::{Driver, EndpointError, EndpointInfo, EndpointKind, Plumbing, Request, Shared, bump};
use crate::frame::Frame;

/// The longest command accepted between `<` and `>`. The longest valid one, an `fdsend` of 64 bytes
/// written `0x` by `0x`, is under 250 characters.
pub const MAX_COMMAND: usize = 512;
/// The most clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// How many frames of the bus may wait for one client before that client loses the oldest.
pub const CLIENT_BACKLOG: usize = 4096;
/// The longest bus name `open` takes, as socketcand.
pub const MAX_BUS_NAME: usize = 16;
/// How long a write to a client may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most frames put in one write to a client.
const FRAMES_PER_WRITE: usize = 64;

/// The CAN FD flags of Linux's `canfd_frame`, which socketcand passes through.
mod kernel_flags {
    pub const BRS: u8 = 0x01;
    pub const ESI: u8 = 0x02;
    pub const FDF: u8 = 0x04;
}

/// Why a client's command was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("a command longer than {MAX_COMMAND} bytes")]
    TooLong,
    #[error("a command that is not ASCII text")]
    NotText,
    // Reply texts never hold an angle bracket: a client reads a message up to the first closing one.
    #[error("a command without its closing bracket")]
    Unterminated,
    #[error("bytes outside the brackets of a command")]
    Stray,
    #[error("{0}")]
    Syntax(&'static str),
}

/// Splits a client's byte stream into commands, with a bounded buffer.
#[derive(Debug, Default)]
pub struct CommandDecoder {
    buf: Vec<u8>,
    inside: bool,
    overflow: bool,
    /// Stray bytes were reported since the last command, so a run of them counts once.
    stray: bool,
}

impl CommandDecoder {
    /// Feeds bytes as they arrive; `out` gets the text of each complete command (between the brackets,
    /// trimmed), or why one was skipped.
    pub fn feed(&mut self, bytes: &[u8], mut out: impl FnMut(Result<&str, CommandError>)) {
        for &byte in bytes {
            if !self.inside {
                match byte {
                    b'<' => {
                        self.inside = true;
                        self.overflow = false;
                        self.stray = false;
                        self.buf.clear();
                    }
                    _ if byte.is_ascii_whitespace() => {}
                    _ if !self.stray => {
                        self.stray = true;
                        out(Err(CommandError::Stray));
                    }
                    _ => {}
                }
                continue;
            }
            match byte {
                b'>' => {
                    self.inside = false;
                    if self.overflow {
                        out(Err(CommandError::TooLong));
                    } else if !self
                        .buf
                        .iter()
                        .all(|b| (0x20..0x7f).contains(b) || *b == b'\t')
                    {
                        out(Err(CommandError::NotText));
                    } else {
                        // Checked above: printable ASCII is UTF-8.
                        let text = std::str::from_utf8(&self.buf).unwrap_or_default();
                        out(Ok(text.trim()));
                    }
                    self.buf.clear();
                }
                b'<' => {
                    out(Err(CommandError::Unterminated));
                    self.buf.clear();
                    self.overflow = false;
                }
                _ if self.buf.len() < MAX_COMMAND => self.buf.push(byte),
                _ => self.overflow = true,
            }
        }
    }
}

/// One command of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Open(&'a str),
    RawMode,
    BcmMode,
    ControlMode,
    IsotpMode,
    Echo,
    /// `send` or `fdsend`: a frame for the bus.
    Send(Frame),
    /// `sendrtr`: a remote frame, which cannot cross a group.
    SendRtr,
    /// Any other verb (the broadcast manager's commands, and unknown ones).
    Other(&'a str),
}

/// Parses the text of one command (between the brackets).
pub fn parse_command(text: &str) -> Result<Command<'_>, CommandError> {
    let mut words = text.split_ascii_whitespace();
    let verb = words
        .next()
        .ok_or(CommandError::Syntax("an empty command"))?;
    let no_args = |words: &mut std::str::SplitAsciiWhitespace<'_>, c| match words.next() {
        None => Ok(c),
        Some(_) => Err(CommandError::Syntax("this command takes no arguments")),
    };
    match verb {
        "open" => {
            let name = words
                .next()
                .ok_or(CommandError::Syntax("open needs a bus name"))?;
            let valid = name.len() <= MAX_BUS_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid || words.next().is_some() {
                return Err(CommandError::Syntax(
                    "open takes one bus name of at most 16 letters, digits, '_', '-' or '.'",
                ));
            }
            Ok(Command::Open(name))
        }
        "rawmode" => no_args(&mut words, Command::RawMode),
        "bcmmode" => no_args(&mut words, Command::BcmMode),
        "controlmode" => no_args(&mut words, Command::ControlMode),
        "isotpmode" => no_args(&mut words, Command::IsotpMode),
        "echo" => no_args(&mut words, Command::Echo),
        "send" => {
            let id = parse_id(words.next())?;
            let len = parse_len(words.next(), 8)?;
            let frame = parse_data(words, id, 0, len)?;
            Ok(Command::Send(frame))
        }
        "fdsend" => {
            let id = parse_id(words.next())?;
            let flags = words
                .next()
                .filter(|w| w.len() <= 2)
                .and_then(|w| u8::from_str_radix(w, 16).ok())
                .ok_or(CommandError::Syntax("fdsend needs its flags in hex"))?;
            let len = parse_len(words.next(), 64)?;
            if len_to_dlc(len as u8).is_none() {
                return Err(CommandError::Syntax(
                    "a CAN FD frame carries 0 to 8, 12, 16, 20, 24, 32, 48 or 64 bytes",
                ));
            }
            let mut record_flags = batch::flags::FD;
            if flags & kernel_flags::BRS != 0 {
                record_flags |= batch::flags::BRS;
            }
            if flags & kernel_flags::ESI != 0 {
                record_flags |= batch::flags::ESI;
            }
            let frame = parse_data(words, id, record_flags, len)?;
            Ok(Command::Send(frame))
        }
        "sendrtr" => Ok(Command::SendRtr),
        other => Ok(Command::Other(other)),
    }
}

/// A CAN id in hex: extended when written with 8 digits (socketcand's rule) or above 0x7FF.
fn parse_id(word: Option<&str>) -> Result<CanId, CommandError> {
    let word = word
        .filter(|w| !w.is_empty() && w.len() <= 8)
        .ok_or(CommandError::Syntax(
            "a frame needs a CAN id of 1 to 8 hex digits",
        ))?;
    let raw = u32::from_str_radix(word, 16).map_err(|_| CommandError::Syntax("a CAN id is hex"))?;
    let extended = word.len() == 8 || raw > CanId::MAX_STANDARD;
    CanId::new(raw, extended).map_err(|_| CommandError::Syntax("the CAN id is out of range"))
}

/// A data length in decimal, as socketcand reads it.
fn parse_len(word: Option<&str>, max: usize) -> Result<usize, CommandError> {
    word.and_then(|w| w.parse::<usize>().ok())
        .filter(|len| *len <= max)
        .ok_or(CommandError::Syntax(
            "a frame needs its length in decimal (at most 8, or 64 for fdsend)",
        ))
}

fn parse_data<'a>(
    words: impl Iterator<Item = &'a str>,
    id: CanId,
    flags: u8,
    len: usize,
) -> Result<Frame, CommandError> {
    let mut data = [0u8; 64];
    let mut count = 0;
    for word in words {
        let byte = Some(word)
            .filter(|w| w.len() <= 2)
            .and_then(|w| u8::from_str_radix(w, 16).ok())
            .ok_or(CommandError::Syntax("frame data are bytes in hex"))?;
        *data
            .get_mut(count)
            .ok_or(CommandError::Syntax("more data bytes than the length says"))? = byte;
        count += 1;
    }
    if count != len {
        return Err(CommandError::Syntax(
            "the number of data bytes differs from the length",
        ));
    }
    Frame::with_flags(id, flags, &data[..len]).ok_or(CommandError::Syntax("the frame is too long"))
}

/// The message that hands `frame` to a client, stamped `at`.
pub fn format_frame(frame: &Frame, at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let id = if frame.id.is_extended() {
        format!("{:08X}", frame.id.raw())
    } else {
        format!("{:03X}", frame.id.raw())
    };
    let data = hex::encode_upper(frame.data());
    let time = format!("{}.{:06}", since.as_secs(), since.subsec_micros());
    if frame.is_fd() {
        let mut flags = kernel_flags::FDF;
        if frame.fd_flags & batch::flags::BRS != 0 {
            flags |= kernel_flags::BRS;
        }
        if frame.fd_flags & batch::flags::ESI != 0 {
            flags |= kernel_flags::ESI;
        }
        format!("< fdframe {id} {flags:02X} {time} {data} >")
    } else {
        // With no data this leaves two spaces before '>', as socketcand does; python-can relies on it.
        format!("< frame {id} {time} {data} >")
    }
}

/// A frame on the agent's bus, with the client that sent it (`None`: it came from the group).
#[derive(Debug, Clone, Copy)]
struct BusFrame {
    frame: Frame,
    from: Option<u64>,
}

/// Listens on `addr` and serves socketcand clients until the endpoint is dropped.
pub(crate) async fn open(addr: SocketAddr, plumbing: Plumbing) -> Result<Driver, EndpointError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| EndpointError::Bind { addr, source })?;
    if !local.ip().is_loopback() {
        tracing::warn!(
            %local,
            "the socketcand port is reachable from other machines, without authentication: anyone who reaches it talks to the remote bus"
        );
    }
    let info = EndpointInfo {
        kind: EndpointKind::Socketcand,
        identity: format!("socketcand:{addr}"),
        location: local.to_string(),
        can_set_timing: false,
        fd: true,
        version: None,
        bitrate: None,
        data_bitrate: None,
    };
    let identity = info.identity.clone();
    Ok(Driver {
        info,
        run: Box::pin(serve(listener, identity, plumbing)),
    })
}

async fn serve(listener: TcpListener, identity: String, plumbing: Plumbing) {
    let Plumbing {
        frames,
        shared,
        mut requests,
    } = plumbing;
    let (bus, _) = broadcast::channel::<BusFrame>(CLIENT_BACKLOG);
    // Dropping the set (when the endpoint closes) ends every client.
    let mut clients = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if clients.len() >= MAX_CLIENTS {
                        tracing::warn!(endpoint = %identity, %peer, "refused a socketcand client: {MAX_CLIENTS} are connected");
                        tokio::spawn(async move {
                            let mut stream = stream;
                            let _ = tokio::time::timeout(
                                WRITE_TIMEOUT,
                                stream.write_all(b"< error too many clients >"),
                            )
                            .await;
                        });
                        continue;
                    }
                    next_id += 1;
                    tracing::info!(endpoint = %identity, %peer, "socketcand client connected");
                    clients.spawn(client(stream, next_id, bus.clone(), frames.clone(), shared.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(endpoint = %identity, error = %e, "could not accept a socketcand client");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            request = requests.recv() => match request {
                None => return,
                Some(Request::Send(batch)) => {
                    for frame in batch {
                        // No client in raw mode: nobody takes the frame, as on a bus with no other node.
                        if bus.send(BusFrame { frame, from: None }).is_ok() {
                            bump(&shared.stats.frames_out, 1);
                        } else {
                            bump(&shared.stats.frames_out_lost, 1);
                        }
                    }
                }
                Some(Request::Configure(_, reply)) => {
                    let _ = reply.send(Err(EndpointError::TimingNotSettable {
                        identity: identity.clone(),
                        what: "the bit timing",
                        how: "a socketcand port has no CAN bus of its own".into(),
                    }));
                }
                Some(Request::Status(reply)) => {
                    let _ = reply.send(shared.health.lock().unwrap().clone());
                }
            },
            Some(_) = clients.join_next() => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NoBus,
    Bcm,
    Raw,
}

/// One client's state between its commands.
struct ClientState {
    id: u64,
    mode: Mode,
    subscription: Option<broadcast::Receiver<BusFrame>>,
}

async fn client(
    stream: TcpStream,
    id: u64,
    bus: broadcast::Sender<BusFrame>,
    frames: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let (mut reader, mut writer) = stream.into_split();
    if write(&mut writer, b"< hi >").await.is_err() {
        return;
    }
    let mut state = ClientState {
        id,
        mode: Mode::NoBus,
        subscription: None,
    };
    let mut decoder = CommandDecoder::default();
    let mut buf = [0u8; 4096];
    loop {
        let subscription = state.subscription.as_mut();
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut replies = Vec::new();
                decoder.feed(&buf[..n], |command| {
                    if let Some(reply) = handle(command, &mut state, &bus, &frames, &shared) {
                        replies.push(reply);
                    }
                });
                for reply in replies {
                    // One write per reply: clients compare each reply whole.
                    if write(&mut writer, reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
            received = next_frame(subscription) => {
                let mut text = String::new();
                let mut pending = Some(received);
                let mut count = 0;
                while let Some(received) = pending.take() {
                    match received {
                        Ok(f) if f.from == Some(id) => {}
                        Ok(f) => text.push_str(&format_frame(&f.frame, SystemTime::now())),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            bump(&shared.stats.frames_out_lost, n);
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                    count += 1;
                    // Gather what else waits, so that a busy bus costs few writes.
                    if count < FRAMES_PER_WRITE
                        && let Some(sub) = state.subscription.as_mut()
                    {
                        match sub.try_recv() {
                            Ok(f) => pending = Some(Ok(f)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                pending = Some(Err(broadcast::error::RecvError::Lagged(n)));
                            }
                            Err(_) => {}
                        }
                    }
                }
                if !text.is_empty() && write(&mut writer, text.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
    if let Some(peer) = peer {
        tracing::info!(%peer, "socketcand client disconnected");
    }
}

/// The next frame of the bus for a client in raw mode; never resolves for a client in another mode.
async fn next_frame(
    subscription: Option<&mut broadcast::Receiver<BusFrame>>,
) -> Result<BusFrame, broadcast::error::RecvError> {
    match subscription {
        Some(sub) => sub.recv().await,
        None => std::future::pending().await,
    }
}

async fn write(writer: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

fn error_reply(text: &str) -> Option<String> {
    debug_assert!(!text.contains(['<', '>']), "{text}");
    Some(format!("< error {text} >"))
}

/// Acts on one command; answers the reply to send, if any.
fn handle(
    command: Result<&str, CommandError>,
    state: &mut ClientState,
    bus: &broadcast::Sender<BusFrame>,
    frames: &mpsc::Sender<Frame>,
    shared: &Shared,
) -> Option<String> {
    let parsed = command.and_then(parse_command);
    let command = match parsed {
        Ok(c) => c,
        Err(CommandError::Stray) => {
            bump(&shared.stats.malformed, 1);
            return None;
        }
        Err(e) => {
            bump(&shared.stats.malformed, 1);
            return error_reply(&e.to_string());
        }
    };
    match (state.mode, command) {
        (_, Command::Echo) => Some("< echo >".into()),
        (Mode::NoBus, Command::Open(_)) => {
            state.mode = Mode::Bcm;
            Some("< ok >".into())
        }
        (_, Command::Open(_)) => error_reply("a bus is open already"),
        (Mode::NoBus, _) => error_reply("open a bus first"),
        (_, Command::RawMode) => {
            state.mode = Mode::Raw;
            state.subscription = Some(bus.subscribe());
            Some("< ok >".into())
        }
        (_, Command::BcmMode) => {
            state.mode = Mode::Bcm;
            state.subscription = None;
            Some("< ok >".into())
        }
        (_, Command::ControlMode | Command::IsotpMode) => {
            error_reply("this bridge serves the raw and broadcast-manager modes only")
        }
        (_, Command::Send(mut frame)) => {
            frame.timestamp_us = shared.now_us();
            shared.deliver(frames, frame);
            // The other tools on this port see it too, as they would on a real bus.
            let _ = bus.send(BusFrame {
                frame,
                from: Some(state.id),
            });
            None
        }
        (_, Command::SendRtr) => {
            bump(&shared.stats.unsupported, 1);
            error_reply("remote frames cannot cross the bridge")
        }
        (Mode::Bcm, Command::Other(_)) => {
            error_reply("unsupported command: the bridge serves send, echo and rawmode")
        }
        (_, Command::Other(_)) => error_reply("unknown command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(bytes: &[u8]) -> Vec<Result<String, CommandError>> {
        let mut out = Vec::new();
        CommandDecoder::default().feed(bytes, |c| out.push(c.map(str::to_string)));
        out
    }

    fn sent(text: &str) -> Frame {
        match parse_command(text) {
            Ok(Command::Send(f)) => f,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn commands_split_on_brackets_whatever_the_reads() {
        assert_eq!(
            commands(b"< open can0 >< rawmode >\n<echo>"),
            vec![
                Ok("open can0".into()),
                Ok("rawmode".into()),
                Ok("echo".into())
            ]
        );
        let mut decoder = CommandDecoder::default();
        let mut out = Vec::new();
        decoder.feed(b"< send 12", |c| out.push(c.map(str::to_string)));
        decoder.feed(b"3 1 ff >", |c| out.push(c.map(str::to_string)));
        assert_eq!(out, vec![Ok("send 123 1 ff".into())]);
    }

    #[test]
    fn bad_input_is_bounded_and_counted_once_per_run() {
        let mut long = b"< send ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 100 * MAX_COMMAND));
        long.extend_from_slice(b" >junk junk< echo >< a < echo ><\xff>");
        assert_eq!(
            commands(&long),
            vec![
                Err(CommandError::TooLong),
                Err(CommandError::Stray),
                Ok("echo".into()),
                Err(CommandError::Unterminated),
                Ok("echo".into()),
                Err(CommandError::NotText),
            ]
        );
    }

    #[test]
    fn send_and_fdsend_parse_as_socketcand_and_python_can_write_them() {
        let f = sent("send 123 8 de ad be ef 0 11 22 33");
        assert_eq!(f.id, CanId::standard(0x123).unwrap());
        assert_eq!(f.data(), [0xde, 0xad, 0xbe, 0xef, 0, 0x11, 0x22, 0x33]);
        let f = sent("send 1AAAAAAA 2 1 F1");
        assert_eq!(f.id, CanId::extended(0x1aaa_aaaa).unwrap());
        assert_eq!(sent("send 00000123 0").id, CanId::extended(0x123).unwrap());
        assert_eq!(sent("send 7ff 0").id, CanId::standard(0x7ff).unwrap());
        let f = sent(&format!("fdsend 123 01 12 {}", "aa ".repeat(12)));
        assert!(f.is_fd() && f.fd_flags & batch::flags::BRS != 0);
        assert_eq!(f.data().len(), 12);
        assert_eq!(parse_command("open vcan0"), Ok(Command::Open("vcan0")));
        assert_eq!(
            parse_command("subscribe 0 0 123"),
            Ok(Command::Other("subscribe"))
        );
    }

    #[test]
    fn malformed_commands_are_refused() {
        for bad in [
            "",
            "open",
            "open a-bus-name-that-is-too-long",
            "open can0 can1",
            "rawmode now",
            "send",
            "send 123",
            "send 123 9 1 2 3 4 5 6 7 8 9",
            "send 123 2 1",
            "send 123 1 1 2",
            "send 123 1 100",
            "send 123 x",
            "send 123456789 0",
            "send 3FFFFFFF 0",
            "send zz 0",
            "fdsend 123 01 13",
            "fdsend 123 zz 0",
            "fdsend 123 01 65",
        ] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever a client sends, the decoder neither panics nor keeps more than a command.
        #[test]
        fn any_bytes_decode_without_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700), 0..8)) {
            let mut decoder = CommandDecoder::default();
            for chunk in &chunks {
                decoder.feed(chunk, |c| { let _ = c.and_then(parse_command); });
                proptest::prop_assert!(decoder.buf.len() <= MAX_COMMAND);
            }
        }

        /// Commands that look like sends parse or fail, never panic.
        #[test]
        fn send_like_commands_never_panic(verb in proptest::sample::select(vec!["send", "fdsend"]),
                                          words in proptest::collection::vec("[0-9a-fA-FxZ-]{0,10}", 0..70)) {
            let text = format!("{verb} {}", words.join(" "));
            let _ = parse_command(&text);
        }
    }

    #[test]
    fn no_error_text_holds_a_bracket() {
        let errors = [
            CommandError::TooLong,
            CommandError::NotText,
            CommandError::Unterminated,
            CommandError::Stray,
        ];
        let syntax = [
            "open",
            "open a b",
            "rawmode x",
            "send",
            "send zz",
            "send 1",
            "send 1 9",
            "send 1 1 zz",
            "send 1 1 1 1",
            "fdsend 1",
            "fdsend 1 01 13",
        ]
        .map(|c| parse_command(c).unwrap_err());
        for e in errors.iter().chain(syntax.iter()) {
            let text = e.to_string();
            assert!(!text.contains(['<', '>']), "{text}");
        }
    }

    #[test]
    fn frames_format_as_socketcand_sends_them() {
        let at = UNIX_EPOCH + Duration::from_micros(23_424_242);
        let f = Frame::classic(CanId::standard(0x123).unwrap(), &[0x11, 0x22, 0x33, 0x44]).unwrap();
        assert_eq!(format_frame(&f, at), "< frame 123 23.424242 11223344 >");
        let e = Frame::classic(CanId::extended(0x1aaa_aaaa).unwrap(), &[]).unwrap();
        assert_eq!(format_frame(&e, at), "< frame 1AAAAAAA 23.424242  >");
        let fd = Frame::with_flags(
            CanId::standard(0x10).unwrap(),
            batch::flags::FD | batch::flags::BRS,
            &[1; 12],
        )
        .unwrap();
        assert_eq!(
            format_frame(&fd, at),
            format!("< fdframe 010 05 23.424242 {} >", "01".repeat(12))
        );
    }
}
