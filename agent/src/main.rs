//! `bridge-agent`: the command line. Each subcommand is a thin shell over the library.

use clap::{Parser, Subcommand};

use bridge_agent::cli;

/// The workstation agent of the remote CAN bridge.
///
/// It finds CAN dongles on USB serial and on the LAN, speaks the dongle protocol to them, and bridges
/// them to the server.
#[derive(Parser)]
#[command(name = "bridge-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the dongles this workstation sees, on USB serial and on the LAN.
    List(cli::list::ListArgs),
    /// Work with captured dongle packets.
    Proto {
        #[command(subcommand)]
        command: ProtoCommand,
    },
}

#[derive(Subcommand)]
enum ProtoCommand {
    /// Print a captured packet field by field: a raw Discovery or REMP packet (a UDP payload) or a
    /// COBS-framed packet from a serial capture. Tokens are never printed.
    Decode {
        /// The packet as hex; spaces, colons and 0x prefixes are fine.
        #[arg(required = true, num_args = 1..)]
        hex: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_AGENT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::List(args) => cli::list::run(args).await,
        Command::Proto {
            command: ProtoCommand::Decode { hex },
        } => {
            let bytes = cli::proto_decode::parse_hex(&hex.join(" "))?;
            print!("{}", cli::proto_decode::describe(&bytes)?);
            Ok(())
        }
    }
}
