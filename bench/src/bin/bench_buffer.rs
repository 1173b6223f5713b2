//! `bench-buffer`: the relay's degraded mode. With side B's agent stopped, frames from side A are
//! written to PostgreSQL (`relay_buffer`, migration 0006) and acknowledged to agent A only after the
//! commit; when B's agent comes back they are replayed in order at the set rate.
//!
//! Three measurements on one group of the `bridge-demo` system, on a PostgreSQL the benchmark starts
//! itself (initdb's defaults: fsync and synchronous_commit on, so "committed" means on disk):
//! 1. replay: `--replay-frames` frames buffered while B is away, then B's agent starts while
//!    `--live-rate` new frames/s keep coming; the achieved replay rate against the set one
//!    (`--replay-rate`), and whether every frame arrived once and in order;
//! 2. buffering end to end: B away, frames injected into dongle A at `--rate` for `--buffer-secs`;
//!    the rate at which the server commits them to `relay_buffer` (its `relay_frames_buffered_total`
//!    counter, bumped after each commit);
//! 3. the buffer's write path alone: the server's `groups::buffer::append`, the function the relay
//!    calls, in a loop for `--direct-secs` with `--direct-frames` frames per transaction, to tell the
//!    database's share from the simulator's and the agent's.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bridge_bench::flow::{self, Tracker, ms};
use bridge_bench::system::Rig;
use bridge_server::groups::buffer::{self, Append, Retention};
use bridge_server::groups::chunk::Chunk;
use bridge_server::groups::relay::RelaySettings;
use clap::Parser;
use control_proto::data::Side;
use dongle_sim::BusTap;
use firmware_proto::ext::batch::{BatchWriter, CanRecord};
use firmware_proto::ids::CanId;
use serde_json::json;

/// Degraded buffering rate, replay accuracy, and the buffer's write path alone.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench-buffer", version, about, long_about)]
struct Args {
    /// Frames per second injected into dongle A while B is away (measurement 2).
    #[arg(long, default_value_t = 200_000)]
    rate: u32,
    /// Seconds frames are injected in measurement 2.
    #[arg(long, default_value_t = 3.0)]
    buffer_secs: f64,
    /// The server's replay rate (frames/s; SPEC 3.8's default is 5 000).
    #[arg(long, default_value_t = 5_000)]
    replay_rate: u32,
    /// Frames buffered before B comes back (measurement 1): 25 000 take 5 s at 5 000 frames/s.
    #[arg(long, default_value_t = 25_000)]
    replay_frames: usize,
    /// The rate at which the replay backlog is filled (frames/s).
    #[arg(long, default_value_t = 20_000)]
    fill_rate: u32,
    /// New frames per second sent while the backlog replays; they must arrive after it, in order.
    #[arg(long, default_value_t = 1_000)]
    live_rate: u32,
    /// Seconds of new frames sent while the backlog replays.
    #[arg(long, default_value_t = 3.0)]
    live_secs: f64,
    /// Seconds of direct writes in measurement 3 (0 skips it).
    #[arg(long, default_value_t = 3.0)]
    direct_secs: f64,
    /// Frames per transaction in measurement 3 (the relay gathers up to 4 096 per write).
    #[arg(long, default_value_t = 4_096)]
    direct_frames: usize,
}

/// Frames the server has committed to the buffer since it started.
fn committed(rig: &Rig) -> u64 {
    rig.server()
        .state
        .relay
        .stats()
        .frames_buffered
        .load(Ordering::Relaxed)
}

/// Stops agent B and waits until the group shows it. (The rig's fields are borrowed apart, so that
/// a caller may hold one of its dongles meanwhile.)
async fn b_away(rig: &mut Rig) -> anyhow::Result<()> {
    rig.agent_b.stop().await.context("agent B did not stop")?;
    rig.wait_state(&rig.groups[0].group_id, "DEGRADED", Duration::from_secs(20))
        .await
}

/// Rates over the best one-second window of `samples` (time, running total).
fn best_window(samples: &[(Instant, u64)]) -> f64 {
    let mut best = 0.0f64;
    let mut j = 0;
    for i in 0..samples.len() {
        while j < i && samples[i].0.duration_since(samples[j].0) > Duration::from_secs(1) {
            j += 1;
        }
        let span = samples[i].0.duration_since(samples[j].0).as_secs_f64();
        if span >= 0.5 {
            best = best.max((samples[i].1 - samples[j].1) as f64 / span);
        }
    }
    best
}

async fn replay(rig: &mut Rig, args: &Args) -> anyhow::Result<()> {
    println!(
        "\n1. replay: {} frames buffered while B is away, then B back at a set rate of {} frames/s, {} new frames/s meanwhile",
        args.replay_frames, args.replay_rate, args.live_rate
    );
    let live = (f64::from(args.live_rate) * args.live_secs) as usize;
    let total = args.replay_frames + live;
    let mut rx = BusTap::join_at(&rig.groups[0].b.bus_root, &rig.groups[0].b.bus)?;
    rx.wait_for_peers(1, Duration::from_secs(5)).await;
    tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
    let tracker = Tracker::start(rx, 0, total);
    b_away(rig).await?;
    let g = &rig.groups[0];
    let before = committed(rig);
    tracker
        .inject(&g.a.sim, 0..args.replay_frames, args.fill_rate)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed(rig) - before < args.replay_frames as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} frames reached the buffer within 60 s",
                committed(rig) - before,
                args.replay_frames
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_at = tracker.base().elapsed();
    rig.agent_b.start();
    tracker
        .inject(&g.a.sim, args.replay_frames..total, args.live_rate)
        .await;
    let expected = Duration::from_secs_f64(args.replay_frames as f64 / f64::from(args.replay_rate));
    let r = tracker
        .finish(
            Duration::from_secs(5),
            expected * 3 + Duration::from_secs(30),
        )
        .await;
    let arrivals: Vec<Duration> = r.arrived_at[..args.replay_frames]
        .iter()
        .flatten()
        .copied()
        .collect();
    let first = arrivals.iter().min().copied().unwrap_or_default();
    let last = arrivals.iter().max().copied().unwrap_or_default();
    let span = last.saturating_sub(first).as_secs_f64();
    let achieved = if span > 0.0 {
        (arrivals.len().saturating_sub(1)) as f64 / span
    } else {
        0.0
    };
    // The replay's pace second by second, to see whether it holds the set rate evenly.
    let mut per_second = vec![0u64; (span.ceil() as usize).max(1) + 1];
    for a in &arrivals {
        per_second[(a.saturating_sub(first).as_secs_f64()) as usize] += 1;
    }
    let live_latencies: Vec<Duration> = r.latencies.clone();
    println!(
        "B's agent started {:.2} s after the run began; first replayed frame {:.2} s after that",
        back_at.as_secs_f64(),
        first.saturating_sub(back_at).as_secs_f64()
    );
    println!(
        "replayed {} of {} buffered frames in {:.2} s: {:.0} frames/s against a set {} ({:+.1} %)",
        arrivals.len(),
        args.replay_frames,
        span,
        achieved,
        args.replay_rate,
        100.0 * (achieved / f64::from(args.replay_rate) - 1.0)
    );
    println!(
        "frames per whole second of the replay: {:?}",
        &per_second[..per_second.len().saturating_sub(1)]
    );
    println!(
        "all {} frames (backlog and new): delivered {}, lost {}, duplicates {}, out of order {} -> {}",
        r.sent,
        r.delivered,
        r.lost(),
        r.duplicates,
        r.out_of_order,
        if r.clean() {
            "in order, nothing lost"
        } else {
            "NOT clean"
        }
    );
    println!(
        "latency of all frames (injection to B's bus): p50 {} ms, max {} ms",
        ms(flow::quantile(&live_latencies, 0.5)),
        ms(live_latencies.iter().max().copied().unwrap_or_default())
    );
    rig.wait_state(&g.group_id, "ACTIVE", Duration::from_secs(60))
        .await
        .context("the group did not become ACTIVE after the replay")?;
    Ok(())
}

async fn buffering(rig: &mut Rig, args: &Args) -> anyhow::Result<()> {
    println!(
        "\n2. buffering end to end: B away, {} frames/s injected into dongle A for {} s",
        args.rate, args.buffer_secs
    );
    b_away(rig).await?;
    let g = &rig.groups[0];
    let count = (f64::from(args.rate) * args.buffer_secs) as usize;
    let sim_before = g.a.sim.stats();
    let before = committed(rig);
    let start = Instant::now();
    let mut samples = vec![(start, 0u64)];
    let sent_at: Vec<std::sync::atomic::AtomicU64> =
        (0..count).map(|_| Default::default()).collect();
    let inject = flow::inject_paced(&g.a.sim, 1, 0..count, args.rate, 1024, start, &sent_at);
    let sample = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            samples.push((Instant::now(), committed(rig) - before));
        }
    };
    tokio::select! {
        () = inject => {},
        () = sample => {},
    }
    let injected_in = start.elapsed();
    // The rest: until everything is committed, or nothing more is for 5 s.
    let mut quiet_since = Instant::now();
    loop {
        let now = committed(rig) - before;
        if now != samples.last().map_or(0, |s| s.1) {
            quiet_since = Instant::now();
        }
        samples.push((Instant::now(), now));
        if now >= count as u64 || quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = samples.last().map_or(0, |s| s.1);
    let last_change = samples.iter().find(|s| s.1 == total).map_or(start, |s| s.0);
    let first_change = samples.iter().find(|s| s.1 > 0).map_or(start, |s| s.0);
    let sim = g.a.sim.stats();
    println!(
        "injected {count} frames in {:.2} s ({:.0} frames/s); dongle A sent {} frames to its host, lost {} packets to a full host queue",
        injected_in.as_secs_f64(),
        count as f64 / injected_in.as_secs_f64(),
        sim.dongle.frames_to_host - sim_before.dongle.frames_to_host,
        sim.dongle.lost_to_host - sim_before.dongle.lost_to_host,
    );
    println!(
        "committed to relay_buffer: {total} frames, the last {:.2} s after the first injection",
        last_change.duration_since(start).as_secs_f64()
    );
    println!(
        "committed rate: {:.0} frames/s over the whole run, {:.0} frames/s from the first commit to the last, {:.0} frames/s in the best second",
        total as f64 / last_change.duration_since(start).as_secs_f64().max(1e-9),
        total as f64
            / last_change
                .duration_since(first_change)
                .as_secs_f64()
                .max(1e-9),
        best_window(&samples)
    );
    let view = rig.user.get(&format!("/groups/{}", g.group_id)).await?;
    println!(
        "group: state {}, backlog A -> B {}, trimmed {}, agent A reported {} frames dropped",
        view["state"],
        view["backlog"]["a_to_b"],
        view["frames_trimmed"]["a_to_b"],
        view["agent_drops"]["a"]
    );
    Ok(())
}

/// `n` frames as one batch chunk starting at position `seq`, encoded as the agent encodes them.
fn chunk(seq: u64, n: usize) -> anyhow::Result<Chunk> {
    let mut buf = vec![0u8; control_proto::data::MAX_MESSAGE_LEN];
    let mut writer = BatchWriter::new(&mut buf).ok().context("a batch buffer")?;
    for i in 0..n {
        let data = (seq + i as u64).to_be_bytes();
        writer
            .push(&CanRecord {
                timestamp_us: seq + i as u64,
                id: CanId::standard(0x123).ok().context("an id")?,
                flags: 0,
                data: &data,
            })
            .ok()
            .context("the batch has room")?;
    }
    let len = writer.finish().ok().context("a batch")?;
    Ok(Chunk {
        seq,
        count: n as u32,
        batch: buf[..len].to_vec().into(),
    })
}

async fn direct(rig: &Rig, args: &Args) -> anyhow::Result<()> {
    if args.direct_secs <= 0.0 {
        return Ok(());
    }
    println!(
        "\n3. the buffer's write path alone: groups::buffer::append, {} frames per transaction (chunks of 1 024), for {} s",
        args.direct_frames, args.direct_secs
    );
    let g = &rig.groups[0];
    // The group's own relay must not touch these rows: deactivating it ends its pipe.
    rig.user
        .post(&format!("/groups/{}/deactivate", g.group_id), json!({}))
        .await?;
    let group_id: uuid::Uuid = g.group_id.parse()?;
    let pool = rig.server().state.pool.clone();
    let per_row = 1024usize;
    let rows = args.direct_frames.div_ceil(per_row).max(1);
    let retention = Retention {
        max_frames: u64::MAX / 4,
        max_age: Duration::from_secs(3600),
    };
    // Positions far above anything the relay wrote for this direction.
    let mut seq = 1u64 << 40;
    let mut latencies = Vec::new();
    let mut frames = 0u64;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < args.direct_secs {
        let chunks: Vec<Chunk> = (0..rows)
            .map(|i| chunk(seq + (i * per_row) as u64, per_row))
            .collect::<anyhow::Result<_>>()?;
        let began = Instant::now();
        buffer::append(
            &pool,
            Append {
                group_id,
                target: Side::A,
                chunks: &chunks,
                source_next_in: Some(seq + (rows * per_row) as u64),
                retention,
                audit_due: false,
                carried: 0,
            },
        )
        .await
        .context("a direct append failed")?;
        latencies.push(began.elapsed());
        seq += (rows * per_row) as u64;
        frames += (rows * per_row) as u64;
    }
    let wall = start.elapsed().as_secs_f64();
    println!(
        "{} transactions, {frames} frames in {wall:.2} s: {:.0} frames/s, {:.0} rows/s; commit latency p50 {} ms, p99 {} ms",
        latencies.len(),
        frames as f64 / wall,
        (latencies.len() * rows) as f64 / wall,
        ms(flow::quantile(&latencies, 0.5)),
        ms(flow::quantile(&latencies, 0.99)),
    );
    Ok(())
}

async fn bench(dir: std::path::PathBuf, args: Args) -> anyhow::Result<()> {
    let relay = RelaySettings {
        // Nothing may be trimmed while the benchmark fills the buffer: retention would hide the
        // write rate behind deletes.
        buffer_max_frames: 100_000_000,
        replay_rate: args.replay_rate.max(1),
        ..RelaySettings::default()
    };
    println!("PostgreSQL: embedded, started by the benchmark, fsync on (initdb's defaults)");
    let mut rig = Rig::start(&dir, 1, relay).await?;
    let outcome = async {
        replay(&mut rig, &args).await?;
        buffering(&mut rig, &args).await?;
        direct(&rig, &args).await
    }
    .await;
    rig.stop().await;
    outcome
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bridge_bench::run_in_temp_dir("bench-buffer", |dir| bench(dir, args))
}
