//! slcan: a CAN adapter that speaks the Lawicel ASCII protocol on a serial port (CANable, USBtin,
//! CANtact and their kin).
//!
//! Every command and every answer is a line ended by CR (0x0D); an adapter refuses a command with a lone
//! BEL (0x07) instead. The commands used here:
//!
//! | command | meaning | answer |
//! |---|---|---|
//! | `S0`..`S8` | nominal bitrate 10k, 20k, 50k, 100k, 125k, 250k, 500k, 800k, 1M (channel closed) | CR or BEL |
//! | `Y1`, `Y2`, `Y4`, `Y5` | CAN FD data bitrate 1M, 2M, 4M, 5M (the CANable 2.0 extension) | CR or BEL |
//! | `O`, `L`, `C` | open, open listen-only, close the channel | CR or BEL |
//! | `Z0`, `Z1` | millisecond timestamps off or on (channel closed) | CR or BEL |
//! | `V` | version | `Vxxxx` CR |
//! | `F` | status flags | `Fxx` CR, the SJA1000 bits below |
//! | `tIIILDD..`, `TIIIIIIIILDD..` | send a classic frame, standard or extended id | `z` CR / `Z` CR, or CR, or BEL |
//! | `dIIIL..`, `DIIIIIIIIL..`, `bIIIL..`, `BIIIIIIIIL..` | send a CAN FD frame, without or with bit rate switch; `L` is the FD DLC 0..F | as above |
//!
//! Frames from the bus arrive in the same forms (and `r`/`R` remote frames, which cannot cross a group
//! and are counted as unsupported), followed by four hex digits of the adapter's millisecond clock
//! (0..59999) when timestamps are on. `F` flags: bit 0 receive FIFO full, 1 transmit FIFO full,
//! 2 error warning, 3 data overrun, 5 error passive, 6 arbitration lost, 7 bus error.
//!
//! Opening follows what slcan hosts do: empty commands to clear a half-typed line, `C` (answered CR, or
//! BEL when already closed), `V`, the bitrates, then `O` or `L`. An adapter that does not answer `C` with
//! CR or BEL within the answer timeout is not an slcan adapter, and the error says so. Lines are at most
//! [`MAX_LINE`] bytes: a longer one is counted as malformed and skipped up to its CR, like any line that
//! does not parse.
//!
//! The first CANable firmware differs from Lawicel in ways handled here: it answers `V` with a line of
//! free text (its git version) followed by CR, answers frames with a lone CR, has no `L` (its `M1` makes
//! the next `O` silent, and `M0` undoes it), no `F` and no `Z`; and its `S7` is 750 kbit/s, not 800.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use firmware_proto::ext::batch::{self, dlc_to_len, len_to_dlc};
use firmware_proto::ids::CanId;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use super::{
    AbortOnDrop, BusHealth, BusState, Driver, Effective, EndpointError, EndpointInfo, EndpointKind,
    EndpointOptions, Plumbing, Request, Shared, bump,
};
use crate::endpoints::slcan_rates::{bitrate_code, bitrate_list, data_bitrate_code};
use crate::endpoints::spec::SlcanSettings;
use crate::frame::Frame;
use control_proto::CanSettings;
use firmware_proto::remp::CanMode;

/// The longest line accepted from an adapter. The longest valid one, an extended FD frame of 64 bytes
/// with a timestamp, has 142 characters.
pub const MAX_LINE: usize = 160;

/// How long the adapter must stay quiet before the agent takes its next answer for a new command's.
const QUIET: Duration = Duration::from_millis(30);
/// How long a write may wait for a port that stopped taking bytes before the adapter counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// One thing an adapter said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A lone CR: the command succeeded (or a frame was queued, on some adapters).
    Ok,
    /// BEL: the command was refused.
    Bell,
    /// `z` or `Z`: a frame was queued for transmission (Lawicel's own acknowledgement).
    TxAck,
    /// A frame from the bus, with the adapter's millisecond clock when timestamps are on.
    Frame {
        frame: Frame,
        timestamp_ms: Option<u16>,
    },
    /// A remote frame from the bus (it cannot cross a group).
    Remote { id: CanId, dlc: u8 },
    /// The answer to `F`.
    Status(u8),
    /// The answer to `V` or `v`, whole.
    Version(String),
    /// The answer to `N`.
    Serial(String),
    /// A printable line that is none of the above: the first CANable firmware's answer to `V`, or
    /// chatter nobody asked for.
    Text(String),
}

/// Why a line from an adapter was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("a malformed line ({0})")]
    Malformed(&'static str),
}

/// Splits the adapter's byte stream into lines and BELs, with a bounded line buffer.
#[derive(Debug)]
pub struct LineDecoder {
    line: Vec<u8>,
    overflow: bool,
}

impl Default for LineDecoder {
    fn default() -> Self {
        Self {
            line: Vec::with_capacity(MAX_LINE),
            overflow: false,
        }
    }
}

impl LineDecoder {
    /// Feeds bytes as they arrive; `out` gets each complete line, parsed, and each BEL.
    pub fn feed(&mut self, bytes: &[u8], mut out: impl FnMut(Result<Incoming, LineError>)) {
        for &byte in bytes {
            match byte {
                b'\r' => {
                    let item = if self.overflow {
                        Err(LineError::TooLong)
                    } else {
                        parse_line(&self.line)
                    };
                    self.line.clear();
                    self.overflow = false;
                    out(item);
                }
                0x07 => out(Ok(Incoming::Bell)),
                // Some adapters end their lines with CR LF.
                b'\n' => {}
                _ if self.line.len() < MAX_LINE => self.line.push(byte),
                _ => self.overflow = true,
            }
        }
    }
}

/// Parses one line (without its CR).
pub fn parse_line(line: &[u8]) -> Result<Incoming, LineError> {
    let Some((&first, rest)) = line.split_first() else {
        return Ok(Incoming::Ok);
    };
    match first {
        b'z' | b'Z' if rest.is_empty() => Ok(Incoming::TxAck),
        // A frame never holds a space; a line that does is text, such as a version that happens to
        // begin with a frame's letter.
        b't' | b'T' | b'r' | b'R' | b'd' | b'D' | b'b' | b'B' if line.contains(&b' ') => {
            printable(line).map(Incoming::Text)
        }
        b't' | b'T' | b'r' | b'R' | b'd' | b'D' | b'b' | b'B' => parse_frame(first, rest),
        b'F' => match rest {
            [hi, lo] => hex_byte(*hi, *lo)
                .map(Incoming::Status)
                .ok_or(LineError::Malformed("status flags")),
            _ => Err(LineError::Malformed("status flags")),
        },
        b'V' | b'v' => printable(line).map(Incoming::Version),
        b'N' => printable(rest).map(Incoming::Serial),
        _ => printable(line).map(Incoming::Text),
    }
}

fn printable(bytes: &[u8]) -> Result<String, LineError> {
    if bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        Ok(String::from_utf8_lossy(bytes).into_owned())
    } else {
        Err(LineError::Malformed("unprintable text"))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some((hex_digit(hi)? << 4) | hex_digit(lo)?)
}

fn hex_u32(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0u32, |acc, &c| Some((acc << 4) | u32::from(hex_digit(c)?)))
}

fn parse_frame(kind: u8, rest: &[u8]) -> Result<Incoming, LineError> {
    let extended = kind.is_ascii_uppercase();
    let remote = matches!(kind, b'r' | b'R');
    let fd = matches!(kind, b'd' | b'D' | b'b' | b'B');
    let brs = matches!(kind, b'b' | b'B');
    let id_len = if extended { 8 } else { 3 };
    let (id_hex, rest) = rest
        .split_at_checked(id_len)
        .ok_or(LineError::Malformed("frame id"))?;
    let raw = hex_u32(id_hex).ok_or(LineError::Malformed("frame id"))?;
    let id =
        CanId::new(raw, extended).map_err(|_| LineError::Malformed("frame id out of range"))?;
    let (&dlc_char, rest) = rest
        .split_first()
        .ok_or(LineError::Malformed("frame length"))?;
    let dlc = hex_digit(dlc_char).ok_or(LineError::Malformed("frame length"))?;
    let len = if fd {
        dlc_to_len(dlc).ok_or(LineError::Malformed("frame length"))?
    } else if dlc <= 8 {
        dlc
    } else {
        return Err(LineError::Malformed("frame length"));
    };
    if remote {
        parse_timestamp(rest)?;
        return Ok(Incoming::Remote { id, dlc });
    }
    let len = usize::from(len);
    let (data_hex, rest) = rest
        .split_at_checked(2 * len)
        .ok_or(LineError::Malformed("frame data"))?;
    let mut data = [0u8; 64];
    for (byte, pair) in data.iter_mut().zip(data_hex.chunks_exact(2)) {
        *byte = hex_byte(pair[0], pair[1]).ok_or(LineError::Malformed("frame data"))?;
    }
    let timestamp_ms = parse_timestamp(rest)?;
    let flags = match (fd, brs) {
        (false, _) => 0,
        (true, false) => batch::flags::FD,
        (true, true) => batch::flags::FD | batch::flags::BRS,
    };
    let frame =
        Frame::with_flags(id, flags, &data[..len]).ok_or(LineError::Malformed("frame length"))?;
    Ok(Incoming::Frame {
        frame,
        timestamp_ms,
    })
}

fn parse_timestamp(rest: &[u8]) -> Result<Option<u16>, LineError> {
    match rest {
        [] => Ok(None),
        [_, _, _, _] => hex_u32(rest)
            .map(|t| Some(t as u16))
            .ok_or(LineError::Malformed("timestamp")),
        _ => Err(LineError::Malformed("trailing characters")),
    }
}

/// Appends the command that transmits `frame`, CR included. False, with nothing appended, for a frame
/// slcan cannot express (a length no DLC has); [`super::check_frame`] keeps those out beforehand.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> bool {
    let data = frame.data();
    let Some(dlc) = u8::try_from(data.len()).ok().and_then(len_to_dlc) else {
        return false;
    };
    if !frame.is_fd() && dlc > 8 {
        return false;
    }
    let extended = frame.id.is_extended();
    let kind = match (frame.is_fd(), frame.fd_flags & batch::flags::BRS != 0) {
        (false, _) => b't',
        (true, false) => b'd',
        (true, true) => b'b',
    };
    let mut line = String::with_capacity(16 + 2 * data.len());
    line.push(char::from(if extended {
        kind.to_ascii_uppercase()
    } else {
        kind
    }));
    // Writing to a String cannot fail.
    if extended {
        let _ = write!(line, "{:08X}", frame.id.raw());
    } else {
        let _ = write!(line, "{:03X}", frame.id.raw());
    }
    let _ = write!(line, "{dlc:X}");
    for b in data {
        let _ = write!(line, "{b:02X}");
    }
    line.push('\r');
    out.extend_from_slice(line.as_bytes());
    true
}

/// Turns the adapter's millisecond clock, which wraps every minute, into microseconds that only grow.
#[derive(Debug, Default)]
pub struct AdapterClock {
    last: Option<u16>,
    wraps: u64,
}

impl AdapterClock {
    pub fn micros(&mut self, ms: u16) -> u64 {
        if self.last.is_some_and(|last| ms < last) {
            self.wraps += 1;
        }
        self.last = Some(ms);
        (self.wraps * 60_000 + u64::from(ms)) * 1_000
    }
}

/// Reads the `F` flags into the bus status.
pub fn apply_status(flags: u8, health: &mut BusHealth) {
    health.state = Some(if flags & 0x20 != 0 {
        BusState::ErrorPassive
    } else if flags & 0x04 != 0 {
        BusState::ErrorWarning
    } else {
        BusState::ErrorActive
    });
    if flags & (0x01 | 0x08) != 0 {
        health.overflows += 1;
    }
    let errors: Vec<&str> = [
        (0x01, "receive FIFO full"),
        (0x02, "transmit FIFO full"),
        (0x04, "error warning"),
        (0x08, "data overrun"),
        (0x20, "error passive"),
        (0x40, "arbitration lost"),
        (0x80, "bus error"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if !errors.is_empty() {
        health.error_frames += 1;
        health.last_error = Some(errors.join(", "));
    }
}

/// An answer in words, for error messages. Text from the port is at most [`MAX_LINE`] printable bytes.
fn describe(said: &Incoming) -> String {
    match said {
        Incoming::Ok => "CR".into(),
        Incoming::Bell => "BEL".into(),
        Incoming::TxAck => "a transmit acknowledgement".into(),
        Incoming::Frame { .. } | Incoming::Remote { .. } => "a CAN frame".into(),
        Incoming::Status(flags) => format!("status flags {flags:02X}"),
        Incoming::Version(text) | Incoming::Serial(text) | Incoming::Text(text) => {
            format!("the text {text:?}")
        }
    }
}

/// What the reader passes the controller: everything the adapter says except frames.
#[derive(Debug)]
enum Answer {
    Said(Incoming),
    /// A line that did not parse (already counted).
    Garbage,
}

/// How one command ended, short of an answer.
enum CommandFailure {
    /// No answer in time; `garbage` lines that were not slcan arrived meanwhile.
    Timeout {
        garbage: u32,
    },
    Closed,
    Io(std::io::Error),
}

/// The settings the adapter runs with now.
#[derive(Debug, Clone, Copy)]
struct Current {
    bitrate: u32,
    data_bitrate: Option<u32>,
    mode: CanMode,
}

/// The controller's side of the serial port: it writes commands and frames, and reads the answers the
/// reader task passes on.
struct Adapter {
    path: String,
    identity: String,
    writer: WriteHalf<SerialStream>,
    answers: mpsc::Receiver<Answer>,
    timeout: Duration,
    shared: Arc<Shared>,
    status_supported: bool,
    /// The channel was made silent with `M1` (the first CANable firmware's listen-only), which stays
    /// until `M0`.
    silent_by_m: bool,
    current: Current,
}

/// Opens the adapter on `settings.path` and brings its channel up.
pub(crate) async fn open(
    settings: &SlcanSettings,
    options: &EndpointOptions,
    plumbing: Plumbing,
) -> Result<Driver, EndpointError> {
    let path = settings.path.display().to_string();
    let port = tokio_serial::new(&path, settings.baud)
        .open_native_async()
        .map_err(|source| EndpointError::Serial {
            path: path.clone(),
            source,
        })?;
    let (reader, writer) = tokio::io::split(port);
    let (answers_tx, answers_rx) = mpsc::channel(64);
    let reader = AbortOnDrop(tokio::spawn(read_loop(
        reader,
        plumbing.frames.clone(),
        plumbing.shared.clone(),
        answers_tx,
    )));
    let identity = format!("slcan:{path}");
    let mut adapter = Adapter {
        path: path.clone(),
        identity: identity.clone(),
        writer,
        answers: answers_rx,
        timeout: options.answer_timeout,
        shared: plumbing.shared.clone(),
        status_supported: false,
        silent_by_m: false,
        current: Current {
            bitrate: settings.bitrate,
            data_bitrate: settings.data_bitrate,
            mode: if settings.listen_only {
                CanMode::ListenOnly
            } else {
                CanMode::Normal
            },
        },
    };
    let version = adapter.handshake(settings).await?;
    let info = EndpointInfo {
        kind: EndpointKind::Slcan,
        identity,
        location: path,
        can_set_timing: true,
        fd: settings.data_bitrate.is_some(),
        version,
        bitrate: Some(settings.bitrate),
        data_bitrate: settings.data_bitrate,
    };
    let requests = plumbing.requests;
    let run = Box::pin(async move {
        // The reader lives exactly as long as the controller.
        let _reader = reader;
        adapter.serve(requests).await;
    });
    Ok(Driver { info, run })
}

async fn read_loop(
    mut reader: ReadHalf<SerialStream>,
    frames: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
    answers: mpsc::Sender<Answer>,
) {
    let mut decoder = LineDecoder::default();
    let mut clock = AdapterClock::default();
    let mut buf = [0u8; 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.feed(&buf[..n], |item| match item {
            Ok(Incoming::Frame {
                mut frame,
                timestamp_ms,
            }) => {
                frame.timestamp_us = match timestamp_ms {
                    Some(ms) => clock.micros(ms),
                    None => shared.now_us(),
                };
                shared.deliver(&frames, frame);
            }
            Ok(Incoming::Remote { .. }) => bump(&shared.stats.unsupported, 1),
            Ok(said) => {
                // The controller drains these all the time; a full queue means an adapter that
                // floods answers nobody asked for, and those are worth no more than garbage.
                if answers.try_send(Answer::Said(said)).is_err() {
                    bump(&shared.stats.malformed, 1);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "skipped a line from an slcan adapter");
                bump(&shared.stats.malformed, 1);
                let _ = answers.try_send(Answer::Garbage);
            }
        });
    }
    // Dropping `answers` tells the controller that the port is gone.
}

impl Adapter {
    fn io_error(&self, source: std::io::Error) -> EndpointError {
        EndpointError::Io {
            identity: self.identity.clone(),
            source,
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), std::io::Error> {
        let write = async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the port took no bytes for 5 s",
                ))
            })
    }

    /// Waits until the adapter has been quiet for [`QUIET`] (at most the answer timeout), dropping what
    /// it said: late acknowledgements of frames must not pass for the answer to the next command. A BEL
    /// among them was a frame the adapter refused.
    async fn quiesce(&mut self) {
        let deadline = Instant::now() + self.timeout;
        loop {
            let quiet_until = (Instant::now() + QUIET).min(deadline);
            match tokio::time::timeout_at(quiet_until, self.answers.recv()).await {
                Ok(Some(answer)) => self.idle_answer(answer),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Handles what the adapter says while no command waits: acknowledgements of frames, refusals of
    /// frames, status reports.
    fn idle_answer(&mut self, answer: Answer) {
        match answer {
            Answer::Said(Incoming::Bell) => bump(&self.shared.stats.frames_out_lost, 1),
            Answer::Said(Incoming::Status(flags)) => {
                self.shared.update_health(|h| apply_status(flags, h));
            }
            Answer::Said(Incoming::Text(_)) => bump(&self.shared.stats.malformed, 1),
            _ => {}
        }
    }

    /// Sends one command and waits for its answer, skipping acknowledgements of earlier frames.
    async fn command(&mut self, command: &str) -> Result<Incoming, CommandFailure> {
        let mut line = command.as_bytes().to_vec();
        line.push(b'\r');
        self.write(&line).await.map_err(CommandFailure::Io)?;
        let deadline = Instant::now() + self.timeout;
        let mut garbage = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.answers.recv()).await {
                Err(_) => return Err(CommandFailure::Timeout { garbage }),
                Ok(None) => return Err(CommandFailure::Closed),
                Ok(Some(Answer::Garbage)) => garbage += 1,
                Ok(Some(Answer::Said(Incoming::TxAck))) => {}
                Ok(Some(Answer::Said(said))) => return Ok(said),
            }
        }
    }

    fn failure(&self, failure: CommandFailure, what: &'static str) -> EndpointError {
        match failure {
            CommandFailure::Timeout { .. } => EndpointError::Timeout {
                identity: self.identity.clone(),
                what,
                after: self.timeout,
            },
            CommandFailure::Closed => EndpointError::Closed {
                identity: self.identity.clone(),
            },
            CommandFailure::Io(source) => self.io_error(source),
        }
    }

    /// Sends a command that must be answered with a lone CR.
    async fn expect_ok(
        &mut self,
        command: &str,
        what: &'static str,
        why: &'static str,
    ) -> Result<(), EndpointError> {
        match self.command(command).await {
            Ok(Incoming::Ok) => Ok(()),
            Ok(Incoming::Bell) => Err(EndpointError::Refused {
                path: self.path.clone(),
                command: command.to_string(),
                why,
            }),
            Ok(_) => Err(EndpointError::Refused {
                path: self.path.clone(),
                command: command.to_string(),
                why: "it answered something else than CR or BEL",
            }),
            Err(f) => Err(self.failure(f, what)),
        }
    }

    /// Brings the channel up as `settings` say; answers the adapter's version, if it tells it.
    async fn handshake(
        &mut self,
        settings: &SlcanSettings,
    ) -> Result<Option<String>, EndpointError> {
        // Empty commands end whatever half-typed line an earlier user left in the adapter; their
        // answers (CR or BEL) are dropped.
        self.write(b"\r\r\r").await.map_err(|e| self.io_error(e))?;
        self.quiesce().await;
        match self.command("C").await {
            // BEL: the channel was closed already.
            Ok(Incoming::Ok | Incoming::Bell) => {}
            Ok(other) => {
                return Err(EndpointError::NotSlcan {
                    path: self.path.clone(),
                    detail: format!("it answered the close command C with {}", describe(&other)),
                });
            }
            Err(CommandFailure::Timeout { garbage: 0 }) => {
                return Err(EndpointError::NotSlcan {
                    path: self.path.clone(),
                    detail: format!(
                        "it did not answer the close command C within {:?}",
                        self.timeout
                    ),
                });
            }
            Err(CommandFailure::Timeout { garbage }) => {
                return Err(EndpointError::NotSlcan {
                    path: self.path.clone(),
                    detail: format!(
                        "it answered the close command C with {garbage} lines that are not slcan"
                    ),
                });
            }
            Err(f) => return Err(self.failure(f, "the close command C")),
        }
        // Not every adapter tells its version; that is no reason to refuse it.
        let version = match self.command("V").await {
            Ok(Incoming::Version(v) | Incoming::Text(v)) => Some(v),
            Ok(_) | Err(CommandFailure::Timeout { .. }) => None,
            Err(f) => return Err(self.failure(f, "the version command V")),
        };
        // The first CANable firmware follows its version line with a CR of its own: drop it, or it would
        // pass for the answer to the next command.
        self.quiesce().await;
        let current = self.current;
        self.apply(current, settings.timestamps).await?;
        // `F` is optional in practice (the first CANable firmware lacks it); ask once whether it works.
        self.quiesce().await;
        match self.command("F").await {
            Ok(Incoming::Status(flags)) => {
                self.status_supported = true;
                self.shared.update_health(|h| apply_status(flags, h));
            }
            Ok(_) | Err(CommandFailure::Timeout { .. }) => {}
            Err(f) => return Err(self.failure(f, "the status command F")),
        }
        Ok(version)
    }

    /// Sets the bitrates and opens the channel (which must be closed).
    async fn apply(&mut self, to: Current, timestamps: bool) -> Result<(), EndpointError> {
        let code = bitrate_code(to.bitrate).expect("bitrates are checked before");
        self.expect_ok(
            &format!("S{}", char::from(code)),
            "the bitrate command",
            "it does not support this bitrate",
        )
        .await?;
        if let Some(data) = to.data_bitrate {
            let code = data_bitrate_code(data).expect("data bitrates are checked before");
            self.expect_ok(
                &format!("Y{}", char::from(code)),
                "the data bitrate command",
                "it does not speak CAN FD, or not at this data bitrate; remove ,fd from the spec for a classic adapter",
            )
            .await?;
        }
        if timestamps {
            self.expect_ok(
                "Z1",
                "the timestamp command",
                "it keeps no timestamps; remove ,timestamps from the spec",
            )
            .await?;
        }
        if to.mode != CanMode::ListenOnly {
            if self.silent_by_m {
                self.expect_ok("M0", "the mode command", "it would not leave silent mode")
                    .await?;
                self.silent_by_m = false;
            }
            return self
                .expect_ok("O", "the open command", "it could not open the channel")
                .await;
        }
        match self.command("L").await {
            Ok(Incoming::Ok) => Ok(()),
            Ok(Incoming::Bell) => {
                // The first CANable firmware has no L: its M1 makes the next O silent.
                self.expect_ok("M1", "the mode command", "it has no listen-only mode")
                    .await?;
                self.silent_by_m = true;
                self.expect_ok("O", "the open command", "it could not open the channel")
                    .await
            }
            Ok(_) => Err(EndpointError::Refused {
                path: self.path.clone(),
                command: "L".into(),
                why: "it answered something else than CR or BEL",
            }),
            Err(f) => Err(self.failure(f, "the listen-only command L")),
        }
    }

    async fn serve(mut self, mut requests: mpsc::Receiver<Request>) {
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => {
                        // The handle is gone: leave the adapter closed, as python-can does on shutdown,
                        // but never wait long on a port that stopped taking bytes.
                        let _ = tokio::time::timeout(self.timeout, self.write(b"C\r")).await;
                        return;
                    }
                    Some(Request::Send(frames)) => {
                        let mut bytes = Vec::with_capacity(frames.len() * 32);
                        let mut sent = 0;
                        for frame in &frames {
                            if encode_frame(frame, &mut bytes) {
                                sent += 1;
                            } else {
                                bump(&self.shared.stats.frames_out_lost, 1);
                            }
                        }
                        if let Err(e) = self.write(&bytes).await {
                            tracing::warn!(endpoint = %self.identity, error = %e, "the slcan adapter cannot be written to");
                            return;
                        }
                        bump(&self.shared.stats.frames_out, sent);
                    }
                    Some(Request::Configure(config, reply)) => {
                        let result = self.configure(&config).await;
                        let gone = matches!(result, Err(EndpointError::Closed { .. } | EndpointError::Io { .. }));
                        let _ = reply.send(result);
                        if gone {
                            return;
                        }
                    }
                    Some(Request::Status(reply)) => {
                        if self.status_supported {
                            self.quiesce().await;
                            match self.command("F").await {
                                Ok(Incoming::Status(flags)) => {
                                    self.shared.update_health(|h| apply_status(flags, h));
                                }
                                Ok(_) | Err(CommandFailure::Timeout { .. }) => {}
                                Err(_) => return,
                            }
                        }
                        let _ = reply.send(self.shared.health.lock().unwrap().clone());
                    }
                },
                answer = self.answers.recv() => match answer {
                    Some(answer) => self.idle_answer(answer),
                    // The reader ended: the port is gone (unplugged).
                    None => return,
                },
            }
        }
    }

    /// Closes the channel, sets the new bitrates and mode, and opens it again. A refused setting puts the
    /// old ones back, so that a bad request leaves the bus as it was.
    async fn configure(&mut self, config: &CanSettings) -> Result<Effective, EndpointError> {
        let identity = self.identity.clone();
        if config.use_raw {
            return Err(EndpointError::TimingNotSettable {
                identity,
                what: "raw bit timing (prescaler and segments)",
                how: format!(
                    "slcan adapters take only the bitrates of S0..S8 ({})",
                    bitrate_list()
                ),
            });
        }
        if bitrate_code(config.bitrate).is_none() {
            return Err(EndpointError::TimingNotSettable {
                identity,
                what: "this bitrate",
                how: format!("slcan sets only {} bit/s", bitrate_list()),
            });
        }
        if matches!(config.mode, CanMode::Loopback | CanMode::ExtLoop) {
            return Err(EndpointError::Unsupported {
                identity,
                what: "loopback modes (slcan has normal and listen-only)",
            });
        }
        // The configuration carries no data-phase bitrate: a CAN FD adapter keeps its spec's.
        let data_bitrate = self.current.data_bitrate;
        let wanted = Current {
            bitrate: config.bitrate,
            data_bitrate,
            mode: config.mode,
        };
        let before = self.current;
        self.quiesce().await;
        match self.command("C").await {
            Ok(_) => {}
            Err(f) => return Err(self.failure(f, "the close command C")),
        }
        match self.apply(wanted, false).await {
            Ok(()) => {
                self.current = wanted;
                let mut notes = Vec::new();
                if config.sample_point_permille != 0 {
                    notes.push(
                        "the sample point is the adapter's own: slcan's S commands do not set it"
                            .to_string(),
                    );
                }
                Ok(Effective {
                    bitrate: wanted.bitrate,
                    data_bitrate: wanted.data_bitrate,
                    mode: wanted.mode,
                    sample_point_permille: None,
                    notes,
                })
            }
            Err(e) => {
                let _ = self.command("C").await;
                if let Err(restore) = self.apply(before, false).await {
                    tracing::warn!(endpoint = %identity, error = %restore, "could not put the slcan adapter back as it was");
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(bytes: &[u8]) -> Vec<Result<Incoming, LineError>> {
        let mut out = Vec::new();
        LineDecoder::default().feed(bytes, |i| out.push(i));
        out
    }

    fn frame(line: &str) -> (Frame, Option<u16>) {
        match parse_line(line.as_bytes()) {
            Ok(Incoming::Frame {
                frame,
                timestamp_ms,
            }) => (frame, timestamp_ms),
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn classic_and_fd_frames_parse() {
        let (f, ts) = frame("t1238DEADBEEF00112233");
        assert_eq!(f.id, CanId::standard(0x123).unwrap());
        assert_eq!(f.data(), [0xde, 0xad, 0xbe, 0xef, 0x00, 0x11, 0x22, 0x33]);
        assert_eq!((f.is_fd(), ts), (false, None));
        let (f, ts) = frame("T1FFFFFFF20102EA5F");
        assert_eq!(f.id, CanId::extended(0x1fff_ffff).unwrap());
        assert_eq!((f.data(), ts), (&[1u8, 2][..], Some(0xea5f)));
        let (f, _) = frame("d7DF9000102030405060708090A0B");
        assert!(f.is_fd() && f.fd_flags & batch::flags::BRS == 0);
        assert_eq!(f.data().len(), 12);
        let (f, _) = frame(&format!("B00000123F{}", "AB".repeat(64)));
        assert!(f.is_fd() && f.fd_flags & batch::flags::BRS != 0);
        assert_eq!(f.data(), [0xab; 64]);
        assert_eq!(frame("t0000").0.data(), [0u8; 0]);
    }

    #[test]
    fn answers_parse() {
        assert_eq!(parse_line(b""), Ok(Incoming::Ok));
        assert_eq!(parse_line(b"z"), Ok(Incoming::TxAck));
        assert_eq!(parse_line(b"Z"), Ok(Incoming::TxAck));
        assert_eq!(parse_line(b"F24"), Ok(Incoming::Status(0x24)));
        assert_eq!(parse_line(b"V1013"), Ok(Incoming::Version("V1013".into())));
        assert_eq!(parse_line(b"NA123"), Ok(Incoming::Serial("A123".into())));
        assert_eq!(
            parse_line(b"a1b2c3d github.com/normaldotcom/canable-fw"),
            Ok(Incoming::Text(
                "a1b2c3d github.com/normaldotcom/canable-fw".into()
            ))
        );
        assert_eq!(
            parse_line(b"r1232"),
            Ok(Incoming::Remote {
                id: CanId::standard(0x123).unwrap(),
                dlc: 2
            })
        );
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for bad in [
            &b"t12"[..],
            b"t123",
            b"t1239",
            b"t12X1AA",
            b"t1232AA",
            b"t1231AAB",
            b"t8001AA",
            b"T2000000010",
            b"d123GAA",
            b"FZZ",
            b"F1",
            b"V\x01",
            b"?\x02",
            b"t1231AA12345",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_line(bad), Err(LineError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_decoder_bounds_lines_and_handles_bel_and_crlf() {
        let mut input = b"t1231AA\r\n\x07".to_vec();
        input.extend(std::iter::repeat_n(b'7', 10 * MAX_LINE));
        input.extend_from_slice(b"\rz\r");
        let out = lines(&input);
        assert_eq!(out.len(), 4, "{out:?}");
        assert!(matches!(out[0], Ok(Incoming::Frame { .. })));
        assert_eq!(out[1], Ok(Incoming::Bell));
        assert_eq!(out[2], Err(LineError::TooLong));
        assert_eq!(out[3], Ok(Incoming::TxAck));
        // A line split across reads comes out whole.
        let mut decoder = LineDecoder::default();
        let mut got = Vec::new();
        decoder.feed(b"t12", |i| got.push(i));
        decoder.feed(b"31AA\r", |i| got.push(i));
        assert!(matches!(got.as_slice(), [Ok(Incoming::Frame { .. })]));
    }

    #[test]
    fn frames_encode_as_they_parse() {
        let cases = [
            Frame::classic(CanId::standard(0x7df).unwrap(), &[2, 1, 0]).unwrap(),
            Frame::classic(CanId::extended(0x18db33f1).unwrap(), &[]).unwrap(),
            Frame::with_flags(CanId::standard(0x10).unwrap(), batch::flags::FD, &[7; 20]).unwrap(),
            Frame::with_flags(
                CanId::extended(0x10).unwrap(),
                batch::flags::FD | batch::flags::BRS,
                &[9; 64],
            )
            .unwrap(),
        ];
        for f in cases {
            let mut out = Vec::new();
            assert!(encode_frame(&f, &mut out));
            assert_eq!(out.pop(), Some(b'\r'));
            assert_eq!(frame(std::str::from_utf8(&out).unwrap()).0, f);
        }
        let mut out = Vec::new();
        encode_frame(&cases[0], &mut out);
        assert_eq!(out, b"t7DF3020100\r");
        let odd =
            Frame::with_flags(CanId::standard(1).unwrap(), batch::flags::FD, &[0; 13]).unwrap();
        assert!(!encode_frame(&odd, &mut out));
    }

    #[test]
    fn the_adapter_clock_unwraps_each_minute() {
        let mut clock = AdapterClock::default();
        assert_eq!(clock.micros(59_990), 59_990_000);
        assert_eq!(clock.micros(5), 60_005_000);
        assert_eq!(clock.micros(10), 60_010_000);
    }

    #[test]
    fn status_flags_become_bus_health() {
        let mut h = BusHealth::default();
        apply_status(0x00, &mut h);
        assert_eq!(h.state, Some(BusState::ErrorActive));
        assert_eq!(h.error_frames, 0);
        apply_status(0x24, &mut h);
        assert_eq!(h.state, Some(BusState::ErrorPassive));
        assert_eq!(
            h.last_error.as_deref(),
            Some("error warning, error passive")
        );
        apply_status(0x08, &mut h);
        assert_eq!(h.overflows, 1);
    }

    proptest::proptest! {
        /// Whatever an adapter sends, the decoder neither panics nor keeps more than a line.
        #[test]
        fn any_bytes_decode_without_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..8)) {
            let mut decoder = LineDecoder::default();
            for chunk in &chunks {
                decoder.feed(chunk, |_| {});
                proptest::prop_assert!(decoder.line.len() <= MAX_LINE);
            }
        }

        /// Lines that look like frames parse or fail, never panic.
        #[test]
        fn frame_like_lines_never_panic(kind in proptest::sample::select(b"tTrRdDbB".to_vec()),
                                        rest in "[0-9A-Fa-fxZ ]{0,150}") {
            let mut line = vec![kind];
            line.extend_from_slice(rest.as_bytes());
            let _ = parse_line(&line);
        }
    }

    #[test]
    fn bitrate_tables() {
        assert_eq!(bitrate_code(500_000), Some(b'6'));
        assert_eq!(bitrate_code(800_000), Some(b'7'));
        assert_eq!(bitrate_code(83_333), None);
        assert_eq!(data_bitrate_code(2_000_000), Some(b'2'));
        assert!(bitrate_list().starts_with("10000, 20000"));
    }
}
