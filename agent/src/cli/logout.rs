//! `bridge-agent logout`: forgets the server credentials, the dongle tokens and the command journal of
//! this workstation.

use anyhow::{Context, bail};
use clap::Args;

use crate::daemon::read_status;
use crate::home::Home;
use crate::journal::Journal;

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Log out even though command results still wait for the server (they are lost).
    #[arg(long)]
    pub force: bool,
}

pub async fn run(home: &Home, args: LogoutArgs) -> anyhow::Result<()> {
    let Some(creds) = home.load_credentials()? else {
        println!("Not logged in; nothing to do.");
        return Ok(());
    };
    if let Some((status, true)) = read_status(home) {
        bail!(
            "the agent's daemon runs (pid {}): stop it first, then log out",
            status.pid
        );
    }
    let (running, waiting) = Journal::peek(&home.journal_dir());
    if running + waiting > 0 && !args.force {
        bail!(
            "{} command results have not reached the server yet: run `bridge-agent run` until they \
             are delivered, or pass --force to drop them",
            running + waiting
        );
    }
    for dir in [home.vault_dir(), home.journal_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("could not delete {}", dir.display())),
        }
    }
    home.remove_credentials()?;
    println!(
        "Logged out: the agent's token, its dongle tokens and its command journal are deleted.\n\
         The server still lists agent {}; revoke it on the dashboard's agents page (or with \
         DELETE {}/api/v1/agents/{}/tokens) so its token can never be used again.",
        creds.agent_id, creds.server_url, creds.agent_id
    );
    Ok(())
}
