//! One look for dongles on both links: serial ports that answer DISCOVER, and LAN dongles that answer a
//! broadcast or unicast DISCOVER. `bridge-agent list` shows one scan; the daemon repeats them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use firmware_proto::discovery;
use firmware_proto::ids::DeviceId;
use tokio::time::Instant;

use super::lan_interfaces;
use super::usb_ports::{self, UsbId};
use crate::session::{DongleInfo, identify};
use crate::transport::{serial, udp::UdpHub};

/// The UDP port dongles listen for DISCOVER on.
pub const DEFAULT_DISCOVERY_PORT: u16 = 50_000;

/// Where one scan looks.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    /// Serial ports whose USB id is in this list are probed.
    pub usb_filter: Vec<UsbId>,
    /// Serial ports probed whatever their USB id (a pseudo-terminal, an adapter with another id).
    pub explicit_ports: Vec<PathBuf>,
    /// Broadcast DISCOVER on every eligible interface.
    pub broadcast: bool,
    pub discovery_port: u16,
    /// Dongles asked directly (networks without broadcast, and tests).
    pub udp_targets: Vec<SocketAddr>,
    /// How long to wait for answers.
    pub wait: Duration,
}

impl Default for ScanPlan {
    fn default() -> Self {
        Self {
            usb_filter: vec![usb_ports::STM32_VCP],
            explicit_ports: Vec::new(),
            broadcast: true,
            discovery_port: DEFAULT_DISCOVERY_PORT,
            udp_targets: Vec::new(),
            wait: Duration::from_millis(1500),
        }
    }
}

/// How a dongle was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Serial {
        path: PathBuf,
    },
    Lan {
        addr: SocketAddr,
        interface: Option<String>,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Serial { path } => write!(f, "usb {}", path.display()),
            Location::Lan {
                addr,
                interface: Some(i),
            } => write!(f, "lan {addr} ({i})"),
            Location::Lan { addr, .. } => write!(f, "lan {addr}"),
        }
    }
}

/// One dongle found, with every place it answered from (a dongle on USB and on the LAN at once shows
/// both).
#[derive(Debug, Clone)]
pub struct Found {
    pub info: DongleInfo,
    pub locations: Vec<Location>,
}

/// What a port or target said when it was not a dongle.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub place: String,
    pub reason: String,
}

/// The serial ports worth asking: those whose USB id passes the filter, then the explicit ones.
pub fn candidate_ports(plan: &ScanPlan) -> Vec<PathBuf> {
    let mut ports: Vec<PathBuf> = usb_ports::matching(usb_ports::available(), &plan.usb_filter)
        .into_iter()
        .map(|p| p.path)
        .collect();
    for p in &plan.explicit_ports {
        if !ports.contains(p) {
            ports.push(p.clone());
        }
    }
    ports
}

/// Where DISCOVER goes: the explicit targets, and the broadcast address of every eligible interface
/// (with the interface's name) when broadcasting is on.
pub fn discovery_targets(plan: &ScanPlan) -> Vec<(SocketAddr, Option<String>)> {
    let mut targets: Vec<(SocketAddr, Option<String>)> =
        plan.udp_targets.iter().map(|t| (*t, None)).collect();
    if plan.broadcast
        && let Ok(interfaces) = lan_interfaces::system_interfaces()
    {
        targets.extend(lan_interfaces::eligible(&interfaces).into_iter().map(|t| {
            (
                SocketAddr::from((t.broadcast, plan.discovery_port)),
                Some(t.interface),
            )
        }));
    }
    targets
}

/// Runs one scan and merges what answered by device id.
pub async fn scan(plan: &ScanPlan, hub: &UdpHub) -> (Vec<Found>, Vec<Skipped>) {
    let ports = candidate_ports(plan);

    let mut announces = hub.announces();
    let targets = discovery_targets(plan);
    let mut skipped = Vec::new();
    for (target, _) in &targets {
        if let Err(e) = hub.discover(*target, 1).await {
            skipped.push(Skipped {
                place: target.to_string(),
                reason: e.to_string(),
            });
        }
    }

    let serial_probes = ports.into_iter().map(|path| async move {
        let result = async {
            let mut link = serial::open(&path).await.map_err(|e| e.to_string())?;
            identify(&mut link, Duration::from_millis(1000))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        (path, result)
    });
    let serial_results = futures::future::join_all(serial_probes);

    let deadline = Instant::now() + plan.wait;
    let lan_results = async {
        let mut seen: Vec<(SocketAddr, DongleInfo)> = Vec::new();
        while let Ok(Ok(datagram)) = tokio::time::timeout_at(deadline, announces.recv()).await {
            if let Ok(discovery::Packet {
                body: discovery::Body::Announce(a),
                ..
            }) = discovery::decode(&datagram.bytes)
            {
                // The dongle answers from its discovery socket; REMP goes to the port it announces.
                let addr = SocketAddr::new(datagram.from.ip(), a.udp_port);
                seen.push((addr, DongleInfo::from_announce(&a)));
            }
        }
        seen
    };
    let (serial_results, lan_results) = tokio::join!(serial_results, lan_results);

    let mut found: BTreeMap<DeviceId, Found> = BTreeMap::new();
    let mut add = |info: DongleInfo, location: Location| {
        let entry = found.entry(info.device_id).or_insert_with(|| Found {
            info: info.clone(),
            locations: Vec::new(),
        });
        if !entry.locations.contains(&location) {
            entry.locations.push(location);
        }
    };
    for (path, result) in serial_results {
        match result {
            Ok(info) => add(info, Location::Serial { path }),
            Err(reason) => skipped.push(Skipped {
                place: path.display().to_string(),
                reason,
            }),
        }
    }
    for (addr, info) in lan_results {
        let interface = targets
            .iter()
            .find_map(|(t, i)| i.as_ref().filter(|_| same_subnet_hint(t, &addr)).cloned());
        add(info, Location::Lan { addr, interface });
    }
    (found.into_values().collect(), skipped)
}

/// Whether a dongle at `addr` answered a broadcast to `target` (same /24, a hint good enough to name the
/// interface in a listing).
fn same_subnet_hint(target: &SocketAddr, addr: &SocketAddr) -> bool {
    match (target.ip(), addr.ip()) {
        (std::net::IpAddr::V4(t), std::net::IpAddr::V4(a)) => t.octets()[..3] == a.octets()[..3],
        _ => false,
    }
}
