//! The agent daemon as a workstation runs it (`bridge-agent login`, then `bridge-agent run`), in this
//! process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use bridge_agent::daemon::{self, DaemonConfig};
use bridge_agent::discovery::scan::ScanPlan;
use bridge_agent::dongles::ManagerConfig;
use bridge_agent::home::{Credentials, Home};
use bridge_agent::uplink::api::Api;
use bridge_agent::uplink::backoff::Backoff;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The daemon's task and what it ended with.
type DaemonTask = JoinHandle<Result<(), daemon::DaemonError>>;

/// An agent with its own folder and credentials; its daemon runs as a task between
/// [`start`](Self::start) and [`stop`](Self::stop).
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
    /// Logs in as the user and registers an agent named `name`, as `bridge-agent login` does; the
    /// credentials go to `dir`. The daemon does not run yet.
    pub async fn login(
        dir: &Path,
        server_url: &str,
        email: &str,
        password: &str,
        name: &str,
        plan: ScanPlan,
    ) -> anyhow::Result<Self> {
        let mut api = Api::new(server_url, None)?;
        api.login(email, password).await?;
        let registered = api.register_agent(name).await?;
        let credentials = Credentials {
            server_url: server_url.to_string(),
            agent_id: registered.agent_id,
            agent_token: registered.agent_token,
            ca_file: None,
        };
        Self::with_credentials(dir, credentials, plan)
    }

    /// An agent with credentials made elsewhere (a token the dashboard showed, say), saved to `dir`.
    pub fn with_credentials(
        dir: &Path,
        credentials: Credentials,
        plan: ScanPlan,
    ) -> anyhow::Result<Self> {
        let home = Home::at(dir);
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

    /// Starts the daemon (`bridge-agent run`), unless it runs already.
    ///
    /// LAN dongles are given up after 2 s of silence (the shipped default is longer) and reconnects
    /// back off to at most 2 s, so that a part stopped and started again is seen again quickly.
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
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(2)),
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

    /// Forgets the daemon after the runtime it ran on was shut down, which ends it as a killed process
    /// ends: every task dropped where it stood, nothing acknowledged or flushed. A later
    /// [`start`](Self::start) (on a new runtime, [`run_on`](Self::run_on)) runs a new daemon, as a
    /// restarted process would.
    pub fn killed(&mut self) {
        if let Some((stop, _task)) = self.running.take() {
            // Dropping the sender would complete the daemon's stop signal, its Ctrl-C path, which a
            // killed process never takes; a task its old runtime was still polling could see it.
            std::mem::forget(stop);
        }
    }

    /// Stops the daemon, as Ctrl-C on `bridge-agent run` would; waits up to 10 s for it to end.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some((stop, task)) = self.running.take() else {
            return Ok(());
        };
        let _ = stop.send(());
        let abort = task.abort_handle();
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => bail!("the agent task failed: {e}"),
            Err(_) => {
                // Cut off, so that a later `start` does not run a second daemon beside it.
                abort.abort();
                bail!("the agent did not stop within 10 s and was cut off")
            }
        }
    }
}
