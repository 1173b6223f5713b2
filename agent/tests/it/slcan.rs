//! slcan endpoints against a pseudo-terminal peer that behaves as a CANable adapter: the opening
//! handshake, frames both ways (classic, FD, with timestamps), configuration, status, malformed lines,
//! refused frames, an adapter that never answers, a device that speaks something else, and unplugging
//! and plugging back in under an `EndpointSet`; and, end to end, an adapter served by `bridge-agent` as
//! a dongle of its user, configured and sent to through the real server.

use crate::common;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_agent::endpoints::{
    BusState, CanEndpoint, EndpointError, EndpointEvent, EndpointOptions, EndpointSet,
    EndpointSpec, EndpointStore, SetOptions,
};
use bridge_agent::home::Home;
use bridge_agent::session::Frame;
use control_proto::CanSettings;
use firmware_proto::ext::batch::flags;
use firmware_proto::ids::CanId;
use firmware_proto::remp::CanMode;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(3);

/// How the fake adapter behaves.
#[derive(Debug, Clone)]
struct Behaviour {
    /// Reads everything and answers nothing.
    silent: bool,
    /// Answers every line with this instead of slcan.
    babble: Option<&'static str>,
    /// Has the CANable 2.0 FD extension (`Y`, `d/D/b/B`).
    fd: bool,
    /// Answers `F` with these flags; `None`: refuses `F` (BEL), as the first CANable firmware does.
    status: Option<u8>,
    /// Refuses this `S` digit.
    refuse_bitrate: Option<u8>,
    /// Behaves as the first CANable firmware: a free-text version followed by CR, CR for frames, no
    /// `L`, `F`, `Z` or `Y`, and `M1`/`M0` for silent mode.
    canable1: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            silent: false,
            babble: None,
            fd: false,
            status: Some(0),
            refuse_bitrate: None,
            canable1: false,
        }
    }
}

/// The adapter's channel state.
#[derive(Debug, Default)]
struct Channel {
    open: Option<char>,
    bitrate: Option<u8>,
    timestamps: bool,
    /// `M1` was given (the first CANable firmware's silent mode).
    silent: bool,
}

/// A CANable on a pseudo-terminal: it answers slcan commands as the adapter does, reports every line
/// the host sent, and sends the host whatever a test injects.
struct FakeAdapter {
    path: PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAdapter {
    fn drop(&mut self) {
        // The task owns both ends of the terminal: stopping it is pulling the plug.
        self.task.abort();
    }
}

fn open_pty() -> (AsyncFd<OwnedFd>, OwnedFd, PathBuf) {
    let pair = nix::pty::openpty(None, None).unwrap();
    // Not inherited by anything this test process starts, so that dropping them is a hang-up.
    for fd in [&pair.master, &pair.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    let mut termios = tcgetattr(&pair.slave).unwrap();
    cfmakeraw(&mut termios);
    tcsetattr(&pair.slave, SetArg::TCSANOW, &termios).unwrap();
    let flags = OFlag::from_bits_truncate(fcntl(&pair.master, FcntlArg::F_GETFL).unwrap());
    fcntl(&pair.master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
    let path = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&pair.slave)
    ))
    .unwrap();
    // SAFETY: `pair.master` is an open descriptor owned by the `AsyncFd` from here on; nothing else
    // closes or replaces it while it is registered, which is what `register_with_interest` asks.
    #[allow(unsafe_code)]
    let master = unsafe {
        AsyncFd::register_with_interest(pair.master, Interest::READABLE | Interest::WRITABLE)
    }
    .unwrap();
    (master, pair.slave, path)
}

async fn write_all(master: &AsyncFd<OwnedFd>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let mut guard = master.writable().await.unwrap();
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), bytes).map_err(Into::into)) {
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) => panic!("pty write: {e}"),
            Err(_would_block) => {}
        }
    }
}

impl FakeAdapter {
    fn start(behaviour: Behaviour) -> Self {
        let (master, slave, path) = open_pty();
        let (lines_tx, lines) = mpsc::unbounded_channel();
        let (inject, mut injected) = mpsc::unbounded_channel::<Vec<u8>>();
        let task = tokio::spawn(async move {
            let _slave = slave;
            let mut channel = Channel::default();
            let mut line = Vec::new();
            let mut buf = [0u8; 512];
            loop {
                tokio::select! {
                    ready = master.readable() => {
                        let mut guard = ready.unwrap();
                        let n = match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
                            Ok(Ok(n)) => n,
                            Ok(Err(_)) => return,
                            Err(_would_block) => continue,
                        };
                        for &b in &buf[..n] {
                            if b != b'\r' {
                                line.push(b);
                                continue;
                            }
                            let text = String::from_utf8_lossy(&line).into_owned();
                            line.clear();
                            let _ = lines_tx.send(text.clone());
                            if let Some(reply) = answer(&text, &behaviour, &mut channel) {
                                write_all(&master, &reply).await;
                            }
                        }
                    }
                    bytes = injected.recv() => match bytes {
                        Some(bytes) => write_all(&master, &bytes).await,
                        None => return,
                    },
                }
            }
        });
        Self {
            path,
            lines,
            inject,
            task,
        }
    }

    fn send(&self, bytes: &[u8]) {
        self.inject.send(bytes.to_vec()).unwrap();
    }

    /// The next line the host sent.
    async fn line(&mut self) -> String {
        timeout(WAIT, self.lines.recv())
            .await
            .expect("the host sent nothing")
            .expect("the adapter stopped")
    }

    /// Skips the host's empty lines and returns the next command.
    async fn command(&mut self) -> String {
        loop {
            let line = self.line().await;
            if !line.is_empty() {
                return line;
            }
        }
    }

    async fn expect(&mut self, commands: &[&str]) {
        for wanted in commands {
            assert_eq!(self.command().await, *wanted);
        }
    }
}

/// What a CANable answers to one command line.
fn answer(line: &str, b: &Behaviour, ch: &mut Channel) -> Option<Vec<u8>> {
    const OK: &[u8] = b"\r";
    const BEL: &[u8] = b"\x07";
    if b.silent {
        return None;
    }
    if let Some(babble) = b.babble {
        return Some(babble.as_bytes().to_vec());
    }
    let bytes = line.as_bytes();
    if b.canable1 {
        return Some(canable1(bytes, ch).to_vec());
    }
    let reply: &[u8] = match bytes.first() {
        None => OK,
        Some(b'S') => match bytes.get(1) {
            Some(d @ b'0'..=b'8') if ch.open.is_none() && Some(*d) != b.refuse_bitrate => {
                ch.bitrate = Some(*d);
                OK
            }
            _ => BEL,
        },
        Some(b'Y') if b.fd && ch.open.is_none() => OK,
        Some(b'Z') if ch.open.is_none() => {
            ch.timestamps = bytes.get(1) == Some(&b'1');
            OK
        }
        Some(c @ (b'O' | b'L')) if ch.open.is_none() && ch.bitrate.is_some() => {
            ch.open = Some(char::from(*c));
            OK
        }
        Some(b'C') if ch.open.is_some() => {
            ch.open = None;
            OK
        }
        Some(b'V') => b"V1013\r",
        Some(b'F') => match b.status {
            Some(flags) => return Some(format!("F{flags:02X}\r").into_bytes()),
            None => BEL,
        },
        Some(c @ (b't' | b'T' | b'd' | b'D' | b'b' | b'B')) => {
            let fd_kind = matches!(c, b'd' | b'D' | b'b' | b'B');
            if ch.open != Some('O') || (fd_kind && !b.fd) {
                BEL
            } else if c.is_ascii_uppercase() {
                b"Z\r"
            } else {
                b"z\r"
            }
        }
        _ => BEL,
    };
    Some(reply.to_vec())
}

/// What the first CANable firmware answers.
fn canable1(bytes: &[u8], ch: &mut Channel) -> &'static [u8] {
    match bytes.first() {
        None => b"\r",
        Some(b'S') if matches!(bytes.get(1), Some(b'0'..=b'8')) => {
            ch.bitrate = bytes.get(1).copied();
            b"\r"
        }
        Some(b'M') => {
            ch.silent = bytes.get(1) == Some(&b'1');
            b"\r"
        }
        Some(b'O') => {
            ch.open = Some(if ch.silent { 'L' } else { 'O' });
            b"\r"
        }
        Some(b'C') => {
            ch.open = None;
            b"\r"
        }
        Some(b'V') => b"d3adb33 github.com/normaldotcom/canable-fw.git\r\r",
        Some(b't' | b'T') if ch.open == Some('O') => b"\r",
        _ => b"\x07",
    }
}

fn options() -> EndpointOptions {
    EndpointOptions {
        frame_queue: 64,
        answer_timeout: Duration::from_millis(400),
    }
}

fn spec(path: &Path, rest: &str) -> EndpointSpec {
    format!("slcan:{}{rest}", path.display()).parse().unwrap()
}

async fn next_frame(frames: &mut mpsc::Receiver<Frame>) -> Frame {
    timeout(WAIT, frames.recv())
        .await
        .expect("no frame arrived")
        .expect("the endpoint closed")
}

fn std_id(id: u16) -> CanId {
    CanId::standard(id).unwrap()
}

#[tokio::test]
async fn opens_as_slcan_hosts_do_and_carries_frames_both_ways() {
    let mut adapter = FakeAdapter::start(Behaviour::default());
    let endpoint = CanEndpoint::open(&spec(&adapter.path, "@500000"), &options())
        .await
        .unwrap();
    adapter.expect(&["C", "V", "S6", "O", "F"]).await;
    let info = endpoint.info();
    assert_eq!(info.identity, format!("slcan:{}", adapter.path.display()));
    assert_eq!(info.version.as_deref(), Some("V1013"));
    assert!(info.can_set_timing && !info.fd);
    assert_eq!(info.bitrate, Some(500_000));
    assert_eq!(endpoint.health().state, Some(BusState::ErrorActive));

    // The adapter's frames, as python-can's slcan bus reads them.
    let mut frames = endpoint.take_frames().unwrap();
    adapter.send(b"t1238DEADBEEF00112233\rT18DB33F10\r");
    let f = next_frame(&mut frames).await;
    assert_eq!(
        (f.id, f.data()),
        (
            std_id(0x123),
            &[0xde, 0xad, 0xbe, 0xef, 0, 0x11, 0x22, 0x33][..]
        )
    );
    let f = next_frame(&mut frames).await;
    assert_eq!(f.id, CanId::extended(0x18db_33f1).unwrap());
    assert!(f.data().is_empty());
    assert!(f.timestamp_us > 0, "stamped with the agent's clock");

    // Frames from the group, as the adapter reads them.
    endpoint
        .send_frames(&[
            Frame::classic(std_id(0x7df), &[2, 1, 0x0d]).unwrap(),
            Frame::classic(CanId::extended(0x18db33f1).unwrap(), &[2, 1, 0]).unwrap(),
        ])
        .await
        .unwrap();
    adapter.expect(&["t7DF302010D", "T18DB33F13020100"]).await;

    // A classic adapter takes no FD frames: refused before anything is written.
    let fd = Frame::with_flags(std_id(0x10), flags::FD, &[0; 12]).unwrap();
    assert!(matches!(
        endpoint.send_frames(&[fd]).await,
        Err(EndpointError::Unsupported { .. })
    ));
    let stats = endpoint.stats();
    assert_eq!(
        (stats.frames_in, stats.frames_out, stats.malformed),
        (2, 2, 0)
    );

    // Dropping the endpoint closes the channel, as python-can does on shutdown.
    drop(endpoint);
    assert_eq!(adapter.command().await, "C");
}

#[tokio::test]
async fn fd_adapters_carry_fd_frames_with_and_without_bit_rate_switch() {
    let mut adapter = FakeAdapter::start(Behaviour {
        fd: true,
        ..Behaviour::default()
    });
    let endpoint = CanEndpoint::open(&spec(&adapter.path, "@1M,fd=5M"), &options())
        .await
        .unwrap();
    adapter.expect(&["C", "V", "S8", "Y5", "O", "F"]).await;
    let info = endpoint.info();
    assert!(info.fd);
    assert_eq!(info.data_bitrate, Some(5_000_000));

    let mut frames = endpoint.take_frames().unwrap();
    adapter.send(format!("b123F{}\rD000001239{}\r", "5A".repeat(64), "01".repeat(12)).as_bytes());
    let f = next_frame(&mut frames).await;
    assert!(f.is_fd() && f.fd_flags & flags::BRS != 0);
    assert_eq!(f.data(), [0x5a; 64]);
    let f = next_frame(&mut frames).await;
    assert!(f.is_fd() && f.fd_flags & flags::BRS == 0);
    assert_eq!(
        (f.id, f.data().len()),
        (CanId::extended(0x123).unwrap(), 12)
    );

    endpoint
        .send_frames(&[
            Frame::with_flags(std_id(0x7df), flags::FD | flags::BRS, &[0xab; 16]).unwrap(),
            Frame::with_flags(CanId::extended(0x1).unwrap(), flags::FD, &[1, 2]).unwrap(),
        ])
        .await
        .unwrap();
    adapter
        .expect(&[&format!("b7DFA{}", "AB".repeat(16)), "D0000000120102"])
        .await;
    // A length CAN FD has no DLC for is refused before it reaches the adapter.
    let odd = Frame::with_flags(std_id(1), flags::FD, &[0; 13]).unwrap();
    assert!(matches!(
        endpoint.send_frames(&[odd]).await,
        Err(EndpointError::BadFrame(_))
    ));
}

#[tokio::test]
async fn an_fd_spec_on_a_classic_adapter_is_refused_clearly() {
    let adapter = FakeAdapter::start(Behaviour::default());
    let err = CanEndpoint::open(&spec(&adapter.path, "@500k,fd"), &options())
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("CAN FD"), "{err}");
}

#[tokio::test]
async fn adapter_timestamps_become_a_growing_microsecond_clock() {
    let mut adapter = FakeAdapter::start(Behaviour::default());
    let endpoint = CanEndpoint::open(&spec(&adapter.path, "@125k,timestamps"), &options())
        .await
        .unwrap();
    adapter.expect(&["C", "V", "S4", "Z1", "O", "F"]).await;
    let mut frames = endpoint.take_frames().unwrap();
    // 59.998 s, then 0.003 s after the adapter's minute wrapped.
    adapter.send(b"t1231AAEA5E\rt1231BB0003\r");
    let a = next_frame(&mut frames).await;
    let b = next_frame(&mut frames).await;
    assert_eq!(a.timestamp_us, 59_998_000);
    assert_eq!(b.timestamp_us, 60_003_000);
    assert_eq!(b.data(), [0xbb]);
}

#[tokio::test]
async fn configure_sets_bitrate_and_mode_and_says_what_it_cannot() {
    let mut adapter = FakeAdapter::start(Behaviour {
        refuse_bitrate: Some(b'8'),
        ..Behaviour::default()
    });
    let endpoint = CanEndpoint::open(&spec(&adapter.path, ""), &options())
        .await
        .unwrap();
    adapter.expect(&["C", "V", "S6", "O", "F"]).await;
    let config = |bitrate, mode| CanSettings::derived(bitrate, 875, mode);

    let effective = endpoint
        .configure(&config(250_000, CanMode::ListenOnly))
        .await
        .unwrap();
    adapter.expect(&["C", "S5", "L"]).await;
    assert_eq!(effective.bitrate, 250_000);
    assert_eq!(effective.mode, CanMode::ListenOnly);
    assert_eq!(effective.sample_point_permille, None);
    assert!(
        effective.notes[0].contains("sample point"),
        "{:?}",
        effective.notes
    );
    assert_eq!(endpoint.info().bitrate, Some(250_000));

    // Listen-only: the adapter refuses frames with BEL, and each is counted lost.
    endpoint
        .send_frames(&[Frame::classic(std_id(1), &[1]).unwrap()])
        .await
        .unwrap();
    adapter.expect(&["t001101"]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while endpoint.stats().frames_out_lost == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What slcan cannot do is refused, saying so, and nothing is sent.
    for (bad, what) in [
        (config(300_000, CanMode::Normal), "bitrate"),
        (
            CanSettings {
                use_raw: true,
                prescaler: Some(10),
                sjw: Some(1),
                tseg1: Some(13),
                tseg2: Some(2),
                ..config(500_000, CanMode::Normal)
            },
            "raw bit timing",
        ),
    ] {
        let err = endpoint.configure(&bad).await.unwrap_err();
        assert!(
            matches!(err, EndpointError::TimingNotSettable { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(what), "{err}");
    }
    for mode in [CanMode::Loopback, CanMode::ExtLoop] {
        let err = endpoint
            .configure(&config(500_000, mode))
            .await
            .unwrap_err();
        assert!(matches!(err, EndpointError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("loopback"), "{err}");
    }

    // A bitrate the adapter refuses leaves it as it was.
    let err = endpoint
        .configure(&config(1_000_000, CanMode::Normal))
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Refused { .. }), "{err}");
    adapter.expect(&["C", "S8", "C", "S5", "L"]).await;
    assert_eq!(endpoint.info().bitrate, Some(250_000));
}

#[tokio::test]
async fn the_status_flags_become_the_bus_status() {
    let adapter = FakeAdapter::start(Behaviour {
        status: Some(0x24),
        ..Behaviour::default()
    });
    let endpoint = CanEndpoint::open(&spec(&adapter.path, ""), &options())
        .await
        .unwrap();
    let health = endpoint.bus_status().await.unwrap();
    assert_eq!(health.state, Some(BusState::ErrorPassive));
    assert_eq!(
        health.last_error.as_deref(),
        Some("error warning, error passive")
    );

    // Without F the adapter is served all the same, and the status says it does not know.
    let quiet = FakeAdapter::start(Behaviour {
        status: None,
        ..Behaviour::default()
    });
    let endpoint = CanEndpoint::open(&spec(&quiet.path, ""), &options())
        .await
        .unwrap();
    assert_eq!(endpoint.bus_status().await.unwrap().state, None);
}

#[tokio::test]
async fn malformed_lines_are_counted_and_skipped() {
    let adapter = FakeAdapter::start(Behaviour::default());
    let endpoint = CanEndpoint::open(&spec(&adapter.path, ""), &options())
        .await
        .unwrap();
    let mut frames = endpoint.take_frames().unwrap();
    let mut garbage = Vec::new();
    garbage.extend_from_slice(b"t12\r"); // cut short
    garbage.extend_from_slice(b"hello\r"); // not slcan
    garbage.extend_from_slice(&[b'7'; 5000]); // far too long, then its CR
    garbage.push(b'\r');
    garbage.extend_from_slice(b"t1231\xff\xfe\r"); // not hex
    garbage.extend_from_slice(b"t8001AA\r"); // an id out of range
    garbage.extend_from_slice(b"r1232\r"); // a remote frame: well formed, but it cannot cross
    garbage.extend_from_slice(b"t3212CAFE\r");
    adapter.send(&garbage);
    let f = next_frame(&mut frames).await;
    assert_eq!((f.id, f.data()), (std_id(0x321), &[0xca, 0xfe][..]));
    let stats = endpoint.stats();
    assert_eq!(
        (stats.malformed, stats.unsupported, stats.frames_in),
        (5, 1, 1)
    );
    assert!(!endpoint.is_closed());
}

#[tokio::test]
async fn a_full_receive_queue_drops_and_counts() {
    let adapter = FakeAdapter::start(Behaviour::default());
    let endpoint = CanEndpoint::open(
        &spec(&adapter.path, ""),
        &EndpointOptions {
            frame_queue: 4,
            ..options()
        },
    )
    .await
    .unwrap();
    let mut frames = endpoint.take_frames().unwrap();
    let burst: String = (0..10).map(|i| format!("t1001{i:02X}\r")).collect();
    adapter.send(burst.as_bytes());
    let deadline = tokio::time::Instant::now() + WAIT;
    while endpoint.stats().frames_in < 10 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(endpoint.stats().frames_dropped, 6);
    assert_eq!(next_frame(&mut frames).await.data(), [0]);
}

#[tokio::test]
async fn the_first_canable_firmware_is_served_too() {
    let mut adapter = FakeAdapter::start(Behaviour {
        canable1: true,
        ..Behaviour::default()
    });
    let endpoint = CanEndpoint::open(&spec(&adapter.path, "@250k"), &options())
        .await
        .unwrap();
    adapter.expect(&["C", "V", "S5", "O", "F"]).await;
    assert_eq!(
        endpoint.info().version.as_deref(),
        Some("d3adb33 github.com/normaldotcom/canable-fw.git")
    );
    assert_eq!(endpoint.health().state, None, "no F: the status is unknown");

    // Frames are acknowledged with a lone CR, which is no refusal.
    let mut frames = endpoint.take_frames().unwrap();
    endpoint
        .send_frames(&[Frame::classic(std_id(0x7df), &[2, 1, 0]).unwrap()])
        .await
        .unwrap();
    adapter.expect(&["t7DF3020100"]).await;
    adapter.send(b"t7E83034100\r");
    assert_eq!(next_frame(&mut frames).await.id, std_id(0x7e8));

    // Listen-only through M1, since this firmware has no L; and back with M0.
    let config = |mode| CanSettings::derived(250_000, 875, mode);
    endpoint
        .configure(&config(CanMode::ListenOnly))
        .await
        .unwrap();
    adapter.expect(&["C", "S5", "L", "M1", "O"]).await;
    endpoint.configure(&config(CanMode::Normal)).await.unwrap();
    adapter.expect(&["C", "S5", "M0", "O"]).await;
    let stats = endpoint.stats();
    assert_eq!(
        (stats.frames_out_lost, stats.malformed),
        (0, 0),
        "{stats:?}"
    );

    // Timestamps are refused clearly by an adapter that keeps none.
    drop(endpoint);
    let other = FakeAdapter::start(Behaviour {
        canable1: true,
        ..Behaviour::default()
    });
    let err = CanEndpoint::open(&spec(&other.path, ",timestamps"), &options())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("keeps no timestamps"), "{err}");
}

#[tokio::test]
async fn an_adapter_that_never_answers_fails_to_open_with_a_clear_error() {
    let mut adapter = FakeAdapter::start(Behaviour {
        silent: true,
        ..Behaviour::default()
    });
    let started = tokio::time::Instant::now();
    let err = CanEndpoint::open(&spec(&adapter.path, ""), &options())
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::NotSlcan { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("does not answer as an slcan adapter") && text.contains("did not answer"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(adapter.command().await, "C");
}

#[tokio::test]
async fn a_device_that_speaks_something_else_is_not_slcan() {
    let adapter = FakeAdapter::start(Behaviour {
        babble: Some("AT+OK ready\r"),
        ..Behaviour::default()
    });
    let err = CanEndpoint::open(&spec(&adapter.path, ""), &options())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("does not answer as an slcan adapter") && text.contains("\"AT+OK ready\""),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_port_is_a_clear_error() {
    let err = CanEndpoint::open(&spec(Path::new("/dev/does-not-exist"), ""), &options())
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Serial { .. }), "{err}");
}

/// Points `link` at `target`, replacing what it pointed at.
fn relink(link: &Path, target: &Path) {
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test]
async fn the_set_serves_an_adapter_again_after_it_is_plugged_back_in() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("agent"));
    let link = dir.path().join("ttyCANable");
    let adapter = Arc::new(Mutex::new(Some(FakeAdapter::start(Behaviour::default()))));
    relink(&link, &adapter.lock().unwrap().as_ref().unwrap().path);
    let store = EndpointStore::new(&home);
    store.add(&spec(&link, "@500k")).unwrap();
    let agent = uuid::Uuid::new_v4();
    let set = EndpointSet::start_with(
        store,
        agent,
        SetOptions {
            endpoint: options(),
            reload_every: Duration::from_millis(100),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
        },
    );
    let mut events = set.events();
    let expected_id =
        bridge_agent::endpoints::local_device_id(agent, &format!("slcan:{}", link.display()));
    let appeared = |e: EndpointEvent| match e {
        EndpointEvent::Appeared { device_id, .. } => device_id,
        other => panic!("expected the endpoint to appear, got {other:?}"),
    };
    // The set may have opened it before this test subscribed.
    if set.endpoint(&expected_id).is_none() {
        let e = timeout(WAIT, events.recv()).await.unwrap().unwrap();
        assert_eq!(appeared(e), expected_id);
    }
    let listed = set.list();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].present());

    // Unplugged: the endpoint goes, and the set keeps trying.
    adapter.lock().unwrap().take();
    match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
        EndpointEvent::Gone { device_id } => assert_eq!(device_id, expected_id),
        other => panic!("{other:?}"),
    }
    assert!(!set.list()[0].present());

    // Plugged back in (a new terminal behind the same name): served again, same device id.
    let again = FakeAdapter::start(Behaviour::default());
    relink(&link, &again.path);
    let e = timeout(WAIT, events.recv()).await.unwrap().unwrap();
    assert_eq!(appeared(e), expected_id);
    let endpoint = set.endpoint(&expected_id).unwrap();
    let mut frames = endpoint.take_frames().unwrap();
    again.send(b"t1230\r");
    assert_eq!(next_frame(&mut frames).await.id, std_id(0x123));

    // A configuration the adapter took is kept in endpoints.json, under the same identity.
    let effective = set
        .configure(
            &expected_id,
            &CanSettings::derived(125_000, 875, CanMode::Normal),
        )
        .await
        .unwrap();
    assert_eq!(effective.bitrate, 125_000);
    assert_eq!(
        EndpointStore::new(&home).load().unwrap(),
        vec![spec(&link, "@125000")]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        set.endpoint(&expected_id)
            .is_some_and(|e| std::ptr::eq(&*e, &*endpoint)),
        "keeping the configuration must not reopen the endpoint"
    );

    // Removed from the file: the set lets it go.
    EndpointStore::new(&home).remove(&spec(&link, "")).unwrap();
    match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
        EndpointEvent::Gone { device_id } => assert_eq!(device_id, expected_id),
        other => panic!("{other:?}"),
    }
    assert!(set.list().is_empty());
    drop(again);
}

/// An slcan adapter served by the agent daemon is a dongle of the user's: the server's CAN
/// configuration reaches the adapter as its S and O/L commands and its effective values are stored,
/// a bitrate slcan cannot set is refused with the list it can, and a frame sent by hand goes out as a
/// `t` line.
#[sqlx::test(migrator = "bridge_server::db::MIGRATOR")]
async fn the_agent_serves_an_adapter_that_the_server_configures(pool: sqlx::PgPool) {
    use reqwest::{Method, StatusCode};
    use serde_json::json;

    let mut adapter = FakeAdapter::start(Behaviour::default());
    let server = common::Server::start(pool).await;
    let user = server
        .user("alice@example.com", bridge_server::users::Role::User)
        .await;
    let mut agent = common::Agent::new();
    agent.login(&server, &user).await;
    let spec = format!("slcan:{}@500000", adapter.path.display());
    let (added, out, err) = agent.exec(&["endpoint", "add", &spec], None).await;
    assert!(added, "{out}{err}");
    agent.run(&["--usb-id".into(), "ffff:ffff".into()]);
    adapter.expect(&["C", "V", "S6", "O", "F"]).await;
    let identity = format!("slcan:{}", adapter.path.display());
    let local = control_proto::local_device_id(agent.agent_id(), &identity).to_string();
    let view = user
        .wait_dongle(&local, "served as a local dongle", |d| {
            d.is_some_and(|d| d["online"] == true && d["owned"] == true)
        })
        .await
        .unwrap();
    assert_eq!(view["transport"]["can_set_timing"], true, "{view}");
    let id = view["id"].as_str().unwrap().to_string();

    let (status, body) = user
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(json!({"bitrate": 250000, "sample_point_permille": 875, "mode": "normal"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    adapter.expect(&["C", "S5", "O"]).await;
    let (_, stored) = user.get(&format!("/dongles/{id}/can-config")).await;
    assert_eq!(stored["effective"]["bitrate"], 250000, "{stored}");
    // The new bitrate is kept for the agent's next start.
    let kept = std::fs::read_to_string(agent.path("endpoints.json")).unwrap();
    assert!(kept.contains("@250000"), "{kept}");

    // 33 333 bit/s is no S code: refused with what slcan can do, and nothing reaches the adapter.
    let (status, body) = user
        .call(
            Method::PUT,
            &format!("/dongles/{id}/can-config"),
            Some(json!({"bitrate": 33333, "sample_point_permille": 875, "mode": "normal"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("slcan sets only"), "{body}");

    let (status, body) = user
        .post(
            &format!("/dongles/{id}/can/send"),
            json!({"can_id": 0x123, "is_extended": false, "data_hex": "beef"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(adapter.command().await, "t1232BEEF");
    agent.stop().await;
    server.stop().await;
}
