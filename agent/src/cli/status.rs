//! `bridge-agent status`: is this agent logged in, is its daemon running and connected, what dongles it
//! serves, and what waits for the server.

use std::time::Duration;

use clap::Args;

use crate::daemon::read_status;
use crate::home::Home;
use crate::journal::Journal;
use crate::uplink::api::{Api, ApiError};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Do not ask the server whether it accepts the agent's token.
    #[arg(long)]
    pub offline: bool,
}

pub async fn run(home: &Home, args: StatusArgs) -> anyhow::Result<()> {
    println!("folder:  {}", home.dir().display());
    let Some(creds) = home.load_credentials()? else {
        println!("login:   not logged in (run `bridge-agent login --server URL`)");
        return Ok(());
    };
    println!("server:  {}", creds.server_url);
    println!("agent:   {}", creds.agent_id);
    if !args.offline {
        let api = Api::new(&creds.server_url, creds.ca_file.as_deref())?
            .with_agent_token(&creds.agent_token);
        let answer = tokio::time::timeout(Duration::from_secs(5), api.dongles()).await;
        let verdict = match answer {
            Ok(Ok(_)) => "reachable, token accepted".to_string(),
            Ok(Err(ApiError::Refused { status: 401, .. })) => {
                "token refused (revoked or expired): run `bridge-agent login` again".to_string()
            }
            Ok(Err(e)) => format!("not usable: {e}"),
            Err(_) => "no answer within 5 s".to_string(),
        };
        println!("token:   {verdict}");
    }
    match read_status(home) {
        Some((status, true)) => {
            println!(
                "daemon:  running (pid {}), {}",
                status.pid,
                if status.connected {
                    "connected to the server".to_string()
                } else {
                    format!(
                        "not connected{}",
                        status
                            .last_error
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )
                }
            );
            let d = status.data;
            println!(
                "frames:  {} to the server, {} to dongles, {} dropped, {} outside any group \
                 and console",
                d.frames_up, d.frames_down, d.dropped, d.unrouted
            );
            if d.dongle_lost > 0 {
                println!(
                    "lost:    {} frames lost by dongles themselves (a queue of theirs was full), as they \
                     report",
                    d.dongle_lost
                );
            }
            if d.console_seen > 0 {
                println!(
                    "console: {} frames of watched dongles, {} of them sent (a sample above {} a second)",
                    d.console_seen,
                    d.console_sent,
                    crate::daemon::CONSOLE_RATE
                );
            }
            if status.uart_reports_waiting > 0 || status.uart_reports_dropped > 0 {
                println!(
                    "uart:    {} commands typed on dongles wait for the server, {} dropped",
                    status.uart_reports_waiting, status.uart_reports_dropped
                );
            }
            if status.dongles.is_empty() {
                println!("dongles: none seen");
            }
            for d in &status.dongles {
                let place = d.transport.to_string();
                println!(
                    "dongle:  {}  {}  {}{}",
                    d.device_id,
                    place,
                    match (&d.transport, d.claimed) {
                        (control_proto::Transport::Local { .. }, _) if !d.present => {
                            "local endpoint, not open"
                        }
                        (control_proto::Transport::Local { .. }, _) => "local endpoint",
                        (_, true) => "token held",
                        (_, false) => "no token",
                    },
                    if d.pairing_mode {
                        ", pairing window open"
                    } else {
                        ""
                    }
                );
            }
        }
        Some((status, false)) => println!(
            "daemon:  not running (pid {} stopped without cleaning up)",
            status.pid
        ),
        None => println!("daemon:  not running (start it with `bridge-agent run`)"),
    }
    let (running, waiting) = Journal::peek(&home.journal_dir());
    println!("commands: {running} running, {waiting} results waiting for the server");
    Ok(())
}
