//! `bench-relay`: CAN frames through the whole bridge, simulator -> agent A -> server -> agent B ->
//! simulator, with the system `bridge-demo` runs (embedded PostgreSQL, the server, simulated dongles on
//! virtual buses, two agents) and up to `--max-groups` groups.
//!
//! Three measurements, one after the other:
//! 1. latency (p50, p99, max) of one group at each of `--rates` (default 1 000 and 9 000 frames/s: a
//!    lightly loaded and a saturated 1 Mbit/s bus);
//! 2. the highest rate one group carries cleanly, searching upward by doubling from `--search-from`
//!    and then halving the last interval twice;
//! 3. how many groups carry 9 000 frames/s each at the same time, trying 1, 2, 4, ... `--max-groups`.
//!
//! With `--soak-minutes M` it runs a soak instead: `--soak-groups` groups at `--group-rate` each for M
//! minutes, in rounds of a minute, with agent B away for 5 s in every third round and started again
//! (stopped as Ctrl-C would in rounds 3, 9, 15, ...; killed as `kill -9` would in rounds 6, 12, ...:
//! its runtime shut down under it), printing each round's loss, latency and the process's memory.
//!
//! A step is clean when every frame arrived once and in order and the p99 latency stayed under
//! `--max-p99-ms`: the relay never loses a frame (past its in-flight limit it buffers them in
//! PostgreSQL and replays them), so "nothing lost" alone would pass any rate the buffer can hold; the
//! latency bound says the system kept up instead of falling behind.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use bridge_bench::flow::{self, FlowResult, Pace, Stream, ms};
use bridge_bench::system::{self, Rig};
use bridge_server::groups::relay::{RelaySettings, RelayStats};
use clap::Parser;
use dongle_sim::BusTap;

/// Relay latency, highest clean rate, and groups held at 9 000 frames/s each.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench-relay", version, about, long_about)]
struct Args {
    /// Rates (frames/s, one direction, one group) at which latency is measured.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000u32, 9_000])]
    rates: Vec<u32>,
    /// Seconds each step sends frames.
    #[arg(long, default_value_t = 3.0)]
    step_secs: f64,
    /// Once a step stops sending, seconds to wait for the rest while nothing arrives.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// A step is clean only if its p99 latency is under this many milliseconds.
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// The rate the upward search starts from (frames/s).
    #[arg(long, default_value_t = 9_000)]
    search_from: u32,
    /// The rate the upward search stops at (frames/s).
    #[arg(long, default_value_t = 200_000)]
    search_max: u32,
    /// The most groups tried at 9 000 frames/s each (also the number of groups set up).
    #[arg(long, default_value_t = 20)]
    max_groups: usize,
    /// Frames per second per group in the groups measurement.
    #[arg(long, default_value_t = 9_000)]
    group_rate: u32,
    /// Skip the upward search for the highest clean rate.
    #[arg(long)]
    skip_search: bool,
    /// Skip the groups measurement (only one group is set up).
    #[arg(long)]
    skip_groups: bool,
    /// Send frames both ways in every step (A -> B and B -> A, each at the step's rate), not A -> B only.
    #[arg(long)]
    both_directions: bool,
    /// Server instances on the one database; agent A talks to the first and agent B to the last, so
    /// that with two or more every group's sides reach different instances.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    instances: u16,
    /// Keep the relay's buffer on NATS JetStream (`serve --nats-url`): a nats-server with JetStream is
    /// started for the run (Debian: apt-get install nats-server).
    #[arg(long)]
    nats: bool,
    /// Run a soak of this many minutes instead of the three measurements: rounds of a minute, agent
    /// B stopped in rounds 3, 9, 15, ... and killed in rounds 6, 12, ... (away 5 s each time).
    #[arg(long)]
    soak_minutes: Option<u32>,
    /// Groups sending at `--group-rate` throughout the soak.
    #[arg(long, default_value_t = 10)]
    soak_groups: usize,
}

/// The server's relay counters at one moment: where frames went.
#[derive(Debug, Clone, Copy)]
struct Relayed {
    buffered: u64,
    accepted: u64,
    forwarded: u64,
    delivered: u64,
    /// The agents' data-plane counters from their status files: A's frames up, B's frames down,
    /// and both agents' drops.
    a_up: u64,
    b_down: u64,
    dropped: u64,
}

/// One agent's data-plane counters, as its `daemon.json` status file shows them.
fn agent_data(agent: &bridge_rig::AgentPart) -> serde_json::Value {
    std::fs::read_to_string(agent.home.dir().join("daemon.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .map(|v| v["data"].clone())
        .unwrap_or_default()
}

impl Relayed {
    /// The counts since `before`: A's frames up, the servers' accepted, forwarded and delivered, B's
    /// frames down, the agents' drops. An agent restarted in between starts its own counts again, so
    /// its part reads from zero then (saturating), and says less.
    fn since(&self, before: &Relayed) -> [u64; 6] {
        [
            self.a_up.saturating_sub(before.a_up),
            self.accepted.saturating_sub(before.accepted),
            self.forwarded.saturating_sub(before.forwarded),
            self.delivered.saturating_sub(before.delivered),
            self.b_down.saturating_sub(before.b_down),
            self.dropped.saturating_sub(before.dropped),
        ]
    }
}

/// Where frames went missing, from the relay's, the agents' and the simulators' own counters.
fn where_lost(c: SimCounters, relayed: [u64; 6]) -> String {
    let [up, accepted, forwarded, delivered, down, dropped] = relayed;
    format!(
        "\n    agent A sent {up} frames up; the server accepted {accepted}, forwarded {forwarded}, had {delivered} acknowledged by agent B; agent B handed {down} to dongle B; the agents dropped {dropped}\
         \n    where: dongle A sent {} frames to agent A (lost {} packets to a full host queue); dongle B got {} from agent B, put {} on its bus ({} dropped by its full transmit queue, {} datagrams lost to a full tap, {} frames to a full bus queue); dongle B refused {} packets (replay, authentication, malformed)",
        c.a_to_host,
        c.a_lost_to_host,
        c.b_from_host,
        c.b_to_bus,
        c.b_tx_queue_full,
        c.b_bus_lost_datagrams,
        c.b_bus_queue_full,
        c.b_refused
    )
}

fn relayed(rig: &Rig) -> Relayed {
    let sum = |counter: fn(&RelayStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        rig.servers
            .iter()
            .map(|s| counter(s.state.relay.stats()).load(Ordering::Relaxed))
            .sum()
    };
    let (a, b) = (agent_data(&rig.agent_a), agent_data(&rig.agent_b));
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    Relayed {
        buffered: sum(|s| &s.frames_buffered),
        accepted: sum(|s| &s.frames_accepted),
        forwarded: sum(|s| &s.frames_forwarded),
        delivered: sum(|s| &s.frames_delivered),
        a_up: n(&a["frames_up"]),
        b_down: n(&b["frames_down"]),
        dropped: n(&a["dropped"]) + n(&b["dropped"]),
    }
}

/// CPU time by part of the system over a step: the server instances together, each agent, and the
/// rest of this process (simulators and the benchmark's own traffic; PostgreSQL runs apart).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    servers: Duration,
    agent_a: Duration,
    agent_b: Duration,
    rest: Duration,
}

impl Cpu {
    fn now(rig: &Rig) -> Cpu {
        let parts = system::cpu_by_part(&rig.parts());
        let mut cpu = Cpu::default();
        for (part, time) in parts {
            match part.as_str() {
                system::AGENT_A => cpu.agent_a += time,
                system::AGENT_B => cpu.agent_b += time,
                p if p.starts_with("server-") => cpu.servers += time,
                _ => cpu.rest += time,
            }
        }
        cpu
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            servers: self.servers.saturating_sub(before.servers),
            agent_a: self.agent_a.saturating_sub(before.agent_a),
            agent_b: self.agent_b.saturating_sub(before.agent_b),
            rest: self.rest.saturating_sub(before.rest),
        }
    }

    fn total(self) -> Duration {
        self.servers + self.agent_a + self.agent_b + self.rest
    }
}

/// The simulators' counters that tell where frames were lost: summed over the step's groups.
#[derive(Debug, Clone, Copy, Default)]
struct SimCounters {
    a_to_host: u64,
    a_lost_to_host: u64,
    b_from_host: u64,
    b_to_bus: u64,
    b_bus_lost_datagrams: u64,
    b_bus_queue_full: u64,
    b_tx_queue_full: u64,
    b_refused: u64,
    /// The longest any dongle B's simulator was kept from reading its link, so far (not a count).
    b_read_lag_max: Duration,
}

fn sim_counters(rig: &Rig, groups: usize) -> SimCounters {
    let mut c = SimCounters::default();
    for g in &rig.groups[..groups] {
        let a = g.a.sim.stats();
        let b = g.b.sim.stats();
        c.a_to_host += a.dongle.frames_to_host;
        c.a_lost_to_host += a.dongle.lost_to_host;
        c.b_from_host += b.dongle.frames_from_host;
        c.b_to_bus += b.dongle.frames_to_bus;
        c.b_bus_lost_datagrams += b.bus.lost;
        c.b_bus_queue_full += b.bus.queue_full;
        c.b_tx_queue_full += b.bus.tx_queue_full;
        c.b_refused += b.dongle.replays_refused + b.dongle.auth_failures + b.dongle.malformed;
        c.b_read_lag_max = c.b_read_lag_max.max(b.link.rx_late_max);
    }
    c
}

impl SimCounters {
    fn since(self, before: SimCounters) -> SimCounters {
        SimCounters {
            a_to_host: self.a_to_host - before.a_to_host,
            a_lost_to_host: self.a_lost_to_host - before.a_lost_to_host,
            b_from_host: self.b_from_host - before.b_from_host,
            b_to_bus: self.b_to_bus - before.b_to_bus,
            b_bus_lost_datagrams: self.b_bus_lost_datagrams - before.b_bus_lost_datagrams,
            b_bus_queue_full: self.b_bus_queue_full - before.b_bus_queue_full,
            b_tx_queue_full: self.b_tx_queue_full - before.b_tx_queue_full,
            b_refused: self.b_refused - before.b_refused,
            b_read_lag_max: self.b_read_lag_max,
        }
    }
}

/// One step's outcome over all its streams.
struct Step {
    sims: SimCounters,
    results: Vec<FlowResult>,
    /// Frames the relay could not forward at once and wrote to PostgreSQL instead.
    relayed_buffered: u64,
    /// The relay's and the agents' counters over the step.
    relayed: [u64; 6],
    cpu: Cpu,
    wall: Duration,
    /// Where the frames spent their time, when the step was traced.
    hops: Option<flow::HopTable>,
}

impl Step {
    fn all_latencies(&self) -> Vec<Duration> {
        self.results
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect()
    }

    fn sent(&self) -> u64 {
        self.results.iter().map(|r| r.sent).sum()
    }

    fn lost(&self) -> u64 {
        self.results.iter().map(FlowResult::lost).sum()
    }

    fn faults(&self) -> u64 {
        self.results
            .iter()
            .map(|r| r.lost() + r.duplicates + r.out_of_order)
            .sum()
    }

    fn clean(&self, max_p99: Duration) -> bool {
        self.faults() == 0 && flow::quantile(&self.all_latencies(), 0.99) < max_p99
    }

    /// `cpu` as a share of one core over the step, in percent.
    fn share(&self, cpu: Duration) -> f64 {
        100.0 * cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    fn line(&self, label: &str) -> String {
        let l = self.all_latencies();
        let mut line = format!(
            "{label:<28} sent {:>8}  lost {:>6}  dup {:>3}  reordered {:>3}  p50 {:>8} ms  p99 {:>8} ms  max {:>8} ms  buffered {:>7}  CPU {:>5.0} %",
            self.sent(),
            self.lost(),
            self.results.iter().map(|r| r.duplicates).sum::<u64>(),
            self.results.iter().map(|r| r.out_of_order).sum::<u64>(),
            ms(flow::quantile(&l, 0.5)),
            ms(flow::quantile(&l, 0.99)),
            ms(l.iter().max().copied().unwrap_or_default()),
            self.relayed_buffered,
            self.share(self.cpu.total()),
        );
        // CPU by part, and per relayed frame: what the server and the agents cost apart.
        let frames = self.sent().max(1) as f64;
        let per_frame = |d: Duration| d.as_secs_f64() * 1e6 / frames;
        line.push_str(&format!(
            "\n    CPU: servers {:.0} % ({:.2} us/frame), agent A {:.0} % ({:.2} us/frame), agent B {:.0} % ({:.2} us/frame), simulators and benchmark {:.0} %",
            self.share(self.cpu.servers),
            per_frame(self.cpu.servers),
            self.share(self.cpu.agent_a),
            per_frame(self.cpu.agent_a),
            self.share(self.cpu.agent_b),
            per_frame(self.cpu.agent_b),
            self.share(self.cpu.rest),
        ));
        if self.faults() > 0 {
            line.push_str(&where_lost(self.sims, self.relayed));
        }
        line
    }
}

/// Sends `rate` frames/s through each of the first `groups` groups for the step's time.
async fn step(
    rig: &Rig,
    args: &Args,
    groups: usize,
    rate: u32,
    trace: bool,
) -> anyhow::Result<Step> {
    // A previous step that fell behind may still be replaying: start from a quiet, ACTIVE relay.
    for g in &rig.groups[..groups] {
        rig.wait_state(&g.group_id, rig.relaying_state(), Duration::from_secs(60))
            .await
            .context("the relay did not recover from the previous step")?;
    }
    // Streams 0..groups go A -> B; with both directions, streams groups..2 x groups go B -> A.
    let a_to_b = rig.groups[..groups].iter().map(|g| (&g.a, &g.b));
    let b_to_a = rig.groups[..groups].iter().map(|g| (&g.b, &g.a));
    let directions: Vec<_> = if args.both_directions {
        a_to_b.chain(b_to_a).collect()
    } else {
        a_to_b.collect()
    };
    let mut streams = Vec::with_capacity(directions.len());
    for (from, to) in directions {
        let mut rx = BusTap::join_at(&to.bus_root, &to.bus)?;
        rx.wait_for_peers(1, Duration::from_secs(5)).await;
        streams.push(Stream {
            inject: &from.sim,
            rx,
        });
    }
    // The tap joins the bus by its socket file; the simulator notices it within its refresh interval.
    tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
    let before = relayed(rig);
    let sims_before = sim_counters(rig, groups);
    let cpu = Cpu::now(rig);
    let started = Instant::now();
    let (results, hops) = flow::run(
        streams,
        Pace {
            rate,
            duration: Duration::from_secs_f64(args.step_secs),
            settle: Duration::from_secs_f64(args.settle_secs),
            burst: 64,
        },
        trace,
    )
    .await;
    let after = relayed(rig);
    Ok(Step {
        sims: sim_counters(rig, groups).since(sims_before),
        results,
        relayed_buffered: after.buffered - before.buffered,
        relayed: after.since(&before),
        cpu: Cpu::now(rig).since(cpu),
        wall: started.elapsed(),
        hops,
    })
}

async fn bench(dir: std::path::PathBuf, args: Args) -> anyhow::Result<()> {
    let groups = if args.soak_minutes.is_some() {
        args.soak_groups.max(1)
    } else if args.skip_groups {
        1
    } else {
        args.max_groups.max(1)
    };
    let max_p99 = Duration::from_secs_f64(args.max_p99_ms / 1000.0);
    println!(
        "setting up {groups} group(s): {} simulated dongles, two agents, {} server instance(s)",
        groups * 2,
        args.instances
    );
    let setup = Instant::now();
    let rig = Rig::start_instances(
        &dir,
        groups,
        RelaySettings::default(),
        usize::from(args.instances),
        args.nats,
    )
    .await?;
    println!("set up in {:.1} s", setup.elapsed().as_secs_f64());
    let mut rig = rig;
    let outcome = match args.soak_minutes {
        Some(minutes) => soak(&mut rig, &args, minutes).await,
        None => measure(&rig, &args, groups, max_p99).await,
    };
    rig.stop().await;
    outcome
}

async fn measure(rig: &Rig, args: &Args, groups: usize, max_p99: Duration) -> anyhow::Result<()> {
    let direction = if args.both_directions {
        "both directions (A -> B and B -> A, each at the rate)"
    } else {
        "one direction (A -> B)"
    };
    println!("\n1. latency, one group, {direction}");
    for &rate in &args.rates {
        let s = step(rig, args, 1, rate, true).await?;
        println!("{}", s.line(&format!("{rate} frames/s")));
        if let Some(table) = &s.hops {
            print!("{}", table.render());
        }
    }

    if !args.skip_search {
        println!(
            "\n2. highest clean rate of one group (nothing lost, p99 under {} ms)",
            args.max_p99_ms
        );
        let mut good: Option<u32> = None;
        let mut bad: Option<u32> = None;
        let mut rate = args.search_from.max(1);
        while rate <= args.search_max {
            let s = step(rig, args, 1, rate, false).await?;
            let clean = s.clean(max_p99);
            println!(
                "{} {}",
                s.line(&format!("{rate} frames/s")),
                if clean { "clean" } else { "NOT clean" }
            );
            if clean {
                good = Some(rate);
                // The last step is the ceiling itself when doubling would overshoot it.
                rate = if rate < args.search_max {
                    rate.saturating_mul(2).min(args.search_max)
                } else {
                    rate.saturating_mul(2)
                };
            } else {
                bad = Some(rate);
                break;
            }
        }
        // Two halvings of the interval between the last clean rate and the first that was not.
        if let (Some(mut lo), Some(mut hi)) = (good, bad) {
            for _ in 0..2 {
                let mid = lo + (hi - lo) / 2;
                let s = step(rig, args, 1, mid, false).await?;
                let clean = s.clean(max_p99);
                println!(
                    "{} {}",
                    s.line(&format!("{mid} frames/s")),
                    if clean { "clean" } else { "NOT clean" }
                );
                if clean {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            good = Some(lo);
        }
        match good {
            Some(r) => println!("highest clean rate found: {r} frames/s"),
            None => println!("no clean rate at or above {} frames/s", args.search_from),
        }
    }

    if !args.skip_groups {
        println!(
            "\n3. groups at {} frames/s each, {direction}, all at once",
            args.group_rate
        );
        let mut n = 1usize;
        let mut held = 0usize;
        loop {
            let s = step(rig, args, n, args.group_rate, false).await?;
            let clean = s.clean(max_p99);
            println!(
                "{} {}",
                s.line(&format!(
                    "{n} group(s), {} frames/s",
                    n as u64 * u64::from(args.group_rate)
                )),
                if clean { "clean" } else { "NOT clean" }
            );
            if !clean {
                break;
            }
            held = n;
            if n >= groups {
                break;
            }
            n = (n * 2).min(groups);
        }
        println!("groups held at {} frames/s each: {held}", args.group_rate);
    }
    Ok(())
}

/// This process's resident memory in MiB (the server, the agents and the simulators all run in it).
fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Every group at `--group-rate` for `minutes`, a minute a round; agent B is away for 5 s in every
/// third round. A round waits for its last frame (or 2 minutes) before the next begins, so that no
/// round's frames are counted in another's.
async fn soak(rig: &mut Rig, args: &Args, minutes: u32) -> anyhow::Result<()> {
    const ROUND: Duration = Duration::from_secs(60);
    const AWAY: Duration = Duration::from_secs(5);
    let rate = args.group_rate;
    let per_round = (f64::from(rate) * ROUND.as_secs_f64()) as usize;
    let away_from = per_round / 3;
    let away_to = away_from + (f64::from(rate) * AWAY.as_secs_f64()) as usize;
    println!(
        "\nsoak: {} groups at {rate} frames/s each (A -> B) for {minutes} minutes; agent B away for {} s in every third round, stopped as Ctrl-C stops it and every other time killed as kill -9 ends it",
        rig.groups.len(),
        AWAY.as_secs()
    );
    let rss_start = rss_mib();
    let mut total = FlowResult::default();
    // The worst p99 of the rounds without a restart, and of those with one (frames wait in the buffer
    // while B is away). Every round's latencies are dropped after its line: 30 minutes of them would
    // take gigabytes.
    let (mut worst_steady, mut worst_restart) = (Duration::ZERO, Duration::ZERO);
    for round in 0..minutes {
        for g in &rig.groups {
            rig.wait_state(&g.group_id, rig.relaying_state(), Duration::from_secs(120))
                .await
                .context("the relay did not recover from the previous round")?;
        }
        // A tag per round and group, so that nothing of another round is counted in this one.
        let trackers: Vec<flow::Tracker> = rig
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let tag = ((round as usize * rig.groups.len() + i) % 250) as u8;
                let rx = BusTap::join_at(&g.b.bus_root, &g.b.bus)?;
                Ok(flow::Tracker::start(rx, tag, per_round))
            })
            .collect::<anyhow::Result<_>>()?;
        tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
        let cpu = Cpu::now(rig);
        let sims = sim_counters(rig, rig.groups.len());
        let relayed_before = relayed(rig);
        let inject = |seqs: std::ops::Range<usize>| {
            futures::future::join_all(
                trackers
                    .iter()
                    .zip(&rig.groups)
                    .map(move |(t, g)| t.inject(&g.a.sim, seqs.clone(), rate)),
            )
        };
        // Every third round agent B goes away for a while: stopped as Ctrl-C stops it, and every
        // other time killed as `kill -9` ends it.
        let restart = round % 3 == 2;
        let kill = restart && (round / 3) % 2 == 1;
        if restart {
            inject(0..away_from).await;
            if kill {
                // As `kill -9` ends its process: its runtime shut down under it.
                let fresh = rig.runtimes.kill_and_renew(system::AGENT_B)?;
                rig.agent_b.killed();
                rig.agent_b.run_on(fresh);
            } else {
                rig.agent_b.stop().await.context("stopping agent B")?;
            }
            inject(away_from..away_to).await;
            rig.agent_b.start();
            inject(away_to..per_round).await;
        } else {
            inject(0..per_round).await;
        }
        let mut round_result = FlowResult::default();
        for t in trackers {
            let r = t
                .finish(Duration::from_secs(5), Duration::from_secs(120))
                .await;
            round_result.sent += r.sent;
            round_result.delivered += r.delivered;
            round_result.duplicates += r.duplicates;
            round_result.out_of_order += r.out_of_order;
            round_result.latencies.extend(r.latencies);
        }
        let cpu = Cpu::now(rig).since(cpu);
        let sims = sim_counters(rig, rig.groups.len()).since(sims);
        println!(
            "round {:>2}{} sent {:>8} lost {:>3} dup {:>2} reordered {:>2} p50 {:>7} ms p99 {:>8} ms max {:>8} ms  CPU servers {:.2} s agents {:.2} s  RSS {} MiB  B's transmit queues dropped {} (simulators kept from reading up to {} ms so far)",
            round + 1,
            match (restart, kill) {
                (true, true) => " (B killed)   ",
                (true, false) => " (B restarted)",
                _ => "              ",
            },
            round_result.sent,
            round_result.lost(),
            round_result.duplicates,
            round_result.out_of_order,
            ms(round_result.quantile(0.5)),
            ms(round_result.quantile(0.99)),
            ms(round_result
                .latencies
                .iter()
                .max()
                .copied()
                .unwrap_or_default()),
            cpu.servers.as_secs_f64(),
            (cpu.agent_a + cpu.agent_b).as_secs_f64(),
            rss_mib(),
            sims.b_tx_queue_full,
            ms(sims.b_read_lag_max),
        );
        if round_result.lost() + round_result.duplicates + round_result.out_of_order > 0 {
            println!(
                "{}",
                where_lost(sims, relayed(rig).since(&relayed_before)).trim_start()
            );
        }
        total.sent += round_result.sent;
        total.delivered += round_result.delivered;
        total.duplicates += round_result.duplicates;
        total.out_of_order += round_result.out_of_order;
        let worst = if restart {
            &mut worst_restart
        } else {
            &mut worst_steady
        };
        *worst = (*worst).max(round_result.quantile(0.99));
    }
    println!(
        "soak: sent {} lost {} dup {} reordered {}; worst p99 of a round {} ms without a restart, {} ms with one; RSS {} MiB at the start, {} MiB at the end (the benchmark's own buffers included)",
        total.sent,
        total.lost(),
        total.duplicates,
        total.out_of_order,
        ms(worst_steady),
        ms(worst_restart),
        rss_start,
        rss_mib()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bridge_bench::run_in_temp_dir("bench-relay", |dir| bench(dir, args))
}
