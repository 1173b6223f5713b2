//! Shared parts of the benchmark binaries: the machine they ran on, pseudo-terminals, CPU clocks, and
//! the traffic they feed.
//!
//! Every benchmark prints its figures with the machine description first, bounds its own running time,
//! and leaves nothing running. Results go into `docs/BENCHMARKS.md` by hand, with the command that
//! produced them.
//!
//! - [`system`]: the whole system for the relay and buffering benchmarks (from `bridge-demo`'s parts).
//! - [`flow`]: numbered frames through it, with latency, loss and order.
//! - [`server_process`]: `bridge-server serve` as a child process, for the scale benchmark.
//! - [`run_in_temp_dir`]: the frame every system benchmark runs in, which cleans up on success,
//!   failure and Ctrl-C.

pub mod flow;
pub mod server_process;
pub mod system;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use firmware_proto::ext::batch::{BatchWriter, CanRecord};
use firmware_proto::ids::{CanId, DeviceId};
use firmware_proto::remp::{self, Header, MsgType, Packet, Payload};
use firmware_proto::stream;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

/// One line describing the machine: cores, CPU model, load average, rustc.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("machine: {cores} cores, {model}, load average {load} at start, {rustc}")
}

/// The load average over the last minute, five minutes and fifteen minutes, as /proc/loadavg has it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `bench` on a multi-threaded runtime with a fresh temporary folder, and cleans up whatever the
/// outcome: on Ctrl-C or SIGTERM the benchmark's future is dropped (which stops PostgreSQL, simulators and child
/// processes through their `Drop`), then the runtime is shut down (which ends every task it spawned,
/// the agents and the server among them), and only then is the folder removed, so that nothing still
/// writes into it. Prints the machine first and the load average last.
pub fn run_in_temp_dir<F, Fut>(name: &str, bench: F) -> anyhow::Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;

    // Logs of the parts (server, agents, simulators) only when asked for: BENCH_LOG=warn, say.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    println!("{name}: {}", machine());
    println!("load average before: {}", load_average());
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .context("could not make a temporary folder")?;
    // As root, PostgreSQL runs as the postgres user, which must reach its data folder in here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let path = dir.path().to_path_buf();
    let outcome = runtime.block_on(async move {
        // SIGTERM (`kill`, `pkill`, a CI job's timeout) as Ctrl-C: without it the embedded PostgreSQL
        // and the folder outlived the benchmark.
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            outcome = bench(path) => Some(outcome),
            _ = tokio::signal::ctrl_c() => None,
            () = terminate => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    drop(dir);
    println!("load average after: {}", load_average());
    match outcome {
        Some(outcome) => outcome,
        None => anyhow::bail!("interrupted: everything was stopped and removed"),
    }
}

/// The CPU time this thread has used.
pub fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
}

/// The CPU time (user and system) in a `/proc/.../stat` file of a process or a thread, or None when it
/// cannot be read (the process or thread is gone).
pub fn proc_stat_cpu(path: &std::path::Path) -> Option<Duration> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let stat = std::fs::read_to_string(path).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / ticks))
}

/// A raw pseudo-terminal: the master as a file, and the slave's path. Both ends are close-on-exec so
/// that a child process (python-can) does not inherit them.
pub struct Pty {
    pub master: File,
    /// Kept open so the terminal exists until the benchmark is done with it.
    _slave: OwnedFd,
    pub path: PathBuf,
}

impl Pty {
    pub fn open() -> anyhow::Result<Self> {
        let pair = nix::pty::openpty(None, None)?;
        for fd in [&pair.master, &pair.slave] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        }
        let mut termios = tcgetattr(&pair.slave)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &termios)?;
        let path = nix::unistd::ttyname(&pair.slave)?;
        Ok(Self {
            master: File::from(pair.master),
            _slave: pair.slave,
            path,
        })
    }
}

/// The device id of the benchmark's dongle.
pub const DEVICE: DeviceId = DeviceId::from_bytes([0xbe, 0x4c, 0, 0, 0, 0, 0, 1]);

/// Stream-framed CAN_BATCH packets as a dongle sends them: `packets` packets of `per_packet` classic
/// 8-byte frames each. Answers the bytes and the number of frames they hold.
pub fn serial_traffic(packets: usize, per_packet: usize) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let mut batch = vec![0u8; remp::MAX_PAYLOAD_LEN];
    let mut packet = vec![0u8; firmware_proto::MAX_PACKET_LEN];
    let mut frame = vec![0u8; stream::max_frame_len(firmware_proto::MAX_PACKET_LEN)];
    let mut frames = 0;
    for p in 0..packets {
        let mut writer = BatchWriter::new(&mut batch).expect("room for a batch");
        for i in 0..per_packet {
            let n = (p * per_packet + i) as u64;
            writer
                .push(&CanRecord {
                    timestamp_us: n * 110,
                    id: CanId::standard(0x100 + (i as u16 & 0xff)).expect("11 bits"),
                    flags: 0,
                    data: &n.to_be_bytes(),
                })
                .expect("the batch has room");
            frames += 1;
        }
        let len = writer.finish().expect("a batch");
        let parsed =
            firmware_proto::ext::batch::Batch::parse(&batch[..len]).expect("a valid batch");
        let header = Header::new(MsgType::CanBatch, DEVICE, p as u32);
        let n = remp::encode(
            &Packet {
                header,
                payload: Payload::CanBatch(parsed),
            },
            &mut packet,
        )
        .expect("the packet encodes");
        let m = stream::encode_frame(&packet[..n], &mut frame).expect("the frame encodes");
        out.extend_from_slice(&frame[..m]);
    }
    (out, frames)
}

/// The same number of frames as slcan lines (`t1238DEADBEEF00112233\r`), as an slcan adapter sends them.
pub fn slcan_traffic(frames: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(frames as usize * 22);
    for n in 0..frames {
        let id = 0x100 + (n & 0xff);
        out.extend_from_slice(format!("t{id:03X}8").as_bytes());
        for b in n.to_be_bytes() {
            out.extend_from_slice(format!("{b:02X}").as_bytes());
        }
        out.push(b'\r');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_decodes_to_the_frames_it_claims() {
        let (bytes, frames) = serial_traffic(3, 63);
        assert_eq!(frames, 189);
        let mut decoder: Box<stream::StreamDecoder<{ firmware_proto::MAX_FRAME_LEN }>> =
            Box::default();
        let mut count = 0;
        decoder.push(&bytes, |p| {
            let packet = remp::decode(p).unwrap();
            if let Payload::CanBatch(b) = packet.payload {
                count += b.len();
            }
        });
        assert_eq!(count, 189);
        let lines = slcan_traffic(2);
        assert_eq!(lines, b"t10080000000000000000\rt10180000000000000001\r");
    }
}
