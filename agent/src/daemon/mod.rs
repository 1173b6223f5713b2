//! `bridge-agent run`: the daemon. It serves the dongles the [`DongleManager`] finds and the local CAN
//! endpoints of the [`EndpointSet`], keeps the control WebSocket to the server open, and answers the
//! server's requests through the dongles' sessions or the endpoints.
//!
//! Data flows one way: the manager's [`DongleEvent`]s, the set's [`EndpointEvent`]s and the server's
//! messages come in; device
//! reports, replies and command results go out through the one sender of the current connection
//! ([`Shared::outbound`]). Dongle tokens go from the server into the [`Vault`], and from there into the
//! dongle's session. Command results go through the [`Journal`] first, so that none is lost when the
//! connection or the agent goes down.

mod bus_losses;
mod connection;
mod dataplane;
mod device;
mod downstream;
mod host;
mod local;
mod monitor;
mod pace;
mod probe;
mod reply;
mod requests;
mod status;
mod telemetry;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::{AgentMessage, CommandResult, DongleReport, Event, Transport};
use firmware_proto::ids::{DeviceId, DongleToken};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::scan::Location;
use crate::dongles::{DongleEvent, DongleManager, ManagerConfig};
use crate::endpoints::{EndpointEvent, EndpointSet, LocalEndpoint};
use crate::home::{Credentials, Home};
use crate::journal::{Journal, JournalError};
use crate::session::SessionError;
use crate::transport::udp::UdpHub;
use crate::uplink::backoff::Backoff;
use crate::uplink::control::ConnectError;
use crate::vault::{Vault, VaultError};

pub use dataplane::DataStats;
/// The most frames a second of one watched dongle sent for its console.
pub use monitor::RATE as CONSOLE_RATE;
pub use status::{DaemonStatus, read_status};

/// What the daemon needs to start.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub home: Home,
    pub credentials: Credentials,
    pub manager: ManagerConfig,
    /// The address of the one UDP socket for LAN dongles.
    pub udp_bind: SocketAddr,
    /// Delays between reconnects to the server.
    pub backoff: Backoff,
    /// Whether the server may run network diagnostics on this workstation (`daemon::host`).
    pub host_commands: bool,
}

/// Why the daemon stopped on its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("could not open the UDP socket for LAN dongles on {addr}: {source}")]
    Udp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(ConnectError),
}

/// How long after an authentication that got no answer the agent tries again.
const AUTH_RETRY: Duration = Duration::from_secs(20);

/// What every part of the daemon shares.
pub(crate) struct Shared {
    /// The dongles and local endpoints the daemon serves.
    devices: device::Devices,
    /// The protocol version of the server's last `welcome` (0 before the first): local endpoints are
    /// reported only to servers that know them.
    server_protocol: AtomicU32,
    vault: Mutex<Vault>,
    journal: Journal,
    /// The sender of the current control connection; `None` while disconnected.
    outbound: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    /// Dongles whose pairing window this agent opened, and when it closes.
    pairing: Mutex<HashMap<DeviceId, Instant>>,
    /// Dongles whose session holds their token now (or is being given it).
    authorized: Mutex<HashSet<DeviceId>>,
    /// Dongles whose session authenticated and whose dongle took the token: group frames from the
    /// server are handed only to these (a dongle drops packets without a valid token, unanswered).
    ready: Mutex<HashSet<DeviceId>>,
    status: status::StatusFile,
    data: dataplane::DataPlane,
    /// Latency benchmarks in progress through the groups served here.
    probes: probe::Probes,
    /// Commands typed on the dongles' UART consoles, until the server has them.
    telemetry: telemetry::Outbox,
    /// The workstation's owner lets the server run network diagnostics here.
    host_commands: bool,
    /// Every task the daemon starts, so that shutdown waits for them instead of leaving any behind.
    tasks: TaskTracker,
    /// Cancelled at shutdown: every task in `tasks` ends at its next await.
    cancel: CancellationToken,
}

/// How long shutdown waits for the daemon's tasks to end after cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until `shutdown` resolves, or until the server refuses the agent's token.
pub async fn run(
    config: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Opening reads and may write files, and may wait (up to 2 s) for a key another agent is still
    // writing: a blocking thread's work, not the runtime's.
    let vault_dir = config.home.vault_dir();
    let vault = tokio::task::spawn_blocking({
        let vault_dir = vault_dir.clone();
        move || Vault::open(&vault_dir)
    })
    .await
    .map_err(|e| VaultError::Io {
        path: vault_dir,
        source: std::io::Error::other(e.to_string()),
    })??;
    let journal = Journal::open(&config.home.journal_dir())?;
    let (running, waiting) = journal.counts();
    if waiting + running > 0 {
        tracing::info!(
            waiting = waiting + running,
            "command results wait for the server"
        );
    }
    let hub = UdpHub::bind(config.udp_bind)
        .await
        .map_err(|source| DaemonError::Udp {
            addr: config.udp_bind,
            source,
        })?;
    // Subscribed before the first scan: a dongle that answers at once is not missed.
    let (manager, events) = DongleManager::start(config.manager.clone(), hub);
    let endpoints = EndpointSet::start(&config.home, config.credentials.agent_id);
    let endpoint_events = endpoints.events();
    let shared = Arc::new(Shared {
        devices: device::Devices {
            dongles: manager,
            endpoints,
        },
        server_protocol: AtomicU32::new(0),
        vault: Mutex::new(vault),
        journal,
        outbound: Mutex::new(None),
        pairing: Mutex::new(HashMap::new()),
        authorized: Mutex::new(HashSet::new()),
        ready: Mutex::new(HashSet::new()),
        status: status::StatusFile::new(&config.home, &config.credentials.server_url),
        data: dataplane::DataPlane::default(),
        probes: probe::Probes::default(),
        telemetry: telemetry::Outbox::default(),
        host_commands: config.host_commands,
        tasks: TaskTracker::new(),
        cancel: CancellationToken::new(),
    });
    shared.status.update(|s| s.dongles = shared.reports());
    shared.spawn(watch_dongles(shared.clone(), events));
    shared.spawn(watch_endpoints(shared.clone(), endpoint_events));
    // Endpoints that opened before the watcher subscribed are pumped here.
    for endpoint in shared.devices.endpoints.list() {
        shared.start_pump(endpoint.device_id);
    }
    // Tracked but not cut short at shutdown: the data plane ends by itself when the daemon stops,
    // once it has told the server what it delivered (see `dataplane::farewell`).
    shared.tasks.spawn(dataplane::run(
        shared.clone(),
        config.credentials.clone(),
        config.backoff.clone(),
    ));
    shared.spawn(write_stats(shared.clone()));
    let outcome = tokio::select! {
        outcome = connection::keep_connected(shared.clone(), &config) => outcome,
        () = shutdown => Ok(()),
    };
    // Every task of the daemon (watchers, data plane, pumps, authorisations, timers) ends here: none
    // is left running after `run` returns.
    shared.cancel.cancel();
    shared.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = shared.tasks.len(),
            "some of the daemon's tasks did not end in time"
        );
    }
    shared.status.remove();
    outcome
}

/// Refreshes the data-plane counters in the status file once a second while they change.
async fn write_stats(shared: Arc<Shared>) {
    let mut last = (DataStats::default(), 0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (
            shared.data.stats(),
            shared.telemetry.unacknowledged().len(),
            shared.telemetry.dropped(),
        );
        if now != last {
            shared.status.update(|s| {
                s.data = now.0;
                s.uart_reports_waiting = now.1;
                s.uart_reports_dropped = now.2;
            });
            last = now;
        }
    }
}

/// Follows the dongles as they come and go: authenticates to the ones the vault has a token for, and
/// tells the server.
async fn watch_dongles(shared: Arc<Shared>, mut events: broadcast::Receiver<DongleEvent>) {
    loop {
        match events.recv().await {
            Ok(DongleEvent::Appeared { info, .. }) => shared.dongle_appeared(info.device_id),
            Ok(DongleEvent::Gone { device_id }) => shared.dongle_gone(&device_id),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // A missed "appeared" would leave a dongle whose frames nobody reads: look again.
                tracing::warn!(
                    missed,
                    "dongle events were missed: looking at every dongle again"
                );
                shared.resync_dongles();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
        shared.devices_changed();
    }
}

/// Follows the local endpoints as they open and close: their frames go to the data plane, and the
/// server learns of them as it does of dongles.
async fn watch_endpoints(shared: Arc<Shared>, mut events: broadcast::Receiver<EndpointEvent>) {
    loop {
        match events.recv().await {
            Ok(EndpointEvent::Appeared { device_id, .. }) => shared.start_pump(device_id),
            Ok(EndpointEvent::Gone { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "endpoint events were missed: looking at every endpoint again"
                );
                for endpoint in shared.devices.endpoints.list() {
                    shared.start_pump(endpoint.device_id);
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
        shared.devices_changed();
    }
}

impl Shared {
    /// Starts a task of the daemon: tracked, and ended at shutdown.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = task => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    /// Moves the frames of device `device_id` into the data plane; nothing when it has no open link or
    /// its frames are already taken (each device hands its queue out once per session or opening).
    fn start_pump(self: &Arc<Self>, device_id: DeviceId) {
        if let Some(frames) = self
            .devices
            .get(&device_id)
            .and_then(|device| device.take_frames())
        {
            self.spawn(dataplane::pump(self.clone(), device_id, frames));
            // Once per session too (its frames are taken once): a dongle that counts its own losses
            // is watched for them.
            if let Some(session) = self.devices.dongles.session(&device_id)
                && session.info().has(firmware_proto::caps::BUS_STATUS)
            {
                self.spawn(bus_losses::watch(self.clone(), session));
            }
        }
    }

    /// A dongle's session opened: its frames go to the data plane, and it is given its token.
    fn dongle_appeared(self: &Arc<Self>, device_id: DeviceId) {
        self.start_pump(device_id);
        if let Some(reports) = self
            .devices
            .dongles
            .session(&device_id)
            .and_then(|s| s.take_telemetry())
        {
            self.spawn(telemetry::pump(self.clone(), device_id, reports));
        }
        let shared = self.clone();
        self.spawn(async move { shared.authorize(device_id).await });
    }

    fn dongle_gone(&self, device_id: &DeviceId) {
        self.authorized.lock().unwrap().remove(device_id);
        self.ready.lock().unwrap().remove(device_id);
        self.pairing.lock().unwrap().remove(device_id);
    }

    /// After missed dongle events, from the manager's state: what is kept about dongles that are gone
    /// is forgotten, and every dongle present is pumped and authorised (both do nothing twice; a
    /// session that is not authenticated is authorised again, in case it is a new one).
    fn resync_dongles(self: &Arc<Self>) {
        let present: HashSet<DeviceId> = self
            .devices
            .dongles
            .list()
            .into_iter()
            .map(|(info, _)| info.device_id)
            .collect();
        let known: Vec<DeviceId> = self.authorized.lock().unwrap().iter().copied().collect();
        for device_id in known {
            let fresh = self
                .devices
                .dongles
                .session(&device_id)
                .is_none_or(|s| !s.is_authenticated());
            if !present.contains(&device_id) || fresh {
                self.dongle_gone(&device_id);
            }
        }
        for device_id in present {
            self.dongle_appeared(device_id);
        }
    }

    /// Queues a message on the current connection; dropped while disconnected (device reports are
    /// re-sent in full on connect, and command results live in the journal).
    fn send(&self, message: AgentMessage) {
        if let Some(tx) = self.outbound.lock().unwrap().as_ref()
            && tx.try_send(message).is_err()
        {
            tracing::warn!(
                "the connection to the server is congested; a message waits for the next report"
            );
        }
    }

    /// The dongles as the server's device report lists them.
    fn reports(&self) -> Vec<DongleReport> {
        let now = Instant::now();
        let pairing = {
            let mut pairing = self.pairing.lock().unwrap();
            pairing.retain(|_, until| *until > now);
            pairing.keys().copied().collect::<HashSet<_>>()
        };
        self.devices.dongles.set_pairing_active(!pairing.is_empty());
        let vault = self.vault.lock().unwrap();
        let mut reports: Vec<DongleReport> = self
            .devices
            .dongles
            .list()
            .into_iter()
            .map(|(info, location)| DongleReport {
                device_id: info.device_id,
                fw_build: info.fw_build.clone(),
                proto_ver: u8::try_from(info.proto_ver).unwrap_or(u8::MAX),
                capabilities: info.capabilities,
                transport: match location {
                    Location::Serial { path } => Transport::Usb {
                        path: path.display().to_string(),
                        serial_number: None,
                    },
                    Location::Lan { addr, .. } => Transport::Lan {
                        addr: addr.to_string(),
                    },
                },
                pairing_mode: info.pairing_mode || pairing.contains(&info.device_id),
                present: true,
                claimed: vault.get(&info.device_id).ok().flatten().is_some(),
            })
            .collect();
        if self.server_protocol.load(Ordering::Relaxed) >= control_proto::LOCAL_ENDPOINTS_SINCE {
            reports.extend(self.devices.endpoints.list().iter().map(local_report));
        }
        reports
    }

    /// Notes the server's protocol version from its `welcome`.
    fn server_speaks(&self, protocol: u32) {
        self.server_protocol.store(protocol, Ordering::Relaxed);
    }

    /// Sends the full device report and records it in the status file.
    fn devices_changed(&self) {
        let dongles = self.reports();
        self.status.update(|s| s.dongles = dongles.clone());
        self.send(AgentMessage::Devices(control_proto::Devices { dongles }));
    }

    fn pairing_opened(self: &Arc<Self>, device_id: DeviceId, window: Duration) {
        self.pairing
            .lock()
            .unwrap()
            .insert(device_id, Instant::now() + window);
        self.devices_changed();
        // Report again when the window ends, so the server does not show it open any longer.
        let shared = self.clone();
        self.spawn(async move {
            tokio::time::sleep(window).await;
            shared.devices_changed();
        });
    }

    fn pairing_closed(&self, device_id: &DeviceId) {
        self.pairing.lock().unwrap().remove(device_id);
    }

    /// Keeps a token the server handed over, and authenticates the dongle's session with it.
    async fn store_token(self: &Arc<Self>, device_id: DeviceId, token: DongleToken) {
        let changed = {
            let mut vault = self.vault.lock().unwrap();
            let known = vault.get(&device_id).ok().flatten();
            if known.as_ref().is_some_and(|t| t.ct_eq(token.as_bytes())) {
                false
            } else if let Err(e) = vault.put(&device_id, &token) {
                tracing::error!(%device_id, error = %e, "could not store the dongle's token");
                return;
            } else {
                true
            }
        };
        if changed {
            self.authorized.lock().unwrap().remove(&device_id);
            self.ready.lock().unwrap().remove(&device_id);
            self.devices_changed();
        }
        self.authorize(device_id).await;
    }

    /// Authenticates the dongle's session with the vault's token, once per session. A dongle that
    /// turns the token down (it was reset, or holds another one) is reported to the server.
    async fn authorize(self: &Arc<Self>, device_id: DeviceId) {
        let token = match self.vault.lock().unwrap().get(&device_id) {
            Ok(Some(token)) => token,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(%device_id, error = %e, "the dongle's token cannot be read");
                return;
            }
        };
        let Some(session) = self.devices.dongles.session(&device_id) else {
            return;
        };
        if !self.authorized.lock().unwrap().insert(device_id) {
            return;
        }
        let verdict = match session.authenticate(token).await {
            Ok(()) => verify(&session).await,
            Err(e) => Err(e),
        };
        match verdict {
            Ok(()) => {
                tracing::info!(%device_id, "authenticated to the dongle");
                self.ready.lock().unwrap().insert(device_id);
                // A dongle the server marked RESET_DETECTED after a refusal that was really a bad link
                // is the owner's again.
                if self.server_protocol.load(Ordering::Relaxed)
                    >= control_proto::TOKEN_ACCEPTED_SINCE
                {
                    self.send(AgentMessage::Event(Event::TokenAccepted { device_id }));
                }
            }
            // A dongle with session authentication refuses a wrong token in words; its silence is a
            // link that loses answers, not a refusal: try again later instead of reporting a reset.
            Err(SessionError::Timeout { .. })
                if !session.is_closed() && session.uses_session_auth() =>
            {
                tracing::warn!(%device_id, "the dongle did not answer its authentication: trying again later");
                self.authorized.lock().unwrap().remove(&device_id);
                self.ready.lock().unwrap().remove(&device_id);
                self.retry_authorize(device_id);
            }
            Err(SessionError::AuthRefused(_)) | Err(SessionError::Timeout { .. })
                if !session.is_closed() =>
            {
                tracing::warn!(%device_id, "the dongle turned down its token (reset or re-paired elsewhere)");
                session.deauthenticate();
                self.authorized.lock().unwrap().remove(&device_id);
                self.ready.lock().unwrap().remove(&device_id);
                self.send(AgentMessage::Event(Event::TokenRejected { device_id }));
                // On plain REMP v1 silence is also how a bad link looks: ask again later, and a dongle
                // that takes the token then is reported accepted (and recovers on the server).
                if !session.uses_session_auth() {
                    self.retry_authorize(device_id);
                }
            }
            Err(e) => {
                tracing::warn!(%device_id, error = %e, "could not authenticate to the dongle");
                self.authorized.lock().unwrap().remove(&device_id);
                self.ready.lock().unwrap().remove(&device_id);
            }
        }
    }

    /// Authenticates to the dongle again after [`AUTH_RETRY`], if its session still lives then.
    fn retry_authorize(self: &Arc<Self>, device_id: DeviceId) {
        let shared = self.clone();
        self.spawn(async move {
            tokio::time::sleep(AUTH_RETRY).await;
            shared.authorize(device_id).await;
        });
    }

    /// A command ended: journal it first (on a blocking thread: the journal syncs to disk), then send
    /// it if connected.
    async fn command_finished(self: Arc<Self>, result: CommandResult) {
        let journaled = {
            let (shared, result) = (self.clone(), result.clone());
            tokio::task::spawn_blocking(move || shared.journal.finish(result))
                .await
                .unwrap_or_else(|e| Err(JournalError::Interrupted(e.to_string())))
        };
        if let Err(e) = journaled {
            tracing::error!(command_id = %result.command_id, error = %e, "could not journal a command result");
        }
        self.send_result(result);
    }

    /// Sends a command result on the current connection. A full queue does not drop it: a task waits
    /// for room (a connection that closes meanwhile drops it, and the journal sends it again on the
    /// next). Results may so arrive out of order, which their ids make harmless.
    fn send_result(&self, result: CommandResult) {
        let Some(tx) = self.outbound.lock().unwrap().clone() else {
            // Disconnected: the journal sends it on connecting.
            return;
        };
        match tx.try_send(AgentMessage::CommandResult(result)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                self.spawn(async move {
                    let _ = tx.send(message).await;
                });
            }
        }
    }
}

/// A local endpoint as the device report lists it: present while open, with the capabilities of its
/// kind, and "claimed", since it belongs to the agent's user without pairing.
fn local_report(endpoint: &LocalEndpoint) -> DongleReport {
    let info = endpoint.info.as_ref();
    DongleReport {
        device_id: endpoint.device_id,
        fw_build: info
            .and_then(|i| i.version.clone())
            .unwrap_or_else(|| format!("local {}", endpoint.spec.kind())),
        proto_ver: 1,
        capabilities: info.map_or(firmware_proto::caps::CAN_BATCH, |i| i.capabilities()),
        transport: Transport::Local {
            endpoint: endpoint.spec.kind().to_string(),
            identity: endpoint.spec.identity(),
            location: info.map_or_else(|| endpoint.spec.to_string(), |i| i.location.clone()),
            can_set_timing: info.is_some_and(|i| i.can_set_timing),
        },
        pairing_mode: false,
        present: endpoint.present(),
        claimed: true,
    }
}

/// Checks that a dongle authenticated by raw token answers authenticated requests: a REMP v1 dongle
/// drops a packet with a wrong token without a word, so silence from a dongle that is still connected
/// is the only sign. Three tries, so one lost packet is not taken for a refusal.
async fn verify(session: &crate::session::DongleSession) -> Result<(), SessionError> {
    let mut last = None;
    for _ in 0..3 {
        match session.can_config_get().await {
            Ok(_) => return Ok(()),
            Err(e @ SessionError::Timeout { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("three tries"))
}
