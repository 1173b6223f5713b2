//! `bench-firmware`: the reference firmware on QEMU's emulated STM32F405. It boots the board, pairs
//! and authenticates through the agent's session (the code `bridge-agent run` uses), puts the board in
//! loopback mode and sends frames as fast as the link takes them, then counts the echoes. Figures:
//! frames/s the board sustains over its emulated UART (each frame crosses it twice), with plain REMP v1
//! and with the batch extension, and the firmware's flash and RAM use.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bridge_agent::session::{DongleSession, Frame, SessionConfig};
use bridge_agent::transport::serial;
use bridge_bench::machine;
use clap::Parser;
use firmware_proto::ids::{CanId, CorrelationId, DongleToken};
use firmware_proto::remp::{CanConfig, CanMode, ConfigAction, ConfigStatus, PairingStatus};
use qemu_dongle::{Options, QemuConfig, QemuDongle};

/// Frames per second through the QEMU board's emulated serial link, and its flash and RAM use.
#[derive(Parser)]
#[command(name = "bench-firmware", version, about)]
struct Args {
    /// Frames sent (and echoed) per run.
    #[arg(long, default_value_t = 5_000)]
    frames: u32,
    /// Frames per send call (one batch packet with the batch extension).
    #[arg(long, default_value_t = 50)]
    chunk: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = QemuConfig::find().map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("machine: {}", machine());
    println!("firmware: {}", config.elf.display());
    print_sizes(&config.elf)?;
    for extensions in ["none", "all"] {
        let (rate, wall) = run(&config, extensions, &args).await?;
        println!(
            "loopback, extensions {extensions:<4}: {} frames echoed in {:.2} s: {rate:>8.0} frames/s",
            args.frames,
            wall.as_secs_f64()
        );
    }
    Ok(())
}

/// The flash and static RAM of both boards' images (the H753's when it is built beside the QEMU one).
fn print_sizes(elf: &std::path::Path) -> anyhow::Result<()> {
    let h753 = elf.with_file_name("dongle-h753");
    for (board, path) in [("QEMU netduinoplus2", elf), ("STM32H753", h753.as_path())] {
        if !path.is_file() {
            println!("size, {board}: {} is not built", path.display());
            continue;
        }
        let size = qemu_dongle::image::size(path)?;
        println!(
            "size, {board}: flash {} bytes ({:.1} KiB), static RAM {} bytes ({:.1} KiB: every buffer is a static or in the embassy task)",
            size.flash,
            size.flash as f64 / 1024.0,
            size.ram,
            size.ram as f64 / 1024.0
        );
    }
    Ok(())
}

async fn run(
    config: &QemuConfig,
    extensions: &str,
    args: &Args,
) -> anyhow::Result<(f64, Duration)> {
    let board = QemuDongle::start(
        config,
        &Options {
            extensions: extensions.into(),
            ..Options::default()
        },
    )
    .await?;
    let mut console = board.console_lines();
    let session = DongleSession::open(
        serial::open(board.serial_path()).await?,
        SessionConfig {
            request_timeout: Duration::from_secs(3),
            ..SessionConfig::default()
        },
    )
    .await?;
    let ack = session.pairing_start(CorrelationId([1; 16])).await?;
    ensure!(
        ack.status == PairingStatus::Ok,
        "pairing start: {:?}",
        ack.status
    );
    let nonce = ack.pairing_nonce.context("a pairing nonce")?;
    let pin = qemu_dongle::next_pin(&mut console, Duration::from_secs(5)).await?;
    // A benchmark's own board, fresh at every start: a fixed token is as good as any.
    let token = DongleToken::from_bytes([0x5a; 32]);
    let ack = session
        .pairing_submit(CorrelationId([2; 16]), pin, nonce, token)
        .await?;
    ensure!(
        ack.status == PairingStatus::Ok,
        "pairing submit: {:?}",
        ack.status
    );
    session.authenticate(token).await?;
    let applied = session
        .can_config_set(CanConfig {
            action: ConfigAction::Set,
            bitrate: 500_000,
            sample_point_permille: 875,
            mode: CanMode::Loopback,
            flags: CanConfig::FLAG_AUTO_RETX,
            ..CanConfig::get()
        })
        .await?;
    ensure!(
        applied.status == ConfigStatus::Ok,
        "loopback: {:?}",
        applied.status
    );
    let mut echoes = session.take_frames().context("the frame queue")?;
    let id = CanId::standard(0x123)?;
    let total = args.frames;
    let started = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut next = 0u32;
        while next < total {
            let Ok(Some(frame)) =
                tokio::time::timeout(Duration::from_secs(10), echoes.recv()).await
            else {
                bail!("{next} of {total} frames came back, then nothing for 10 s");
            };
            let n = u32::from_be_bytes(frame.data().try_into().unwrap_or_default());
            ensure!(n == next, "frame {n} came back where {next} was due");
            next += 1;
        }
        Ok(started.elapsed())
    });
    for first in (0..total).step_by(args.chunk as usize) {
        let frames: Vec<Frame> = (first..(first + args.chunk).min(total))
            .filter_map(|n| Frame::classic(id, &n.to_be_bytes()))
            .collect();
        session.send_frames(&frames).await?;
    }
    let wall = receiver.await??;
    board.shutdown().await;
    Ok((f64::from(total) / wall.as_secs_f64(), wall))
}
