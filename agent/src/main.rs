use clap::Parser;

/// The workstation agent of the remote CAN bridge.
///
/// It finds dongles on USB serial and on the LAN, speaks the dongle protocol to them and keeps a
/// control and a data connection to the server.
#[derive(Parser)]
#[command(name = "bridge-agent", version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
