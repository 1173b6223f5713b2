//! The system that `bench-relay`, `bench-buffer` and `bench-console` measure, built from
//! `bridge-rig`'s parts and the demo's user: an embedded PostgreSQL (fsync on, as initdb leaves it),
//! one or more server instances on it, and `groups` pairs of simulated dongles, each dongle on a virtual CAN bus of its
//! own. Every side-A dongle is on a pseudo-terminal served by agent A, every side-B dongle on UDP
//! served by agent B, as two workstations would run them; each pair is one ACTIVE group.
//!
//! Each server instance and each agent runs on a tokio runtime of its own, as it would in a process of
//! its own, with its threads named after it, so that [`cpu_by_part`] can tell their CPU time apart;
//! the simulators and the benchmark's own traffic run on the caller's runtime. With several instances,
//! agent A connects to the first and agent B to the last, so that every group's sides reach different
//! instances.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::discovery::scan::ScanPlan;
use bridge_rig::{AgentPart, DonglePart, UserClient};
use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::embedded_pg::EmbeddedPostgres;
use bridge_server::groups::relay::RelaySettings;
use serde_json::json;

/// One group: its two dongles and its id.
pub struct GroupRig {
    pub a: DonglePart,
    pub b: DonglePart,
    pub group_id: String,
}

/// The running system.
pub struct Rig {
    pub postgres: EmbeddedPostgres,
    /// The nats-server the relay buffers on, with `--nats`.
    pub nats: Option<bridge_rig::nats::NatsNode>,
    /// The server instances, all on the one database.
    pub servers: Vec<RunningServer>,
    pub user: UserClient,
    pub agent_a: AgentPart,
    pub agent_b: AgentPart,
    pub groups: Vec<GroupRig>,
    /// The runtimes of the servers and agents, by part name.
    pub runtimes: Runtimes,
}

/// A part's runtime, shut down without blocking when dropped: a rig that fails half-built is dropped
/// by an async caller, where dropping a runtime would panic.
struct PartRuntime(Option<tokio::runtime::Runtime>);

impl PartRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for PartRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The runtimes of the parts, by name.
pub struct Runtimes(Vec<(String, PartRuntime)>);

impl Runtimes {
    /// Shuts the runtime `name` down and puts a new one of the same name in its place, whose handle it
    /// returns. What ran on the old one ends nearly as a killed process's threads end: every task
    /// dropped where it stood, nothing acknowledged, its sockets closed. Unlike `kill -9`, the
    /// dropped values' `Drop` still runs (a buffered writer flushes) and blocking-pool jobs finish.
    pub fn kill_and_renew(&mut self, name: &str) -> anyhow::Result<tokio::runtime::Handle> {
        let fresh = runtime(name)?;
        let handle = fresh.handle();
        match self.0.iter_mut().find(|(n, _)| n == name) {
            // The old runtime drops here (`PartRuntime`'s drop shuts it down without waiting).
            Some((_, rt)) => *rt = fresh,
            None => self.0.push((name.to_string(), fresh)),
        }
        Ok(handle)
    }
}

/// The thread-name prefix of the runtime of agent A, agent B, and server instance `n`.
pub const AGENT_A: &str = "agent-a";
pub const AGENT_B: &str = "agent-b";
pub fn server_part(n: usize) -> String {
    format!("server-{n}")
}

/// A runtime for one part of the system, its threads named after it (at most 15 bytes show).
fn runtime(name: &str) -> anyhow::Result<PartRuntime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .map(|rt| PartRuntime(Some(rt)))
        .with_context(|| format!("could not start a runtime for {name}"))
}

/// This process's CPU time (user and system) so far by part: the threads of each named runtime, and
/// everything else (simulators, the benchmark's traffic, the runtimes' own helpers) as "rest".
pub fn cpu_by_part(parts: &[String]) -> BTreeMap<String, Duration> {
    let mut by_part: BTreeMap<String, Duration> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_part;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let Some(cpu) = crate::proc_stat_cpu(&path.join("stat")) else {
            continue;
        };
        let part = parts
            .iter()
            .find(|p| comm.trim_end() == p.as_str())
            .cloned()
            .unwrap_or_else(|| "rest".to_string());
        *by_part.entry(part).or_default() += cpu;
    }
    by_part
}

impl Rig {
    /// Starts everything in `dir` with one server instance and brings `groups` groups to ACTIVE.
    /// `relay` replaces the server's relay settings (the buffering benchmark raises the retention so
    /// that nothing is trimmed).
    pub async fn start(dir: &Path, groups: usize, relay: RelaySettings) -> anyhow::Result<Self> {
        Self::start_instances(dir, groups, relay, 1, false).await
    }

    /// As [`start`](Self::start), with `instances` server instances on the one database; with `nats`,
    /// a nats-server with JetStream in `dir` holds the relay's buffer (`serve --nats-url`).
    pub async fn start_instances(
        dir: &Path,
        groups: usize,
        relay: RelaySettings,
        instances: usize,
        nats: bool,
    ) -> anyhow::Result<Self> {
        let postgres = EmbeddedPostgres::start(dir.join("postgres"))
            .await
            .context("could not start the embedded PostgreSQL (is PostgreSQL installed?)")?;
        let nats = if nats {
            Some(bridge_rig::nats::start(dir)?)
        } else {
            None
        };
        let nats_settings = nats
            .as_ref()
            .map(|node| bridge_server::groups::jetstream::NatsSettings::new(node.url()));
        let url = postgres.url();
        let mut runtimes = Vec::new();
        let mut servers = Vec::new();
        for n in 0..instances.max(1) {
            let name = server_part(n);
            let rt = runtime(&name)?;
            let (url, relay, nats) = (url.clone(), relay.clone(), nats_settings.clone());
            // Instances must share the dongle-token keys, which also seal what they hand each other.
            let dongle_keys = servers
                .first()
                .map(|first: &RunningServer| first.state.keys.as_ref().clone())
                .unwrap_or_default();
            // The pool and every task of the instance live on its runtime, as in a process of its own.
            // Started from a thread of its own with `block_on`, since the start-up future is not
            // `Send` (sqlx's migrations), which `spawn` would need.
            let handle = rt.handle();
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let started = handle.block_on(async move {
                    let pool = bridge_server::db::connect(&url, 20).await?;
                    if n == 0 {
                        bridge_server::db::migrate(&pool).await?;
                    }
                    let config = ServerConfig {
                        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                        relay,
                        dongle_keys,
                        nats,
                        ..ServerConfig::default()
                    };
                    anyhow::Ok(app::spawn(config, pool).await?)
                });
                let _ = tx.send(started);
            });
            let server = rx
                .await
                .context("the server's start-up thread failed")?
                .with_context(|| format!("could not start server instance {n}"))?;
            servers.push(server);
            runtimes.push((name, rt));
        }
        let email = "bench@bench.example";
        let password = bridge_demo::system::create_user(
            &servers[0].state.pool,
            email,
            bridge_server::users::Role::User,
        )
        .await?;
        let url = servers[0].base_url.clone();
        let url_b = servers[servers.len() - 1].base_url.clone();

        let mut pairs = Vec::with_capacity(groups);
        for i in 0..groups {
            let a = DonglePart::usb(&dir.join(format!("a{i}")), &format!("a{i}"))
                .await
                .with_context(|| format!("dongle a{i}"))?;
            let b = DonglePart::lan(&dir.join(format!("b{i}")), &format!("b{i}"))
                .await
                .with_context(|| format!("dongle b{i}"))?;
            pairs.push((a, b));
        }
        // One agent per side serves all of that side's dongles, as one workstation with many dongles.
        let plan_a = ScanPlan {
            usb_filter: Vec::new(),
            broadcast: false,
            explicit_ports: pairs
                .iter()
                .flat_map(|(a, _)| a.plan.explicit_ports.clone())
                .collect(),
            ..ScanPlan::default()
        };
        let plan_b = ScanPlan {
            usb_filter: Vec::new(),
            broadcast: false,
            udp_targets: pairs
                .iter()
                .flat_map(|(_, b)| b.plan.udp_targets.clone())
                .collect(),
            ..ScanPlan::default()
        };
        let mut agent_a = AgentPart::login(
            &dir.join("agent-a"),
            &url,
            email,
            &password,
            "bench-a",
            plan_a,
        )
        .await
        .context("agent A could not log in")?;
        let mut agent_b = AgentPart::login(
            &dir.join("agent-b"),
            &url_b,
            email,
            &password,
            "bench-b",
            plan_b,
        )
        .await
        .context("agent B could not log in")?;
        for (agent, name) in [(&mut agent_a, AGENT_A), (&mut agent_b, AGENT_B)] {
            let rt = runtime(name)?;
            agent.run_on(rt.handle());
            agent.start();
            runtimes.push((name.to_string(), rt));
        }
        let user = UserClient::login(&url, email, &password).await?;

        let mut rig = Rig {
            postgres,
            nats,
            servers,
            user,
            agent_a,
            agent_b,
            groups: Vec::new(),
            runtimes: Runtimes(runtimes),
        };
        let built = async {
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let a_id = bridge_rig::pair(&rig.user, &a)
                    .await
                    .with_context(|| format!("pairing dongle a{i}"))?;
                let b_id = bridge_rig::pair(&rig.user, &b)
                    .await
                    .with_context(|| format!("pairing dongle b{i}"))?;
                // Buses at 1 Mbit/s, the fastest classic CAN: the agents pace frames to a dongle's bus,
                // and the rates measured here need it (9 000 five-byte frames a second fill 95 %).
                for id in [&a_id, &b_id] {
                    rig.user
                        .put(&format!("/dongles/{id}/can-config"), fast_bus())
                        .await
                        .with_context(|| format!("configuring dongle {id} at 1 Mbit/s"))?;
                }
                let g = rig
                    .user
                    .post("/groups", json!({"dongle_a_id": a_id, "dongle_b_id": b_id}))
                    .await?;
                let group_id = g["id"].as_str().context("a group id")?.to_string();
                rig.user
                    .post(&format!("/groups/{group_id}/activate"), json!({}))
                    .await?;
                rig.groups.push(GroupRig { a, b, group_id });
            }
            for g in &rig.groups {
                rig.wait_state(&g.group_id, rig.relaying_state(), Duration::from_secs(20))
                    .await?;
            }
            anyhow::Ok(())
        }
        .await;
        match built {
            Ok(()) => Ok(rig),
            Err(e) => {
                rig.stop().await;
                Err(e)
            }
        }
    }

    /// The group's state and its backlog (both directions) as `GET /groups/:id` tells them.
    pub async fn group_state(&self, group_id: &str) -> anyhow::Result<(String, u64)> {
        let g = self.user.get(&format!("/groups/{group_id}")).await?;
        let state = g["state"].as_str().unwrap_or("?").to_string();
        let backlog = g["backlog"]["a_to_b"].as_u64().unwrap_or(0)
            + g["backlog"]["b_to_a"].as_u64().unwrap_or(0);
        Ok((state, backlog))
    }

    /// Waits until the group shows `state`.
    pub async fn wait_state(
        &self,
        group_id: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (now, _) = self.group_state(group_id).await?;
            if now == state {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "group {group_id} stayed {now}, not {state}, for {} s",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The state a relaying group settles in: ACTIVE on one instance; with several, its sides reach
    /// different instances, which relay through the database's buffer: CROSS_INSTANCE.
    pub fn relaying_state(&self) -> &'static str {
        if self.servers.len() > 1 {
            "CROSS_INSTANCE"
        } else {
            "ACTIVE"
        }
    }

    /// The first server instance (the one the user and agent A talk to).
    pub fn server(&self) -> &RunningServer {
        &self.servers[0]
    }

    /// The names of the parts whose CPU time [`cpu_by_part`] tells apart.
    pub fn parts(&self) -> Vec<String> {
        self.runtimes
            .0
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Stops everything: agents first, so that nothing talks to a server that is going, then the
    /// simulators, the servers and PostgreSQL, and last the runtimes.
    pub async fn stop(mut self) {
        let _ = self.agent_a.stop().await;
        let _ = self.agent_b.stop().await;
        for g in self.groups {
            g.a.sim.shutdown().await;
            g.b.sim.shutdown().await;
        }
        for server in self.servers {
            let _ = server.shutdown().await;
        }
        let _ = self.postgres.stop().await;
        drop(self.nats);
        // The runtimes go last, without blocking (`PartRuntime`'s drop).
        drop(self.runtimes);
    }
}

/// The CAN configuration of every benchmark dongle: 1 Mbit/s, sample point 75 %.
fn fast_bus() -> serde_json::Value {
    json!({"bitrate": 1_000_000, "sample_point_permille": 750, "mode": "normal", "use_raw": false,
           "auto_retx": true, "tx_pause": false, "protocol_exc": false})
}
