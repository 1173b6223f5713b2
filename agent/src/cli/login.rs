//! `bridge-agent login`: logs in as the technician, registers this workstation's agent, and keeps the
//! agent's token (mode 0600) for `run`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::home::{Credentials, Home};
use crate::uplink::api::Api;

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The server's URL, e.g. https://bridge.example.com.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The account's email (asked for when absent).
    #[arg(long, env = "BRIDGE_AGENT_EMAIL")]
    pub email: Option<String>,
    /// A name that tells this agent apart on the dashboard (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// A PEM file of CA certificates to trust for this server (a self-hosted server with its own CA).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Replace the credentials of an earlier login.
    #[arg(long)]
    pub force: bool,
}

fn ask(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("could not read from the terminal")?;
    Ok(line.trim().to_string())
}

pub async fn run(home: &Home, args: LoginArgs) -> anyhow::Result<()> {
    if let Some(existing) = home.load_credentials()?
        && !args.force
    {
        bail!(
            "already logged in to {} as agent {}: run `bridge-agent logout` first, or pass --force",
            existing.server_url,
            existing.agent_id
        );
    }
    if !(args.server.starts_with("http://") || args.server.starts_with("https://")) {
        bail!("--server must start with https:// (or http:// for a local test server)");
    }
    let ca_file = args.ca_file.map(|p| std::path::absolute(&p).unwrap_or(p));
    let mut api = Api::new(&args.server, ca_file.as_deref())?;
    let email = match args.email {
        Some(email) => email,
        None => ask("Email: ")?,
    };
    // A script or a test passes the password through the environment; people type it unseen.
    let password = match std::env::var("BRIDGE_AGENT_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password("Password: ").context(
            "could not read the password from the terminal (or set BRIDGE_AGENT_PASSWORD)",
        )?,
    };
    eprintln!("logging in to {} ...", args.server);
    api.login(&email, &password).await.context("login failed")?;
    let name = args.name.unwrap_or_else(|| {
        gethostname::gethostname()
            .into_string()
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "agent".into())
    });
    let registered = api
        .register_agent(&name)
        .await
        .context("could not register the agent")?;
    // The agent works with its own token from now on; the person's session is not needed.
    if let Err(e) = api.logout().await {
        tracing::debug!(error = %e, "could not end the login session");
    }
    home.save_credentials(&Credentials {
        server_url: args.server.trim_end_matches('/').to_string(),
        agent_id: registered.agent_id,
        agent_token: registered.agent_token,
        ca_file,
    })?;
    println!(
        "Logged in: agent {} ({name}) is registered on {}.\nIts token is in {} (mode 0600). Start the agent with `bridge-agent run`.",
        registered.agent_id,
        args.server,
        home.credentials_path().display()
    );
    Ok(())
}
