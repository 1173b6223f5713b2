//! `bridge-agent`: the command line. Each subcommand is a thin shell over the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use bridge_agent::cli;
use bridge_agent::home::Home;

/// The workstation agent of the remote CAN bridge.
///
/// It finds CAN dongles on USB serial and on the LAN, speaks the dongle protocol to them, and bridges
/// them to the server. Start with `login --server URL`, then `run`; pair a dongle with `pair`.
#[derive(Parser)]
#[command(name = "bridge-agent", version, about, long_about)]
struct Cli {
    /// The folder for the agent's credentials, dongle tokens and command journal
    /// (default: ~/.config/bridge-agent).
    #[arg(long, global = true, env = "BRIDGE_AGENT_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Log in to a server with your account and register this workstation's agent.
    Login(cli::login::LoginArgs),
    /// Run the agent: serve the dongles and keep the connection to the server (until Ctrl-C).
    Run(cli::run::RunArgs),
    /// List the dongles this workstation sees, on USB serial and on the LAN.
    List(cli::list::ListArgs),
    /// Pair a dongle this agent sees to your account: it shows a PIN, you type it.
    Pair(cli::pair::PairArgs),
    /// Show whether the agent is logged in, running and connected, and what it serves.
    Status(cli::status::StatusArgs),
    /// Forget this agent's credentials, dongle tokens and command journal.
    Logout(cli::logout::LogoutArgs),
    /// Local CAN endpoints (SocketCAN, slcan, socketcand) served as dongles of yours.
    Endpoint {
        #[command(subcommand)]
        command: cli::endpoint::EndpointCommand,
    },
    /// Work with captured dongle packets.
    Proto {
        #[command(subcommand)]
        command: ProtoCommand,
    },
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell.
    ///
    /// For example `bridge-agent completions bash > ~/.local/share/bash-completion/completions/bridge-agent`,
    /// or `bridge-agent completions powershell >> $PROFILE` on Windows. The packages install them.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bridge-agent.1 and one per subcommand) into a folder, for packagers.
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        out: PathBuf,
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
    let cli = Cli::parse();
    // The daemon tells what it does by default; the interactive commands speak only when asked.
    let default_filter = match cli.command {
        Command::Run(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIDGE_AGENT_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let home = || Home::resolve(cli.home.clone());
    match cli.command {
        Command::Login(args) => cli::login::run(&home()?, args).await,
        Command::Run(args) => cli::run::run(&home()?, args).await,
        Command::List(args) => cli::list::run(&home()?, args).await,
        Command::Pair(args) => cli::pair::run(&home()?, args).await,
        Command::Status(args) => cli::status::run(&home()?, args).await,
        Command::Logout(args) => cli::logout::run(&home()?, args).await,
        Command::Endpoint { command } => cli::endpoint::run(&home()?, command).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bridge-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("could not create {}", out.display()))?;
            clap_mangen::generate_to(Cli::command(), &out).with_context(|| {
                format!("could not write the manual pages into {}", out.display())
            })?;
            Ok(())
        }
        Command::Proto {
            command: ProtoCommand::Decode { hex },
        } => {
            let bytes = cli::proto_decode::parse_hex(&hex.join(" "))?;
            print!("{}", cli::proto_decode::describe(&bytes)?);
            Ok(())
        }
    }
}
