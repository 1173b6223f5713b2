//! `bridge-agent pair`: the technician's pairing flow (SPEC 3.4) from the workstation. Pick an unclaimed
//! dongle this agent sees, open its pairing window, and type the PIN it shows.
//!
//! The server does the pairing through this agent's running daemon, so `bridge-agent run` must be up.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::home::Home;
use crate::uplink::api::{Api, ApiError, DongleSummary};

#[derive(Debug, Args)]
pub struct PairArgs {
    /// The dongle's device id (16 hex characters); needed when this agent sees several unclaimed ones.
    pub device_id: Option<String>,
    /// How long to wait for the dongle to show up, in seconds (the daemon may be starting).
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub wait: u64,
}

fn read_line(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("could not read from the terminal")?;
    if n == 0 {
        bail!("no input (end of file): pairing cancelled");
    }
    Ok(line.trim().to_string())
}

/// The unclaimed dongles this agent sees now.
async fn candidates(api: &Api, agent_id: uuid::Uuid) -> Result<Vec<DongleSummary>, ApiError> {
    Ok(api
        .dongles()
        .await?
        .into_iter()
        .filter(|d| !d.owned && d.online && d.agent_id == Some(agent_id))
        .collect())
}

pub async fn run(home: &Home, args: PairArgs) -> anyhow::Result<()> {
    let creds = home
        .load_credentials()?
        .context("this agent is not logged in: run `bridge-agent login --server URL` first")?;
    let api =
        Api::new(&creds.server_url, creds.ca_file.as_deref())?.with_agent_token(&creds.agent_token);
    let wanted = args.device_id.as_deref().map(str::to_ascii_lowercase);
    if let Some(id) = &wanted
        && !control_proto::is_device_id(id)
    {
        bail!("{id:?} is not a device id (16 hex characters, as `bridge-agent list` shows)");
    }
    eprint!("looking for unclaimed dongles this agent sees ");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    let found = loop {
        let all = api.dongles().await.context("could not list the dongles")?;
        if let Some(id) = &wanted
            && let Some(d) = all.iter().find(|d| &d.device_id == id)
            && d.owned
            && d.ownership_state == "CLAIMED_ACTIVE"
        {
            eprintln!();
            println!("Dongle {id} is already paired to your account.");
            return Ok(());
        }
        let mut seen = candidates(&api, creds.agent_id).await?;
        if let Some(id) = &wanted {
            seen.retain(|d| &d.device_id == id);
        }
        if !seen.is_empty() || tokio::time::Instant::now() >= deadline {
            eprintln!();
            break seen;
        }
        eprint!(".");
        std::io::stderr().flush().ok();
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let dongle = match found.as_slice() {
        [] => match &wanted {
            Some(id) => bail!(
                "this agent does not see an unclaimed dongle {id}: is `bridge-agent run` running and the \
                 dongle plugged in? (`bridge-agent status` shows what the daemon sees)"
            ),
            None => bail!(
                "this agent sees no unclaimed dongle: is `bridge-agent run` running and the dongle \
                 plugged in? (`bridge-agent status` shows what the daemon sees)"
            ),
        },
        [one] => one.clone(),
        many => {
            eprintln!("This agent sees several unclaimed dongles:");
            for (i, d) in many.iter().enumerate() {
                eprintln!(
                    "  {}. {}  firmware {}",
                    i + 1,
                    d.device_id,
                    d.fw_build.as_deref().unwrap_or("?")
                );
            }
            let choice = read_line("Which one (number)? ")?;
            let index: usize = choice
                .parse()
                .ok()
                .filter(|i| (1..=many.len()).contains(i))
                .with_context(|| {
                    format!("{choice:?} is not a number between 1 and {}", many.len())
                })?;
            many[index - 1].clone()
        }
    };
    eprintln!(
        "opening the pairing window of dongle {} ...",
        dongle.device_id
    );
    let started = api
        .pairing_start(dongle.id)
        .await
        .map_err(explain)
        .context("could not start pairing")?;
    if started.paired {
        println!(
            "Dongle {} is already paired to your account.",
            dongle.device_id
        );
        return Ok(());
    }
    let session = started
        .pairing_session_id
        .context("the server opened no pairing session")?;
    eprintln!(
        "Dongle {} now shows a 6-digit PIN (on its display, or in its log).",
        dongle.device_id
    );
    loop {
        let pin = read_line("PIN: ")?;
        match api.pairing_submit(dongle.id, session, &pin).await {
            Ok(()) => {
                println!(
                    "Paired: dongle {} belongs to your account now.",
                    dongle.device_id
                );
                return Ok(());
            }
            Err(ApiError::Refused { code, details, .. }) if code == "PAIRING_PIN_INVALID" => {
                match details.get("attempts_left").and_then(|v| v.as_u64()) {
                    Some(0) | None => bail!(
                        "wrong PIN, and no attempts are left: the dongle is on hold until an admin \
                         clears it"
                    ),
                    Some(n) => eprintln!("Wrong PIN: {n} attempts left."),
                }
            }
            Err(ApiError::Refused { code, .. }) if code == "VALIDATION_ERROR" => {
                eprintln!("A PIN is 6 digits; try again.");
            }
            Err(e) => return Err(explain(e)).context("pairing failed"),
        }
    }
}

/// Adds what the technician can do about the server's refusals.
fn explain(e: ApiError) -> anyhow::Error {
    let hint = match e.code() {
        Some("AGENT_OFFLINE") => {
            Some("is `bridge-agent run` running, and connected to the server?")
        }
        Some("PAIRING_SECURITY_HOLD") => Some("too many wrong PINs: an admin must clear the hold"),
        Some("PAIRING_EXPIRED") => Some("the pairing window closed: run `bridge-agent pair` again"),
        Some("DONGLE_OWNED_BY_OTHER") => {
            Some("the dongle belongs to another account: its owner must unpair it first")
        }
        _ => None,
    };
    match hint {
        Some(hint) => anyhow::Error::new(e).context(hint),
        None => anyhow::Error::new(e),
    }
}
