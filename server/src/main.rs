//! `bridge-server`: the command line. Each subcommand is a thin shell over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The remote CAN bridge server.
///
/// It keeps accounts, pairs dongles, configures them, runs commands on them and relays CAN frames
/// between grouped dongles. All state lives in PostgreSQL.
#[derive(Parser)]
#[command(name = "bridge-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the database migrations embedded in this binary. Running it twice is a no-op.
    Migrate {
        /// The PostgreSQL database to migrate.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Migrate { database_url } => {
            let pool = bridge_server::db::connect(&database_url, 2).await?;
            let applied = bridge_server::db::migrate(&pool)
                .await
                .context("migrate failed")?;
            if applied.is_empty() {
                println!("the database is up to date: no migration to apply");
            } else {
                for m in &applied {
                    println!("applied {:04} {}", m.version, m.description);
                }
                println!("{} migration(s) applied", applied.len());
            }
        }
    }
    Ok(())
}
