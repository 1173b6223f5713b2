//! `bench-serial`: serial ingest. Frames are written as fast as possible into a pseudo-terminal and read
//! three ways in one run: by a raw byte reader (the terminal's own line rate), by the agent's dongle
//! reader (transport + session, as `bridge-agent run` reads a USB dongle), and by python-can's slcan
//! interface (installed with pip into a throwaway virtualenv). Figures: frames/s and CPU per frame.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bridge_agent::session::{DongleInfo, DongleSession, SessionConfig};
use bridge_bench::{DEVICE, Pty, machine, serial_traffic, slcan_traffic, thread_cpu};
use clap::Parser;

/// Serial ingest: the agent's dongle reader against a raw reader and python-can, on a pseudo-terminal.
#[derive(Parser)]
#[command(name = "bench-serial", version, about)]
struct Args {
    /// Frames the agent's reader and the raw reader take in.
    #[arg(long, default_value_t = 2_000_000)]
    frames: u64,
    /// Frames python-can reads (it is slow: 100 000 take it about 15 s).
    #[arg(long, default_value_t = 100_000)]
    python_frames: u64,
    /// Skip python-can (no pip, no network).
    #[arg(long)]
    no_python: bool,
}

/// A result line.
struct Figure {
    what: &'static str,
    frames: u64,
    wall: Duration,
    cpu: Duration,
}

impl Figure {
    fn rate(&self) -> f64 {
        self.frames as f64 / self.wall.as_secs_f64()
    }

    fn cpu_per_frame_ns(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.frames.max(1) as f64
    }

    fn print(&self) {
        println!(
            "{:<34} {:>10} frames  {:>8.2} s  {:>12.0} frames/s  {:>9.0} ns CPU/frame",
            self.what,
            self.frames,
            self.wall.as_secs_f64(),
            self.rate(),
            self.cpu_per_frame_ns()
        );
    }
}

/// Writes `bytes` into the master `times` times from a thread of its own, and drains what the reader
/// writes back so that it never blocks.
fn feed(pty: &Pty, bytes: Vec<u8>, times: u64) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let mut writer = pty.master.try_clone()?;
    let mut drain = pty.master.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = drain.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    Ok(std::thread::spawn(move || {
        for _ in 0..times {
            if writer.write_all(&bytes).is_err() {
                return;
            }
        }
    }))
}

/// The terminal's own rate: a plain reader of the slave, no decoding.
fn raw_reader(bytes: &[u8], frames_per_copy: u64, copies: u64) -> anyhow::Result<Figure> {
    let pty = Pty::open()?;
    let mut slave = std::fs::File::open(&pty.path)?;
    let total = bytes.len() as u64 * copies;
    let writer = feed(&pty, bytes.to_vec(), copies)?;
    let start = Instant::now();
    let cpu = thread_cpu();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = slave.read(&mut buf)?;
        if n == 0 {
            bail!("the terminal closed early");
        }
        got += n as u64;
    }
    let figure = Figure {
        what: "raw byte reader (line rate)",
        frames: frames_per_copy * copies,
        wall: start.elapsed(),
        cpu: thread_cpu() - cpu,
    };
    let _ = writer.join();
    Ok(figure)
}

/// The agent's reader: `transport::serial` + `DongleSession`, on a runtime of its own in this thread,
/// so that the thread's CPU clock counts exactly the agent's work.
fn agent_reader(bytes: &[u8], frames_per_copy: u64, copies: u64) -> anyhow::Result<Figure> {
    let pty = Pty::open()?;
    let total = frames_per_copy * copies;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let path = pty.path.clone();
    let bytes = bytes.to_vec();
    runtime.block_on(async move {
        let link = bridge_agent::transport::serial::open(&path).await?;
        let info = DongleInfo {
            device_id: DEVICE,
            fw_build: "bench".into(),
            udp_port: 0,
            capabilities: firmware_proto::caps::CAN_BATCH,
            proto_ver: 1,
            lan_ip: None,
            pairing_mode: false,
            pairing_nonce: None,
        };
        let config = SessionConfig {
            frame_queue: 65_536,
            ..SessionConfig::default()
        };
        let session = DongleSession::start(link, info, config)?;
        let mut frames = session.take_frames().context("the frame queue")?;
        let writer = feed(&pty, bytes, copies)?;
        let start = Instant::now();
        let cpu = thread_cpu();
        let mut got = 0u64;
        let mut batch = Vec::with_capacity(4096);
        while got < total {
            let n =
                tokio::time::timeout(Duration::from_secs(10), frames.recv_many(&mut batch, 4096))
                    .await
                    .context("frames stopped arriving")?;
            if n == 0 {
                bail!("the session closed after {got} frames");
            }
            got += n as u64;
            batch.clear();
        }
        let figure = Figure {
            what: "bridge-agent dongle reader",
            frames: total,
            wall: start.elapsed(),
            cpu: thread_cpu() - cpu,
        };
        let dropped = session
            .stats()
            .frames_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            println!("  (the session dropped {dropped} frames: the consumer was too slow)");
        }
        let _ = writer.join();
        Ok(figure)
    })
}

const PYTHON_READER: &str = r#"
import json, sys, time, can
channel, count = sys.argv[1], int(sys.argv[2])
bus = can.Bus(interface="slcan", channel=channel, bitrate=500000, sleep_after_open=0)
print("ready", flush=True)
got = 0
first = None
while got < count:
    msg = bus.recv(timeout=10)
    if msg is None:
        break
    if first is None:
        first = (time.perf_counter(), time.process_time())
    got += 1
end = (time.perf_counter(), time.process_time())
bus.shutdown()
print(json.dumps({"frames": got, "wall": end[0] - first[0], "cpu": end[1] - first[1]}), flush=True)
"#;

/// python-can's slcan interface reading the same number of frames from a pseudo-terminal.
fn python_can(frames: u64, venv: &Path) -> anyhow::Result<Figure> {
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!("installing python-can into a throwaway virtualenv ...");
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .status()?
            .success()
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "python-can[serial]"])
                .status()?
                .success();
        if !ok {
            bail!("could not install python-can (needs python3-venv and network access)");
        }
    }
    let script = venv.join("reader.py");
    std::fs::write(&script, PYTHON_READER)?;
    let pty = Pty::open()?;
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .arg(&pty.path)
        .arg(frames.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("python's stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    if line.trim() != "ready" {
        bail!("python-can did not start: {line}");
    }
    // A little more than asked, since python-can may swallow the first line while it configures.
    let writer = feed(&pty, slcan_traffic(frames + 100), 1)?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let _ = child.wait();
    drop(writer);
    let result: serde_json::Value =
        serde_json::from_str(line.trim()).with_context(|| format!("python-can said {line:?}"))?;
    Ok(Figure {
        what: "python-can slcan reader",
        frames: result["frames"].as_u64().unwrap_or(0),
        wall: Duration::from_secs_f64(result["wall"].as_f64().unwrap_or(0.0)),
        cpu: Duration::from_secs_f64(result["cpu"].as_f64().unwrap_or(0.0)),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("{}", machine());
    // 256 packets of 63 frames: a full CAN_BATCH each, as a dongle on a busy bus sends them.
    let (bytes, per_copy) = serial_traffic(256, 63);
    let copies = args.frames.div_ceil(per_copy).max(1);
    println!(
        "traffic: {} frames per copy in {} bytes ({:.1} bytes/frame), {copies} copies",
        per_copy,
        bytes.len(),
        bytes.len() as f64 / per_copy as f64
    );
    let raw = raw_reader(&bytes, per_copy, copies)?;
    raw.print();
    let agent = agent_reader(&bytes, per_copy, copies)?;
    agent.print();
    println!(
        "  the agent reads at {:.0} % of the terminal's line rate",
        agent.rate() / raw.rate() * 100.0
    );
    if !args.no_python {
        let venv = std::env::temp_dir().join("bridge-bench-venv");
        let result = python_can(args.python_frames, &venv);
        let _ = std::fs::remove_dir_all(&venv);
        let python = result?;
        python.print();
        println!(
            "  CPU per frame: python-can {:.0} times the agent's; frames/s: the agent {:.0} times python-can's",
            python.cpu_per_frame_ns() / agent.cpu_per_frame_ns(),
            agent.rate() / python.rate()
        );
    }
    Ok(())
}
