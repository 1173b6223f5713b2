//! `bridge-agent endpoint add|list|remove`: the local CAN endpoints (a SocketCAN interface, an slcan
//! adapter, a socketcand port) this agent serves as dongles of its user.

use anyhow::Context;
use clap::Subcommand;
use uuid::Uuid;

use crate::endpoints::{
    CanEndpoint, EndpointKind, EndpointOptions, EndpointSpec, EndpointStore, local_device_id,
};
use crate::home::Home;

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Serve a local CAN endpoint as a dongle of yours, usable as one side of a group.
    ///
    /// SPEC is socketcan:IFACE (Linux), slcan:PATH[@BITRATE][,fd[=DATA_BITRATE]][,baud=N][,listen]
    /// [,timestamps] or socketcand:[IP:]PORT (IP defaults to 127.0.0.1). A running agent picks it up
    /// within seconds. Adding an endpoint that is there already changes its settings.
    Add {
        spec: String,
        /// Open the endpoint once now to see that it answers (not while a running agent holds it).
        #[arg(long)]
        check: bool,
    },
    /// List the local endpoints this agent serves, with their device ids.
    List,
    /// Stop serving a local endpoint. Its settings need not be given: slcan:/dev/ttyACM0 is enough.
    Remove { spec: String },
}

pub async fn run(home: &Home, command: EndpointCommand) -> anyhow::Result<()> {
    let store = EndpointStore::new(home);
    let agent_id = home.load_credentials()?.map(|c| c.agent_id);
    match command {
        EndpointCommand::Add { spec, check } => {
            let spec: EndpointSpec = spec.parse()?;
            if check {
                eprintln!("opening {spec} ...");
                let endpoint = CanEndpoint::open(&spec, &EndpointOptions::default())
                    .await
                    .with_context(|| format!("{spec} does not work yet; nothing was added"))?;
                let info = endpoint.info();
                println!(
                    "{} answers{}",
                    info.identity,
                    info.version.map(|v| format!(" ({v})")).unwrap_or_default()
                );
            }
            let replaced = store.add(&spec)?;
            match replaced {
                Some(old) if old == spec => println!("{spec} was kept already"),
                Some(old) => println!("changed {old} to {spec}"),
                None => println!("added {spec}"),
            }
            println!("{}", device_line(&spec, agent_id));
        }
        EndpointCommand::List => print!("{}", render(&store.load()?, agent_id)),
        EndpointCommand::Remove { spec } => {
            let spec: EndpointSpec = spec.parse()?;
            match store.remove(&spec)? {
                Some(old) => println!("removed {old}"),
                None => anyhow::bail!(
                    "no endpoint {} is kept; `bridge-agent endpoint list` shows those that are",
                    spec.identity()
                ),
            }
        }
    }
    Ok(())
}

fn device_line(spec: &EndpointSpec, agent_id: Option<Uuid>) -> String {
    match agent_id {
        Some(agent) => format!(
            "its device id is {}: a dongle of yours once `bridge-agent run` serves it",
            local_device_id(agent, &spec.identity())
        ),
        None => "its device id comes from this agent's id: run `bridge-agent login` to get one"
            .to_string(),
    }
}

/// How each kind's bit timing is set, for the list.
fn timing(kind: EndpointKind) -> &'static str {
    match kind {
        EndpointKind::Slcan => "settable",
        EndpointKind::SocketCan => "ip link",
        EndpointKind::Socketcand => "none",
    }
}

/// The kept endpoints as a table.
pub fn render(specs: &[EndpointSpec], agent_id: Option<Uuid>) -> String {
    if specs.is_empty() {
        return "no local endpoints (add one with `bridge-agent endpoint add SPEC`)\n".into();
    }
    let mut out = format!(
        "{:<16}  {:<10}  {:<8}  ENDPOINT\n",
        "DEVICE ID", "KIND", "TIMING"
    );
    for spec in specs {
        let id = agent_id
            .map(|a| local_device_id(a, &spec.identity()).to_string())
            .unwrap_or_else(|| "(not logged in)".into());
        out.push_str(&format!(
            "{id:<16}  {:<10}  {:<8}  {spec}\n",
            spec.kind().name(),
            timing(spec.kind())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_ids_kinds_and_how_timing_is_set() {
        let specs: Vec<EndpointSpec> = [
            "socketcan:can0",
            "slcan:/dev/ttyACM0@250k",
            "socketcand:29536",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let agent = Uuid::nil();
        let text = render(&specs, Some(agent));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with(&local_device_id(agent, "socketcan:can0").to_string()));
        assert!(lines[1].contains("ip link"));
        assert!(lines[2].contains("settable") && lines[2].ends_with("slcan:/dev/ttyACM0@250000"));
        assert!(lines[3].ends_with("socketcand:127.0.0.1:29536"));
        assert!(render(&specs, None).contains("(not logged in)"));
        assert!(render(&[], None).contains("endpoint add"));
    }
}
