//! Traffic sources: a steady generator with sequence counters, and `candump -L` log replay.
//!
//! Generated frames carry their sequence number so that any receiver can check order and
//! loss: the first 4 data bytes are a big-endian u32 counter starting at 0 (wrapping), and the
//! rest of the data is 0x00. Classic frames are 8 bytes long; FD frames 64 bytes with BRS.
//! The identifier is [`GENERATOR_ID`] unless configured.
//!
//! A `candump -L` line reads `(SECONDS.MICROS) IFACE FRAME`, with FRAME as
//! [`crate::frame::Frame`] parses it. Remote frames are skipped and counted; blank lines and
//! `#` comments are ignored; any other line that does not parse is an error naming its line.

use std::path::Path;
use std::time::Duration;

use firmware_proto::ids::CanId;

use crate::frame::{Frame, FrameError};

/// The default identifier of generated frames.
pub const GENERATOR_ID: u16 = 0x100;
/// The largest replay log read, in bytes.
pub const MAX_LOG_LEN: u64 = 64 * 1024 * 1024;

/// Settings of the generator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeneratorConfig {
    /// Frames per second (above 0).
    pub rate: f64,
    /// Generate 64-byte FD frames instead of 8-byte classic ones.
    pub fd: bool,
    /// The identifier of the frames.
    pub id: CanId,
}

/// Produces the frames of a steady stream, numbered from 0.
#[derive(Debug, Clone)]
pub struct Generator {
    config: GeneratorConfig,
    next_seq: u32,
}

impl Generator {
    /// A generator starting at sequence number 0.
    pub fn new(config: GeneratorConfig) -> Self {
        Self {
            config,
            next_seq: 0,
        }
    }

    /// The interval between frames (at least 1 µs).
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.config.rate.max(1e-3)).max(Duration::from_micros(1))
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> Frame {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut data = [0u8; 64];
        data[..4].copy_from_slice(&seq.to_be_bytes());
        use firmware_proto::ext::batch::flags;
        // Both lengths are valid frame lengths, so the unchecked constructor is safe to use.
        if self.config.fd {
            Frame::build(
                self.config.id,
                flags::FD | flags::BRS | flags::SIMULATED,
                &data,
            )
        } else {
            Frame::build(self.config.id, flags::SIMULATED, &data[..8])
        }
    }
}

/// The sequence number of a generated frame, if its data is long enough to hold one.
pub fn sequence_of(frame: &Frame) -> Option<u32> {
    let bytes: [u8; 4] = frame.data().get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// One frame of a candump log with its time offset from the first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Time since the log's first frame.
    pub offset: Duration,
    /// The interface name of the line.
    pub iface: String,
    /// The frame.
    pub frame: Frame,
}

/// A parsed candump log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CandumpLog {
    /// The frames, in file order.
    pub entries: Vec<LogEntry>,
    /// Remote frames skipped.
    pub skipped_remote: usize,
}

/// Why a log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading failed.
    #[error("replay log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("replay log line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file is too large.
    #[error("replay log {0} is larger than 64 MiB")]
    TooLarge(String),
}

impl CandumpLog {
    /// Reads and parses a log file.
    pub fn read(path: &Path) -> Result<Self, LogError> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| LogError::Io {
            path: name.clone(),
            source,
        })?;
        if meta.len() > MAX_LOG_LEN {
            return Err(LogError::TooLarge(name));
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| LogError::Io { path: name, source })?;
        Self::parse(&text)
    }

    /// Parses log text.
    pub fn parse(text: &str) -> Result<Self, LogError> {
        let mut log = CandumpLog::default();
        let mut first: Option<u64> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| LogError::Line {
                line: index + 1,
                reason,
            };
            let mut parts = line.split_whitespace();
            let (Some(ts), Some(iface), Some(frame), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(err("expected \"(SECONDS.MICROS) IFACE FRAME\"".into()));
            };
            let micros = parse_timestamp(ts).ok_or_else(|| err(format!("bad timestamp {ts:?}")))?;
            let frame = match frame.parse::<Frame>() {
                Ok(frame) => frame,
                Err(FrameError::Remote) => {
                    log.skipped_remote += 1;
                    continue;
                }
                Err(e) => return Err(err(e.to_string())),
            };
            let start = *first.get_or_insert(micros);
            // A log whose clock goes backwards replays that frame without waiting.
            let offset = Duration::from_micros(micros.saturating_sub(start));
            log.entries.push(LogEntry {
                offset,
                iface: iface.into(),
                frame,
            });
        }
        Ok(log)
    }
}

/// Parses `(SECONDS.FRACTION)` into microseconds without floating point.
fn parse_timestamp(text: &str) -> Option<u64> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let (secs, frac) = inner.split_once('.').unwrap_or((inner, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let mut micros = 0u64;
    for i in 0..6 {
        let digit = frac.as_bytes().get(i).map_or(0, |d| u64::from(d - b'0'));
        micros = micros * 10 + digit;
    }
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_numbers_its_frames() {
        let id = CanId::standard(GENERATOR_ID).unwrap();
        let mut g = Generator::new(GeneratorConfig {
            rate: 100.0,
            fd: false,
            id,
        });
        let a = g.next_frame();
        let b = g.next_frame();
        assert_eq!((sequence_of(&a), sequence_of(&b)), (Some(0), Some(1)));
        assert!(a.is_simulated() && a.data().len() == 8);
        let mut fd = Generator::new(GeneratorConfig {
            rate: 100.0,
            fd: true,
            id,
        });
        assert_eq!(fd.next_frame().data().len(), 64);
        assert_eq!(g.interval(), Duration::from_millis(10));
    }

    #[test]
    fn parses_candump_lines() {
        let log = CandumpLog::parse(
            "(1764028800.000300) can0 0C9#801AF8003C000000\n\n# comment\n(1764028800.010300) can0 18DAF110#0102\n(1764028800.02) can1 123#R\n(1764028800.5) can0 123##1DEADBEEF\n",
        )
        .unwrap();
        assert_eq!(log.entries.len(), 3);
        assert_eq!(log.skipped_remote, 1);
        assert_eq!(log.entries[1].offset, Duration::from_millis(10));
        assert!(log.entries[1].frame.id().is_extended());
        assert!(log.entries[2].frame.is_fd());
        assert_eq!(log.entries[2].offset, Duration::from_micros(499_700));
        assert!(matches!(
            CandumpLog::parse("(1.0) can0 XYZ#00"),
            Err(LogError::Line { line: 1, .. })
        ));
        assert!(CandumpLog::parse("garbage").is_err());
    }

    #[test]
    fn parses_the_obd2_test_log() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/obd2-session.log");
        let log =
            CandumpLog::read(&path).expect("sim/testdata/obd2-session.log is in the repository");
        assert!(log.entries.len() > 200);
        assert!(
            log.entries
                .iter()
                .any(|e| e.frame.to_string() == "7DF#0201000000000000")
        );
    }
}
