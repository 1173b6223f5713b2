//! The system that `bench-relay` and `bench-buffer` measure, built from `bridge-demo`'s parts: an
//! embedded PostgreSQL (fsync on, as initdb leaves it), the server in this process, and `groups` pairs
//! of simulated dongles, each dongle on a virtual CAN bus of its own. Every side-A dongle is on a
//! pseudo-terminal served by agent A, every side-B dongle on UDP served by agent B, as two workstations
//! would run them; each pair is one ACTIVE group.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::discovery::scan::ScanPlan;
use bridge_demo::api::UserClient;
use bridge_demo::system::{AgentPart, DonglePart, ServerPart};
use bridge_server::app;
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
    pub server: ServerPart,
    pub user: UserClient,
    pub agent_a: AgentPart,
    pub agent_b: AgentPart,
    pub groups: Vec<GroupRig>,
}

impl Rig {
    /// Starts everything in `dir` and brings `groups` groups to ACTIVE. `relay` replaces the server's
    /// relay settings (the buffering benchmark raises the retention so that nothing is trimmed).
    pub async fn start(dir: &Path, groups: usize, relay: RelaySettings) -> anyhow::Result<Self> {
        let postgres = EmbeddedPostgres::start(dir.join("postgres"))
            .await
            .context("could not start the embedded PostgreSQL (is PostgreSQL installed?)")?;
        let pool = bridge_server::db::connect(&postgres.url(), 20).await?;
        bridge_server::db::migrate(&pool).await?;
        let config = ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            relay,
            ..ServerConfig::default()
        };
        let server = app::spawn(config, pool)
            .await
            .context("could not start the server")?;
        let server = ServerPart { server, postgres };
        let email = "bench@bench.example";
        let password = server.create_user(email).await?;
        let url = server.url().to_string();

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
            &url,
            email,
            &password,
            "bench-b",
            plan_b,
        )
        .await
        .context("agent B could not log in")?;
        agent_a.start();
        agent_b.start();
        let user = UserClient::login(&url, email, &password).await?;

        let mut rig = Rig {
            server,
            user,
            agent_a,
            agent_b,
            groups: Vec::new(),
        };
        let built = async {
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let a_id = bridge_demo::pair(&rig.user, &a)
                    .await
                    .with_context(|| format!("pairing dongle a{i}"))?;
                let b_id = bridge_demo::pair(&rig.user, &b)
                    .await
                    .with_context(|| format!("pairing dongle b{i}"))?;
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
                rig.wait_state(&g.group_id, "ACTIVE", Duration::from_secs(20))
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

    /// Stops everything: agents first, so that nothing talks to a server that is going, then the
    /// simulators, the server and PostgreSQL.
    pub async fn stop(mut self) {
        let _ = self.agent_a.stop().await;
        let _ = self.agent_b.stop().await;
        for g in self.groups {
            g.a.sim.shutdown().await;
            g.b.sim.shutdown().await;
        }
        self.server.stop().await;
    }
}
