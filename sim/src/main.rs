use clap::Parser;

/// A software CAN dongle, on a pseudo-terminal or on UDP, that behaves as the firmware does.
#[derive(Parser)]
#[command(name = "dongle-sim", version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
