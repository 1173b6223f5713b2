//! The local endpoints the daemon serves, as dongles of the agent's user.
//!
//! [`EndpointSet::start`] reads `endpoints.json`, opens every endpoint in a task of its own and keeps
//! it open: an endpoint that fails to open (an adapter not plugged in) or closes (unplugged) is tried
//! again with a growing delay, and comes back on its own. The file is read again every
//! [`SetOptions::reload_every`], so `bridge-agent endpoint add` and `remove` take effect in a running
//! daemon. Everything the set learns is published as [`EndpointEvent`]s, as the dongle manager does for
//! dongles, and each endpoint carries its derived device id ([`super::local_device_id`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto::ids::DeviceId;
use tokio::sync::broadcast;
use tokio::time::Instant;
use uuid::Uuid;

use control_proto::CanSettings;
use firmware_proto::remp::CanMode;

use super::spec::EndpointSpec;
use super::store::EndpointStore;
use super::{
    AbortOnDrop, CanEndpoint, Effective, EndpointError, EndpointInfo, EndpointOptions,
    local_device_id,
};
use crate::home::Home;

/// Tunables of the set.
#[derive(Debug, Clone)]
pub struct SetOptions {
    pub endpoint: EndpointOptions,
    /// How often `endpoints.json` is read again.
    pub reload_every: Duration,
    /// The first delay before an endpoint that failed is tried again; it doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for SetOptions {
    fn default() -> Self {
        Self {
            endpoint: EndpointOptions::default(),
            reload_every: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// A change in the endpoints served.
#[derive(Debug, Clone)]
pub enum EndpointEvent {
    /// The endpoint is open: its frames can be taken and it can be sent to.
    Appeared {
        device_id: DeviceId,
        info: EndpointInfo,
    },
    /// The endpoint closed, or was removed from `endpoints.json`.
    Gone { device_id: DeviceId },
}

/// One configured endpoint, open or not.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub device_id: DeviceId,
    pub spec: EndpointSpec,
    /// What it is, while it is open.
    pub info: Option<EndpointInfo>,
    /// Why it is not open, when it is not.
    pub last_error: Option<String>,
}

impl LocalEndpoint {
    pub fn present(&self) -> bool {
        self.info.is_some()
    }
}

struct Entry {
    spec: EndpointSpec,
    device_id: DeviceId,
    /// Tells this entry's supervisor from one of an earlier entry with the same identity.
    generation: u64,
    endpoint: Option<Arc<CanEndpoint>>,
    last_error: Option<String>,
    _supervisor: AbortOnDrop,
}

struct Inner {
    agent_id: Uuid,
    store: EndpointStore,
    options: SetOptions,
    entries: Mutex<HashMap<String, Entry>>,
    events: broadcast::Sender<EndpointEvent>,
    next_generation: std::sync::atomic::AtomicU64,
}

/// The local endpoints served, kept open until dropped.
pub struct EndpointSet {
    inner: Arc<Inner>,
    _reloader: AbortOnDrop,
}

impl std::fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSet")
            .field("endpoints", &self.list())
            .finish()
    }
}

impl EndpointSet {
    /// Serves the endpoints of `home`'s `endpoints.json` as agent `agent_id`'s. A damaged file is
    /// logged and read again at the next reload; it does not stop the daemon.
    pub fn start(home: &Home, agent_id: Uuid) -> Self {
        Self::start_with(EndpointStore::new(home), agent_id, SetOptions::default())
    }

    pub fn start_with(store: EndpointStore, agent_id: Uuid, options: SetOptions) -> Self {
        let (events, _) = broadcast::channel(256);
        let inner = Arc::new(Inner {
            agent_id,
            store,
            options,
            entries: Mutex::new(HashMap::new()),
            events,
            next_generation: std::sync::atomic::AtomicU64::new(1),
        });
        inner.reload(&mut None);
        let reloader = AbortOnDrop(tokio::spawn(reload_loop(inner.clone())));
        Self {
            inner,
            _reloader: reloader,
        }
    }

    /// Every change from now on.
    pub fn events(&self) -> broadcast::Receiver<EndpointEvent> {
        self.inner.events.subscribe()
    }

    /// Every configured endpoint, open or not, by device id.
    pub fn list(&self) -> Vec<LocalEndpoint> {
        let entries = self.inner.entries.lock().unwrap();
        let mut list: Vec<LocalEndpoint> = entries
            .values()
            .map(|e| LocalEndpoint {
                device_id: e.device_id,
                spec: e.spec.clone(),
                info: e.endpoint.as_ref().map(|ep| ep.info()),
                last_error: e.last_error.clone(),
            })
            .collect();
        list.sort_by_key(|e| e.device_id);
        list
    }

    /// The open endpoint with `device_id`.
    pub fn endpoint(&self, device_id: &DeviceId) -> Option<Arc<CanEndpoint>> {
        self.lookup(device_id).flatten()
    }

    /// The configured endpoint `device_id` in one look: `None` when there is none, else its open
    /// endpoint, `None` inside while it is not open.
    pub fn lookup(&self, device_id: &DeviceId) -> Option<Option<Arc<CanEndpoint>>> {
        self.inner
            .entries
            .lock()
            .unwrap()
            .values()
            .find(|e| e.device_id == *device_id)
            .map(|e| e.endpoint.clone())
    }

    /// Whether `device_id` is one of the configured endpoints, open or not.
    pub fn contains(&self, device_id: &DeviceId) -> bool {
        self.lookup(device_id).is_some()
    }

    /// Configures the endpoint `device_id` and, where it took the configuration, keeps the new bitrate
    /// and mode in `endpoints.json`, so that it survives a restart as a dongle's configuration does.
    pub async fn configure(
        &self,
        device_id: &DeviceId,
        config: &CanSettings,
    ) -> Result<Effective, EndpointError> {
        let Some(endpoint) = self.endpoint(device_id) else {
            return Err(EndpointError::Closed {
                identity: format!("local endpoint {device_id}"),
            });
        };
        let effective = endpoint.configure(config).await?;
        let identity = endpoint.identity();
        let mut entries = self.inner.entries.lock().unwrap();
        if let Some(entry) = entries.get_mut(&identity)
            && let EndpointSpec::Slcan(settings) = &entry.spec
        {
            let mut settings = settings.clone();
            settings.bitrate = effective.bitrate;
            settings.data_bitrate = effective.data_bitrate;
            settings.listen_only = effective.mode == CanMode::ListenOnly;
            let spec = EndpointSpec::Slcan(settings);
            // Written under the lock, so that the reloader never sees the file and the entry disagree
            // (it would take that for an edit and reopen the endpoint).
            match self.inner.store.add(&spec) {
                Ok(_) => entry.spec = spec,
                Err(e) => {
                    tracing::warn!(endpoint = %identity, error = %e, "the new configuration is applied but not kept")
                }
            }
        }
        Ok(effective)
    }
}

async fn reload_loop(inner: Arc<Inner>) {
    let mut last_problem = None;
    loop {
        tokio::time::sleep(inner.options.reload_every).await;
        inner.reload(&mut last_problem);
    }
}

impl Inner {
    /// Reads `endpoints.json` and makes the served set match it: new endpoints start, removed ones
    /// stop, and ones whose settings changed start again with the new settings.
    fn reload(self: &Arc<Self>, last_problem: &mut Option<String>) {
        let mut entries = self.entries.lock().unwrap();
        // Read under the lock: see `EndpointSet::configure`.
        let specs = match self.store.load() {
            Ok(specs) => {
                *last_problem = None;
                specs
            }
            Err(e) => {
                let text = e.to_string();
                if last_problem.as_ref() != Some(&text) {
                    tracing::warn!(error = %text, "the local endpoints are not read again until this is fixed");
                    *last_problem = Some(text);
                }
                return;
            }
        };
        let wanted: HashMap<String, EndpointSpec> =
            specs.into_iter().map(|s| (s.identity(), s)).collect();
        let stale: Vec<String> = entries
            .iter()
            .filter(|(identity, e)| wanted.get(*identity) != Some(&e.spec))
            .map(|(identity, _)| identity.clone())
            .collect();
        for identity in stale {
            if let Some(entry) = entries.remove(&identity) {
                tracing::info!(endpoint = %identity, "local endpoint no longer served as it was");
                if entry.endpoint.is_some() {
                    let _ = self.events.send(EndpointEvent::Gone {
                        device_id: entry.device_id,
                    });
                }
            }
        }
        for (identity, spec) in wanted {
            if entries.contains_key(&identity) {
                continue;
            }
            let device_id = local_device_id(self.agent_id, &identity);
            let generation = self
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let supervisor = AbortOnDrop(tokio::spawn(supervise(
                self.clone(),
                identity.clone(),
                spec.clone(),
                device_id,
                generation,
            )));
            entries.insert(
                identity,
                Entry {
                    spec,
                    device_id,
                    generation,
                    endpoint: None,
                    last_error: None,
                    _supervisor: supervisor,
                },
            );
        }
    }

    /// Runs `f` on the entry if it is still this supervisor's; false when it is not (removed or
    /// replaced), and the supervisor should stop.
    fn with_entry(&self, identity: &str, generation: u64, f: impl FnOnce(&mut Entry)) -> bool {
        match self.entries.lock().unwrap().get_mut(identity) {
            Some(entry) if entry.generation == generation => {
                f(entry);
                true
            }
            _ => false,
        }
    }
}

/// Keeps one endpoint open for as long as its entry exists.
async fn supervise(
    inner: Arc<Inner>,
    identity: String,
    spec: EndpointSpec,
    device_id: DeviceId,
    generation: u64,
) {
    let mut delay = inner.options.retry_min;
    let mut last_error: Option<String> = None;
    loop {
        let opened_at = Instant::now();
        match CanEndpoint::open(&spec, &inner.options.endpoint).await {
            Ok(endpoint) => {
                let endpoint = Arc::new(endpoint);
                let info = endpoint.info();
                let kept = inner.with_entry(&identity, generation, |e| {
                    e.endpoint = Some(endpoint.clone());
                    e.last_error = None;
                });
                if !kept {
                    return;
                }
                tracing::info!(endpoint = %identity, %device_id, "local endpoint open");
                last_error = None;
                let _ = inner
                    .events
                    .send(EndpointEvent::Appeared { device_id, info });
                endpoint.closed().await;
                let kept = inner.with_entry(&identity, generation, |e| {
                    e.endpoint = None;
                    e.last_error = Some("it closed (unplugged?); opening it again".into());
                });
                drop(endpoint);
                if !kept {
                    // Removed meanwhile: the reload that removed it told the world.
                    return;
                }
                let _ = inner.events.send(EndpointEvent::Gone { device_id });
                tracing::warn!(endpoint = %identity, %device_id, "local endpoint closed; opening it again");
                if opened_at.elapsed() > Duration::from_secs(10) {
                    delay = inner.options.retry_min;
                }
            }
            Err(e) => {
                let text = e.to_string();
                // Said once at warning level; the same failure again is only debug noise.
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!(endpoint = %identity, error = %text, "local endpoint not open; trying again");
                } else {
                    tracing::debug!(endpoint = %identity, error = %text, "local endpoint still not open");
                }
                if !inner.with_entry(&identity, generation, |e| e.last_error = Some(text.clone())) {
                    return;
                }
                last_error = Some(text);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(inner.options.retry_max);
    }
}
