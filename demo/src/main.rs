//! `bridge-demo`: runs the whole system on this machine and shows it working. See the library's
//! documentation for what it does, step by step.

use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use clap::Parser;

/// Runs the whole remote CAN bridge on this machine: the server on an embedded PostgreSQL, two
/// simulated dongles on two virtual CAN buses (one on a pseudo-terminal, one on UDP), two agents; pairs,
/// configures and groups the dongles, and sends frames both ways, also while one side is away.
///
/// Needs only PostgreSQL's server binaries (initdb, pg_ctl). Everything it starts is stopped and every
/// temporary file removed when it ends, fails or is interrupted with Ctrl-C.
#[derive(Parser)]
#[command(name = "bridge-demo", version, about, long_about)]
struct Args {
    /// Frames per direction in the live phase, and towards the absent side in the buffering phase.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    frames: u32,
    /// Frames per second per direction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    rate: u32,
    /// Leave the system up at the end and print the URL and the credentials to try the API by hand
    /// (until Ctrl-C).
    #[arg(long)]
    keep_running: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_DEMO_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("bridge-demo-")
        .tempdir()
        .context("could not make a temporary folder")?;
    // As root, PostgreSQL runs as the postgres user, which must reach its data folder in here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let options = bridge_demo::Options {
        frames: args.frames,
        rate: args.rate,
        progress: true,
    };
    eprintln!("bridge-demo: everything runs in {}", dir.path().display());
    let outcome = tokio::select! {
        outcome = bridge_demo::run(dir.path(), &options) => outcome,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the half-built system stops its parts: PostgreSQL on Drop, tasks with the runtime.
            eprintln!("\ninterrupted: stopping everything");
            std::process::exit(130);
        }
    };
    let (summary, running) = outcome?;
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
        let _ = tokio::signal::ctrl_c().await;
    }
    running.stop().await;
    if !summary.ok() {
        anyhow::bail!("frames were lost, repeated or reordered");
    }
    Ok(())
}
