//! The `dongle-sim` command line: a thin shell over the `dongle_sim` library.
//!
//! Standard output carries machine-readable lines only: the link line first (`serial PATH` or
//! `udp ADDR discovery ADDR`), then `device ID`, then one line per notable event (`PIN 123456
//! for device ID`, `unplugged`, `serial PATH` after a replug, `factory-reset`, `uart | ...` lines and
//! `uart exit N reported` after a `cli` command, ...). Logs go to standard error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use dongle_sim::{
    BusTap, Event, Extensions, Faults, Frame, LinkConfig, SimConfig, SimEvent, SimHandle, Simulator,
};
use firmware_proto::ids::DeviceId;
use tokio::io::AsyncBufReadExt;
use tokio::signal::unix::{SignalKind, signal};

/// A software CAN dongle that behaves as the dongle firmware does.
///
/// Serves REMP v1 and Discovery v1 on a pseudo-terminal (USB serial stand-in, COBS-framed) or
/// on UDP, keeps its "flash" in a state file, runs the pairing state machine (the PIN is
/// printed as `PIN 123456 for device ID`), checks CAN timing, runs a few CLI commands, joins a
/// virtual CAN bus shared with other simulators, generates or replays traffic, and injects
/// faults.
///
/// While running, it reads commands from standard input, one per line: unplug, replug,
/// factory-reset, garbage [BYTES], faults [drop=PCT] [corrupt=PCT] [delay=MS] [garbage=on|off],
/// cli COMMAND (typed on the dongle's UART console, reported to its host when claimed), stats, quit.
/// SIGUSR1 unplugs, SIGUSR2 replugs, SIGINT and SIGTERM stop it cleanly.
#[derive(Parser, Debug)]
#[command(
    name = "dongle-sim",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Joins a virtual bus and prints every frame as a candump -L line.
    Tap {
        /// The bus to join.
        #[arg(long)]
        bus: String,
        /// The folder holding the bus folders.
        #[arg(long, env = "DONGLE_SIM_BUS_DIR")]
        bus_dir: Option<PathBuf>,
        /// Exit after this many frames.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Sends frames (candump syntax, e.g. 123#DEADBEEF or 123##1AABB) onto a virtual bus.
    Inject {
        /// The bus to send on.
        #[arg(long)]
        bus: String,
        /// The folder holding the bus folders.
        #[arg(long, env = "DONGLE_SIM_BUS_DIR")]
        bus_dir: Option<PathBuf>,
        /// How long to wait for at least one other member, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
        /// The frames, in order.
        #[arg(required = true)]
        frames: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The state file (the dongle's flash: device id, token, cool-down, CAN configuration).
    #[arg(long, value_name = "FILE", required = true)]
    state: Option<PathBuf>,
    /// The device id (16 hex digits) of a new state file; random if absent.
    #[arg(long, value_name = "HEX")]
    device_id: Option<String>,
    /// Serve on a pseudo-terminal (the default).
    #[arg(long, conflicts_with = "udp")]
    serial: bool,
    /// Serve REMP on UDP at ADDR:PORT (port 0: any free port).
    #[arg(long, value_name = "ADDR:PORT")]
    udp: Option<SocketAddr>,
    /// The UDP discovery port (0: any free port).
    #[arg(long, value_name = "P", default_value_t = firmware_proto::discovery::DEFAULT_PORT, requires = "udp")]
    discovery_port: u16,
    /// A symlink kept pointing at the current pseudo-terminal (it survives unplug/replug).
    #[arg(long, value_name = "PATH", conflicts_with = "udp")]
    link: Option<PathBuf>,
    /// Join this virtual CAN bus.
    #[arg(long, value_name = "NAME")]
    bus: Option<String>,
    /// The folder holding the bus folders.
    #[arg(long, value_name = "DIR", env = "DONGLE_SIM_BUS_DIR")]
    bus_dir: Option<PathBuf>,
    /// Generate RATE frames per second (first 4 data bytes: big-endian sequence counter).
    #[arg(long, value_name = "RATE")]
    generate: Option<f64>,
    /// The identifier of generated frames (candump form: 3 or 8 hex digits).
    #[arg(long, value_name = "ID", default_value = "100")]
    generate_id: String,
    /// Be an FDCAN dongle: announce CAN FD, check FDCAN ranges, generate 64-byte FD frames.
    #[arg(long)]
    fd: bool,
    /// Let frames onto the bus as fast as they come: no transmit queue of 32 frames emptied at the
    /// configured bitrate (and no frames dropped when it is full). For benchmarks of the software
    /// path at rates no real CAN bus carries.
    #[arg(long)]
    unlimited_bus: bool,
    /// Replay a candump -L log with its timing.
    #[arg(long, value_name = "CANDUMP_LOG")]
    replay: Option<PathBuf>,
    /// Replay speed factor (2 = twice as fast).
    #[arg(long, value_name = "X", default_value_t = 1.0)]
    replay_speed: f64,
    /// REMP extensions: none, all, or a list of batch, bus-status, forget, session.
    #[arg(long, value_name = "LIST", default_value = "none")]
    extensions: String,
    /// Send a burst of garbage before every outgoing packet.
    #[arg(long)]
    fault_garbage: bool,
    /// Corrupt this percentage of outgoing packets.
    #[arg(long, value_name = "PCT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fault_corrupt_pct: u8,
    /// Drop this percentage of outgoing packets.
    #[arg(long, value_name = "PCT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fault_drop_pct: u8,
    /// Delay every outgoing packet by this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    fault_delay_ms: u64,
    /// The pairing window in seconds.
    #[arg(long, value_name = "S", default_value_t = 120)]
    pairing_window_s: u64,
    /// The cool-down after five wrong PINs, in seconds.
    #[arg(long, value_name = "S", default_value_t = 300)]
    cooldown_s: u64,
    /// The CLI's command time limit in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    cli_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Tap {
            bus,
            bus_dir,
            count,
        }) => tap(&bus, bus_dir, count).await,
        Some(Command::Inject {
            bus,
            bus_dir,
            wait_ms,
            frames,
        }) => inject(&bus, bus_dir, wait_ms, &frames).await,
        None => run(cli.run).await,
    }
}

fn join(bus: &str, dir: Option<PathBuf>) -> Result<BusTap> {
    let root = dir.unwrap_or_else(dongle_sim::bus::default_root);
    BusTap::join_at(&root, bus).with_context(|| format!("joining bus {bus}"))
}

async fn tap(bus: &str, dir: Option<PathBuf>, count: Option<u64>) -> Result<()> {
    let mut tap = join(bus, dir)?;
    tracing::info!("tapping bus {bus}");
    let mut seen = 0u64;
    let mut stdout = std::io::stdout();
    loop {
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
        let frame = tokio::select! {
            frame = tap.recv() => frame.context("receiving from the bus")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "({}.{:06}) {bus} {frame}",
            now.as_secs(),
            now.subsec_micros()
        );
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(()); // A closed pipe ends the tap quietly.
        }
        seen += 1;
    }
}

async fn inject(bus: &str, dir: Option<PathBuf>, wait_ms: u64, texts: &[String]) -> Result<()> {
    let frames = texts
        .iter()
        .map(|t| t.parse::<Frame>().with_context(|| format!("frame {t:?}")))
        .collect::<Result<Vec<_>>>()?;
    let mut tap = join(bus, dir)?;
    if !tap.wait_for_peers(1, Duration::from_millis(wait_ms)).await {
        bail!(
            "no other member on bus {bus} after {wait_ms} ms: start a simulator or tap with --bus {bus} first"
        );
    }
    let report = tap.send_all(&frames).await;
    eprintln!(
        "sent {} frames on bus {bus}: {} deliveries, {} lost",
        frames.len(),
        report.delivered,
        report.lost
    );
    Ok(())
}

fn config(args: RunArgs) -> Result<SimConfig> {
    let state = args.state.context("--state FILE is required")?;
    let device_id = args
        .device_id
        .map(|s| {
            s.parse::<DeviceId>()
                .map_err(|_| anyhow::anyhow!("--device-id must be 16 hex digits"))
        })
        .transpose()?;
    let link = match args.udp {
        Some(addr) => LinkConfig::Udp {
            addr,
            discovery_port: args.discovery_port,
        },
        None => LinkConfig::Serial { link: args.link },
    };
    let extensions = Extensions::parse(&args.extensions).map_err(anyhow::Error::msg)?;
    let generate_id = format!("{}#", args.generate_id)
        .parse::<Frame>()
        .map(|f| f.id())
        .map_err(|_| {
            anyhow::anyhow!("--generate-id must be 3 hex digits (up to 7FF) or 8 (extended)")
        })?;
    let mut config = match link {
        LinkConfig::Serial { .. } => SimConfig::serial(state),
        LinkConfig::Udp { .. } => SimConfig::udp(state),
    };
    config.link = link;
    config.device_id = device_id;
    config.bus = args.bus;
    config.bus_root = args.bus_dir;
    config.extensions = extensions;
    config.fd = args.fd;
    config.unlimited_bus = args.unlimited_bus;
    config.generate = args.generate;
    config.generate_id = Some(generate_id);
    config.replay = args.replay;
    config.replay_speed = args.replay_speed;
    config.faults = Faults {
        garbage: args.fault_garbage,
        corrupt_pct: args.fault_corrupt_pct,
        drop_pct: args.fault_drop_pct,
        delay: Duration::from_millis(args.fault_delay_ms),
    };
    config.pairing_window = Duration::from_secs(args.pairing_window_s);
    config.cooldown = Duration::from_secs(args.cooldown_s);
    config.cli_timeout = Duration::from_millis(args.cli_timeout_ms);
    Ok(config)
}

async fn run(args: RunArgs) -> Result<()> {
    let _ = args.serial; // Serial is the default; the flag exists for explicit command lines.
    let config = config(args)?;
    let sim = Simulator::start(config)
        .await
        .context("starting the simulator")?;
    let mut events = sim.events();
    // The first Plugged event may arrive after this subscription or before it; the path printed here
    // is remembered so that it is printed once either way.
    let mut printed_serial = sim.serial_path();
    match (sim.serial_path(), sim.udp_addr(), sim.discovery_addr()) {
        (Some(path), _, _) => println!("serial {}", path.display()),
        (None, Some(remp), Some(disc)) => println!("udp {remp} discovery {disc}"),
        _ => bail!("the simulator has no link"),
    }
    println!("device {}", sim.device_id());

    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing SIGUSR2")?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM")?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = usr1.recv() => sim.unplug().await,
            _ = usr2.recv() => { sim.replug().await; }
            event = events.recv() => match event {
                Ok(event) => report(&sim, &event, &mut printed_serial),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!("{n} events not shown"),
                Err(_) => break,
            },
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    if !control(&sim, line.trim()).await {
                        break;
                    }
                }
                // Standard input closed (as under CI): keep running until a signal.
                _ => stdin_open = false,
            },
        }
    }
    sim.shutdown().await;
    Ok(())
}

/// Prints an event: the machine-readable lines on stdout, the rest to the log.
///
/// `printed_serial` is the serial path last printed; a Plugged event for it is not printed again, and
/// an unplug clears it (a replug may get the same pseudo-terminal number back).
fn report(sim: &SimHandle, event: &SimEvent, printed_serial: &mut Option<std::path::PathBuf>) {
    match event {
        // This line stands for the dongle's display; it is the only place the PIN is printed.
        SimEvent::Dongle(Event::Pin { device_id, pin, .. }) => {
            println!("PIN {} for device {device_id}", pin.as_str())
        }
        SimEvent::Plugged {
            serial_path: Some(path),
        } => {
            if printed_serial.as_ref() != Some(path) {
                println!("serial {}", path.display());
                *printed_serial = Some(path.clone());
            }
        }
        SimEvent::Plugged { serial_path: None } => println!("plugged"),
        SimEvent::Unplugged => {
            *printed_serial = None;
            println!("unplugged");
        }
        SimEvent::Dongle(Event::FactoryReset) => println!("factory-reset"),
        // The dongle's UART console: what its user sees after typing a command.
        SimEvent::Dongle(Event::UartAnswered {
            exit_code,
            output,
            reported,
        }) => {
            for line in output.lines() {
                println!("uart | {line}");
            }
            println!(
                "uart exit {exit_code}{}",
                if *reported {
                    " reported"
                } else {
                    " (not reported: unclaimed)"
                }
            );
        }
        SimEvent::Dongle(Event::Paired) => println!("paired device {}", sim.device_id()),
        SimEvent::ReplayFinished {
            frames,
            skipped_remote,
        } => {
            println!("replay-finished frames {frames} skipped-remote {skipped_remote}")
        }
        other => tracing::info!("{other:?}"),
    }
}

/// Carries out one standard-input command; false to quit.
async fn control(sim: &SimHandle, line: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => {}
        ["quit"] | ["exit"] => return false,
        ["unplug"] => sim.unplug().await,
        ["replug"] => {
            sim.replug().await;
        }
        ["factory-reset"] => sim.factory_reset(),
        ["garbage"] => sim.inject_garbage(16),
        ["garbage", n] => match n.parse() {
            Ok(n) => sim.inject_garbage(n),
            Err(_) => eprintln!("usage: garbage [BYTES]"),
        },
        ["faults", settings @ ..] => match parse_faults(sim.faults(), settings) {
            Ok(faults) => sim.set_faults(faults),
            Err(e) => eprintln!("{e}"),
        },
        ["stats"] => println!("stats {:?}", sim.stats()),
        ["cli"] => eprintln!("usage: cli COMMAND LINE (as typed on the dongle's UART console)"),
        ["cli", ..] => sim.uart_command(line.trim_start()["cli".len()..].trim()),
        _ => eprintln!(
            "unknown command {line:?}: unplug, replug, factory-reset, garbage [BYTES], faults [drop=PCT] [corrupt=PCT] [delay=MS] [garbage=on|off], cli COMMAND, stats, quit"
        ),
    }
    true
}

fn parse_faults(mut faults: Faults, settings: &[&str]) -> Result<Faults, String> {
    for setting in settings {
        let bad = || format!("bad fault setting {setting:?}");
        let (key, value) = setting.split_once('=').ok_or_else(bad)?;
        let pct = || {
            value
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(bad)
        };
        match key {
            "drop" => faults.drop_pct = pct()?,
            "corrupt" => faults.corrupt_pct = pct()?,
            "delay" => faults.delay = Duration::from_millis(value.parse().map_err(|_| bad())?),
            "garbage" => faults.garbage = matches!(value, "on" | "1" | "true"),
            _ => return Err(bad()),
        }
    }
    Ok(faults)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fault_settings_parse() {
        let f = parse_faults(Faults::default(), &["drop=10", "delay=5", "garbage=on"]).unwrap();
        assert_eq!(
            (f.drop_pct, f.delay, f.garbage),
            (10, Duration::from_millis(5), true)
        );
        assert!(parse_faults(Faults::default(), &["drop=101"]).is_err());
    }
}
