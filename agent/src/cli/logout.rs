//! `bridge-agent logout`: revokes the agent's token on the server (when it can be reached), then forgets
//! the server credentials, the dongle tokens and the command journal of this workstation.

use anyhow::{Context, bail};
use clap::Args;

use std::time::Duration;

use crate::daemon::read_status;
use crate::home::Home;
use crate::journal::Journal;
use crate::uplink::api::Api;

/// How long logout waits for the server before forgetting the token anyway.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    // The token is revoked first: a copy of the credentials file (a backup, a disk image) must not
    // outlive the logout. A server that cannot be reached does not keep the workstation logged in.
    let revoked = revoke(&creds).await;
    for dir in [home.vault_dir(), home.journal_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("could not delete {}", dir.display())),
        }
    }
    home.remove_credentials()?;
    match revoked {
        Ok(()) => println!(
            "Logged out: the server revoked agent {}'s token, and its token, dongle tokens and command \
             journal are deleted here.",
            creds.agent_id
        ),
        Err(reason) => println!(
            "Logged out: the agent's token, its dongle tokens and its command journal are deleted.\n\
             The server could not revoke the token ({reason}); revoke agent {} on the dashboard's agents \
             page (or with DELETE {}/api/v1/agents/{}/tokens) so its token can never be used again.",
            creds.agent_id, creds.server_url, creds.agent_id
        ),
    }
    Ok(())
}

/// Asks the server to revoke the agent's own token. A token the server no longer accepts counts as
/// revoked.
async fn revoke(creds: &crate::home::Credentials) -> Result<(), String> {
    let api = Api::new(&creds.server_url, creds.ca_file.as_deref())
        .map_err(|e| e.to_string())?
        .with_agent_token(&creds.agent_token);
    match tokio::time::timeout(REVOKE_TIMEOUT, api.revoke_own_token()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.code() == Some("AUTH_REQUIRED") => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer from {} within {} s",
            creds.server_url,
            REVOKE_TIMEOUT.as_secs()
        )),
    }
}
