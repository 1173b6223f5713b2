//! `bridge-demo`: runs the whole system on this machine and shows it working. See the library's
//! documentation for what it does, step by step.

use std::os::unix::fs::PermissionsExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Runs the whole remote CAN bridge on this machine: the server on an embedded PostgreSQL, two
/// simulated dongles on two virtual CAN buses (one on a pseudo-terminal, one on UDP), two agents; pairs,
/// configures and groups the dongles, and sends frames both ways, also while one side is away.
///
/// Needs only PostgreSQL's server binaries (initdb, pg_ctl). Everything it starts is stopped and every
/// temporary file removed when it ends, fails or is interrupted (Ctrl-C, SIGTERM, SIGHUP).
#[derive(Parser)]
#[command(name = "bridge-demo", version, about, long_about)]
struct Args {
    /// Frames per direction in the live phase, and towards the absent side in the buffering phase.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    frames: u32,
    /// Frames per second per direction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
    /// Server instances on the one database (1 or 2). With 2, agent B connects to the second
    /// instance, as a load balancer might send it, and the group relays across instances.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    instances: u8,
    /// Keep the relay's buffer on NATS JetStream (serve --nats-url) instead of PostgreSQL: the demo
    /// starts a nats-server with JetStream (Debian: apt-get install nats-server) next to PostgreSQL.
    #[arg(long)]
    nats: bool,
    /// Leave the system up at the end and print the URL and the credentials to try the API by hand
    /// (until Ctrl-C).
    #[arg(long)]
    keep_running: bool,
}

/// How long the runtime may take to finish its blocking work once the demo is over: a PostgreSQL that
/// was still starting when the demo was interrupted is stopped by that work, and `pg_ctl start` may wait
/// up to 60 s.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(90);

/// The signals that end the demo early.
struct Interruptions {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interruptions {
    /// Listens from now on, so that an interruption at any later point is caught and cleaned up after.
    fn listen() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Resolves at the first of them with the exit status a shell gives for it (128 + its number).
    async fn next(&mut self) -> u8 {
        tokio::select! {
            _ = self.int.recv() => 130,
            _ = self.term.recv() => 143,
            _ = self.hup.recv() => 129,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_DEMO_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bridge-demo: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (status, dir) = runtime.block_on(demo(&args));
    // The parts' tasks (agents, simulators, server) end with the runtime, and a PostgreSQL still
    // starting is stopped by its blocking task: only then does nothing write into the folder any more.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    if let Some(dir) = dir {
        let path = dir.path().to_path_buf();
        if let Err(e) = dir.close() {
            eprintln!(
                "bridge-demo: could not remove {}: {e}; remove it by hand",
                path.display()
            );
        }
    }
    status
}

/// Runs the demo; answers the exit status and the temporary folder, which the caller removes once the
/// runtime has stopped every part.
async fn demo(args: &Args) -> (ExitCode, Option<tempfile::TempDir>) {
    let mut interruptions = match Interruptions::listen() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("bridge-demo: could not listen for Ctrl-C: {e}");
            return (ExitCode::FAILURE, None);
        }
    };
    let dir = match tempfile::Builder::new().prefix("bridge-demo-").tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("bridge-demo: could not make a temporary folder: {e}");
            return (ExitCode::FAILURE, None);
        }
    };
    let outcome = tokio::select! {
        outcome = run(args, dir.path()) => outcome,
        status = interruptions.next() => {
            // The demo's future is dropped by now, and with it every part it had started: PostgreSQL
            // is stopped on Drop, the simulators and agents are told to stop, the rest ends with the
            // runtime.
            eprintln!("\ninterrupted: stopped everything");
            return (ExitCode::from(status), Some(dir));
        }
    };
    let (summary, running) = match outcome {
        Ok(done) => done,
        Err(e) => {
            eprintln!("bridge-demo: {e:#}");
            return (ExitCode::FAILURE, Some(dir));
        }
    };
    print!("{}", summary.render());
    if args.keep_running {
        println!(
            "\nThe system stays up until Ctrl-C:\n  API      {}/api/v1 (OpenAPI at /api/v1/openapi.json)\n  login    {} / {}\n  try      curl -c jar -H 'content-type: application/json' -d '{{\"email\":\"{}\",\"password\":\"{}\"}}' {}/api/v1/auth/login",
            running.server.url(),
            running.email,
            running.password,
            running.email,
            running.password,
            running.server.url()
        );
        for other in &running.server.others {
            println!(
                "  also     {} (another instance on the same database)",
                other.base_url
            );
        }
        // Here Ctrl-C is the expected way out: the system is then stopped in order, as below.
        interruptions.next().await;
    }
    // Agents first, then simulators, then the server; a second interruption cuts this short, and the
    // parts dropped then stop as they do when the demo is interrupted mid-way.
    tokio::select! {
        () = running.stop() => {}
        status = interruptions.next() => return (ExitCode::from(status), Some(dir)),
    }
    if summary.ok() {
        (ExitCode::SUCCESS, Some(dir))
    } else {
        eprintln!("bridge-demo: frames were lost, repeated or reordered");
        (ExitCode::FAILURE, Some(dir))
    }
}

/// Starts the system in `dir` and runs the demo's flow on it; answers the summary and the running
/// system.
async fn run(
    args: &Args,
    dir: &std::path::Path,
) -> anyhow::Result<(bridge_demo::report::Summary, bridge_demo::Running)> {
    // As root, PostgreSQL runs as the postgres user, which must reach its data folder in here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .context("could not open the temporary folder to the postgres user")?;
    let options = bridge_demo::Options {
        frames: args.frames,
        rate: args.rate,
        progress: true,
        instances: usize::from(args.instances),
        nats: args.nats,
    };
    eprintln!("bridge-demo: everything runs in {}", dir.display());
    bridge_demo::run(dir, &options).await
}
