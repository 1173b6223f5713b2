//! The parts of the demo system and how each starts and stops: the embedded PostgreSQL, the server, the
//! simulated dongles on their own virtual buses, and the agents as two workstations would run them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bridge_agent::daemon::{self, DaemonConfig};
use bridge_agent::discovery::scan::ScanPlan;
use bridge_agent::dongles::ManagerConfig;
use bridge_agent::home::{Credentials, Home};
use bridge_agent::uplink::api::Api;
use bridge_agent::uplink::backoff::Backoff;
use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::embedded_pg::EmbeddedPostgres;
use bridge_server::users::{self, Email, Role};
use dongle_sim::{LinkConfig, SimConfig, SimHandle, Simulator};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The server and its database.
pub struct ServerPart {
    pub server: RunningServer,
    pub postgres: EmbeddedPostgres,
}

impl ServerPart {
    /// Starts a PostgreSQL cluster in `dir` and the server on it, on 127.0.0.1 with a free port.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let postgres = EmbeddedPostgres::start(dir.join("postgres"))
            .await
            .context("could not start the embedded PostgreSQL")?;
        let pool = bridge_server::db::connect(&postgres.url(), 20).await?;
        bridge_server::db::migrate(&pool).await?;
        let config = ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            // The demo's dongle tokens need a key; a random one lives as long as the demo.
            ..ServerConfig::default()
        };
        let server = app::spawn(config, pool)
            .await
            .context("could not start the server")?;
        Ok(Self { server, postgres })
    }

    pub fn url(&self) -> &str {
        &self.server.base_url
    }

    /// Makes a verified user with a random password; answers the password.
    pub async fn create_user(&self, email: &str) -> anyhow::Result<String> {
        create_user(&self.server.state.pool, email).await
    }

    pub async fn stop(self) {
        let _ = self.server.shutdown().await;
        let _ = self.postgres.stop().await;
    }
}

/// Makes a verified user with a random password in the server's database; answers the password.
pub async fn create_user(pool: &sqlx::PgPool, email: &str) -> anyhow::Result<String> {
    let password: String = {
        use rand::RngExt;
        let mut rng = rand::rng();
        (0..20)
            .map(|_| {
                let alphabet = b"abcdefghjkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789";
                char::from(alphabet[rng.random_range(0..alphabet.len())])
            })
            .collect()
    };
    let hash = bridge_server::auth::password::hash(&password, Default::default())?;
    let user = users::insert(pool, &Email::parse(email)?, &hash, Role::User)
        .await?
        .context("the demo user exists already")?;
    users::mark_email_verified(pool, user.id).await?;
    Ok(password)
}

/// A simulated dongle on its own virtual CAN bus.
pub struct DonglePart {
    pub sim: SimHandle,
    pub device_id: String,
    /// Where the agent finds it: `--port PATH` or `--udp ADDR`.
    pub plan: ScanPlan,
    pub bus_root: PathBuf,
    pub bus: String,
    pub link: &'static str,
}

impl DonglePart {
    /// A dongle on a pseudo-terminal, as if plugged into USB.
    pub async fn usb(dir: &Path, bus: &str) -> anyhow::Result<Self> {
        let link = dir.join("ttyDONGLE");
        let mut config = SimConfig::serial(dir.join("flash.json")).with_bus(bus);
        config.link = LinkConfig::Serial {
            link: Some(link.clone()),
        };
        Self::start(config, dir, bus, "usb (pseudo-terminal)", |_| ScanPlan {
            usb_filter: Vec::new(),
            explicit_ports: vec![link.clone()],
            broadcast: false,
            ..ScanPlan::default()
        })
        .await
    }

    /// A dongle on UDP, as if on the LAN.
    pub async fn lan(dir: &Path, bus: &str) -> anyhow::Result<Self> {
        let config = SimConfig::udp(dir.join("flash.json")).with_bus(bus);
        Self::start(config, dir, bus, "lan (udp)", |sim| ScanPlan {
            usb_filter: Vec::new(),
            broadcast: false,
            udp_targets: sim.discovery_addr().into_iter().collect(),
            ..ScanPlan::default()
        })
        .await
    }

    async fn start(
        mut config: SimConfig,
        dir: &Path,
        bus: &str,
        link: &'static str,
        plan: impl FnOnce(&SimHandle) -> ScanPlan,
    ) -> anyhow::Result<Self> {
        let bus_root = dir.join("bus");
        std::fs::create_dir_all(&bus_root)?;
        config.bus_root = Some(bus_root.clone());
        config.extensions = dongle_sim::Extensions::ALL;
        let sim = Simulator::start(config)
            .await
            .context("could not start a simulated dongle")?;
        Ok(Self {
            device_id: sim.device_id().to_string(),
            plan: plan(&sim),
            sim,
            bus_root,
            bus: bus.to_string(),
            link,
        })
    }
}

/// The daemon's task and what it ended with.
type DaemonTask = JoinHandle<Result<(), daemon::DaemonError>>;

/// An agent as a workstation runs it: its own folder and credentials, the daemon as a task.
pub struct AgentPart {
    pub home: Home,
    pub credentials: Credentials,
    plan: ScanPlan,
    running: Option<(oneshot::Sender<()>, DaemonTask)>,
    /// The runtime the daemon runs on (None: the caller's), as a workstation runs the agent in a
    /// process of its own; the benchmarks give each agent one, to tell its CPU time apart.
    runtime: Option<tokio::runtime::Handle>,
}

impl AgentPart {
    /// Logs in as the user (registering an agent named `name`), as `bridge-agent login` does.
    pub async fn login(
        dir: &Path,
        server_url: &str,
        email: &str,
        password: &str,
        name: &str,
        plan: ScanPlan,
    ) -> anyhow::Result<Self> {
        let home = Home::at(dir);
        let mut api = Api::new(server_url, None)?;
        api.login(email, password).await?;
        let registered = api.register_agent(name).await?;
        let credentials = Credentials {
            server_url: server_url.to_string(),
            agent_id: registered.agent_id,
            agent_token: registered.agent_token,
            ca_file: None,
        };
        home.save_credentials(&credentials)?;
        Ok(Self {
            home,
            credentials,
            plan,
            running: None,
            runtime: None,
        })
    }

    /// Runs the daemon on `runtime` from the next [`start`](Self::start) on.
    pub fn run_on(&mut self, runtime: tokio::runtime::Handle) {
        self.runtime = Some(runtime);
    }

    /// Starts the daemon (`bridge-agent run`).
    pub fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let mut manager = ManagerConfig::new(self.plan.clone());
        manager.lan_idle = Duration::from_secs(2);
        manager.lan_pairing = Duration::from_secs(1);
        let config = DaemonConfig {
            home: self.home.clone(),
            credentials: self.credentials.clone(),
            manager,
            udp_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            host_commands: true,
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let daemon = daemon::run(config, async {
            let _ = stop_rx.await;
        });
        let task = match &self.runtime {
            Some(runtime) => runtime.spawn(daemon),
            None => tokio::spawn(daemon),
        };
        self.running = Some((stop_tx, task));
    }

    /// Stops the daemon, as Ctrl-C on `bridge-agent run` would.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some((stop, task)) = self.running.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => bail!("the agent task failed: {e}"),
            Err(_) => bail!("the agent did not stop within 10 s"),
        }
    }
}
