//! The dongles this agent serves: found on both links, one session each, kept current as they come
//! and go.
//!
//! Serial ports are looked at every second, so a dongle plugged in or pulled out is noticed within two;
//! a port that is not a dongle is asked again only every [`NOT_A_DONGLE_RETRY`], so the agent does not
//! pester other devices. A serial dongle is gone when its link closes. LAN dongles are rediscovered at
//! each LAN scan (every few seconds while a pairing is under way, every 20 s otherwise) and are gone
//! after [`LAN_MISSED_SCANS`] scans without an answer. Everything the manager learns is published as
//! [`DongleEvent`]s; the daemon's services (the server link, the data plane) sit on those and on
//! [`DongleManager::session`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto::discovery;
use firmware_proto::ids::DeviceId;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::discovery::scan::{Location, ScanPlan, candidate_ports, discovery_targets};
use crate::session::{DongleInfo, DongleSession, SessionConfig, identify};
use crate::transport::serial;
use crate::transport::udp::UdpHub;

/// How often serial ports are looked at.
pub const SERIAL_SCAN: Duration = Duration::from_secs(1);
/// How long a port that did not answer as a dongle is left alone.
pub const NOT_A_DONGLE_RETRY: Duration = Duration::from_secs(10);
/// LAN scan interval while no pairing is under way (SPEC: 15 to 30 s).
pub const LAN_SCAN_IDLE: Duration = Duration::from_secs(20);
/// LAN scan interval while a pairing is under way (SPEC: 2 to 5 s).
pub const LAN_SCAN_PAIRING: Duration = Duration::from_secs(3);
/// LAN scans a dongle may miss before it counts as gone.
pub const LAN_MISSED_SCANS: u32 = 3;

/// How often the manager looks.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub plan: ScanPlan,
    pub session: SessionConfig,
    /// LAN scan interval while no pairing is under way.
    pub lan_idle: Duration,
    /// LAN scan interval while a pairing is under way.
    pub lan_pairing: Duration,
}

impl ManagerConfig {
    pub fn new(plan: ScanPlan) -> Self {
        Self {
            plan,
            session: SessionConfig::default(),
            lan_idle: LAN_SCAN_IDLE,
            lan_pairing: LAN_SCAN_PAIRING,
        }
    }
}

/// A change in the set of dongles served.
#[derive(Debug, Clone)]
pub enum DongleEvent {
    Appeared {
        info: DongleInfo,
        location: Location,
    },
    Gone {
        device_id: DeviceId,
    },
}

/// One dongle being served.
#[derive(Clone)]
pub struct Served {
    pub info: DongleInfo,
    pub location: Location,
    pub session: Arc<DongleSession>,
    missed_scans: u32,
}

#[derive(Default)]
struct State {
    served: HashMap<DeviceId, Served>,
    /// Serial ports that did not answer as dongles, and when they may be asked again.
    not_dongles: HashMap<PathBuf, Instant>,
}

/// Finds and serves dongles until dropped.
pub struct DongleManager {
    state: Arc<Mutex<State>>,
    pairing_active: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DongleManager {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DongleManager {
    /// Starts scanning as `config` says, with `hub` as the one UDP socket for LAN dongles. The
    /// receiver is subscribed before the scans start, so it sees every change, the first dongle's
    /// arrival included (there is no later subscription, which would miss what came before it).
    pub fn start(config: ManagerConfig, hub: UdpHub) -> (Self, broadcast::Receiver<DongleEvent>) {
        let state = Arc::new(Mutex::new(State::default()));
        let (events, first) = broadcast::channel(256);
        let pairing_active = Arc::new(AtomicBool::new(false));
        let serial = tokio::spawn(serial_loop(
            config.plan.clone(),
            state.clone(),
            events.clone(),
            config.session.clone(),
        ));
        let lan = tokio::spawn(lan_loop(
            config,
            hub,
            state.clone(),
            events,
            pairing_active.clone(),
        ));
        let manager = Self {
            state,
            pairing_active,
            tasks: vec![serial, lan],
        };
        (manager, first)
    }

    /// The dongles served now.
    pub fn list(&self) -> Vec<(DongleInfo, Location)> {
        let state = self.state.lock().unwrap();
        let mut list: Vec<_> = state
            .served
            .values()
            .map(|s| (s.info.clone(), s.location.clone()))
            .collect();
        list.sort_by_key(|(info, _)| info.device_id);
        list
    }

    /// The session of a served dongle.
    pub fn session(&self, device_id: &DeviceId) -> Option<Arc<DongleSession>> {
        self.state
            .lock()
            .unwrap()
            .served
            .get(device_id)
            .map(|s| s.session.clone())
    }

    /// Scans the LAN more often while a pairing is under way.
    pub fn set_pairing_active(&self, active: bool) {
        self.pairing_active.store(active, Ordering::Relaxed);
    }
}

async fn serial_loop(
    plan: ScanPlan,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<DongleEvent>,
    config: SessionConfig,
) {
    let mut tick = tokio::time::interval(SERIAL_SCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for path in candidate_ports(&plan) {
            {
                let st = state.lock().unwrap();
                let served = st
                    .served
                    .values()
                    .any(|s| matches!(&s.location, Location::Serial { path: p } if *p == path));
                let resting = st
                    .not_dongles
                    .get(&path)
                    .is_some_and(|until| Instant::now() < *until);
                if served || resting || !path.exists() {
                    continue;
                }
            }
            let served = async {
                let mut link = serial::open(&path).await.map_err(|e| e.to_string())?;
                let info = identify(&mut link, Duration::from_millis(1000))
                    .await
                    .map_err(|e| e.to_string())?;
                DongleSession::start(link, info, config.clone()).map_err(|e| e.to_string())
            }
            .await;
            match served {
                Ok(session) => {
                    let location = Location::Serial { path: path.clone() };
                    serve(&state, &events, session, location);
                }
                Err(reason) => {
                    tracing::debug!(port = %path.display(), %reason, "not a dongle");
                    state
                        .lock()
                        .unwrap()
                        .not_dongles
                        .insert(path, Instant::now() + NOT_A_DONGLE_RETRY);
                }
            }
        }
    }
}

/// Registers a new session, and watches its link so that the dongle is dropped when the link closes.
fn serve(
    state: &Arc<Mutex<State>>,
    events: &broadcast::Sender<DongleEvent>,
    session: DongleSession,
    location: Location,
) {
    let info = session.info().clone();
    let device_id = info.device_id;
    let session = Arc::new(session);
    let replaced = state.lock().unwrap().served.insert(
        device_id,
        Served {
            info: info.clone(),
            location: location.clone(),
            session: session.clone(),
            missed_scans: 0,
        },
    );
    if replaced.is_some() {
        // The same dongle on a second link (USB and LAN at once): the newest link serves it.
        tracing::info!(%device_id, "dongle moved to {location}");
    }
    tracing::info!(%device_id, "dongle appeared on {location}");
    let _ = events.send(DongleEvent::Appeared { info, location });
    let state = state.clone();
    let events = events.clone();
    tokio::spawn(async move {
        session.closed().await;
        let mut st = state.lock().unwrap();
        // Only the session that closed is removed: a newer one for the same dongle stays.
        if st
            .served
            .get(&device_id)
            .is_some_and(|s| Arc::ptr_eq(&s.session, &session))
        {
            st.served.remove(&device_id);
            drop(st);
            tracing::info!(%device_id, "dongle gone");
            let _ = events.send(DongleEvent::Gone { device_id });
        }
    });
}

async fn lan_loop(
    config: ManagerConfig,
    hub: UdpHub,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<DongleEvent>,
    pairing_active: Arc<AtomicBool>,
) {
    let plan = &config.plan;
    if !plan.broadcast && plan.udp_targets.is_empty() {
        return;
    }
    let mut announces = hub.announces();
    let mut seq: u32 = 0;
    loop {
        seq = seq.wrapping_add(1);
        let targets: Vec<std::net::SocketAddr> = discovery_targets(plan)
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        for target in &targets {
            if let Err(e) = hub.discover(*target, seq).await {
                tracing::debug!(%target, error = %e, "DISCOVER not sent");
            }
        }
        let interval = if pairing_active.load(Ordering::Relaxed) {
            config.lan_pairing
        } else {
            config.lan_idle
        };
        let deadline = Instant::now() + interval;
        let mut answered: Vec<DeviceId> = Vec::new();
        loop {
            let datagram = match tokio::time::timeout_at(deadline, announces.recv()).await {
                Ok(Ok(d)) => d,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
                Err(_) => break,
            };
            let Ok(discovery::Packet {
                body: discovery::Body::Announce(a),
                ..
            }) = discovery::decode(&datagram.bytes)
            else {
                continue;
            };
            let info = DongleInfo::from_announce(&a);
            let device_id = info.device_id;
            answered.push(device_id);
            let addr = std::net::SocketAddr::new(datagram.from.ip(), a.udp_port);
            let known = {
                let mut st = state.lock().unwrap();
                match st.served.get_mut(&device_id) {
                    Some(s) => {
                        s.missed_scans = 0;
                        // Pairing state and nonce change over time; keep the latest.
                        s.info = info.clone();
                        true
                    }
                    None => false,
                }
            };
            if !known {
                let link = hub.link(device_id, addr);
                match DongleSession::start(link, info, config.session.clone()) {
                    Ok(session) => serve(
                        &state,
                        &events,
                        session,
                        Location::Lan {
                            addr,
                            interface: None,
                        },
                    ),
                    Err(e) => tracing::warn!(%device_id, error = %e, "LAN dongle not served"),
                }
            }
        }
        // LAN dongles that stopped answering.
        let gone: Vec<DeviceId> = {
            let mut st = state.lock().unwrap();
            let mut gone = Vec::new();
            for (id, s) in st.served.iter_mut() {
                if matches!(s.location, Location::Lan { .. }) && !answered.contains(id) {
                    s.missed_scans += 1;
                    if s.missed_scans >= LAN_MISSED_SCANS {
                        gone.push(*id);
                    }
                }
            }
            for id in &gone {
                st.served.remove(id);
            }
            gone
        };
        for device_id in gone {
            hub.unlink(&device_id);
            tracing::info!(%device_id, "LAN dongle gone");
            let _ = events.send(DongleEvent::Gone { device_id });
        }
    }
}
