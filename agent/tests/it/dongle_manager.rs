//! The dongle manager against real simulators: a dongle on a pseudo-terminal and one on UDP appear,
//! go when unplugged, and are served again when plugged back in, without restarting anything.

use std::net::SocketAddr;
use std::time::Duration;

use bridge_agent::discovery::scan::{Location, ScanPlan};
use bridge_agent::dongles::{DongleEvent, DongleManager, ManagerConfig};
use bridge_agent::transport::udp::UdpHub;
use dongle_sim::{LinkConfig, SimConfig, Simulator};
use firmware_proto::ids::{CorrelationId, DeviceId};
use firmware_proto::remp::PairingStatus;
use tokio::sync::broadcast;

/// SPEC 5: new and removed ports are noticed within 2 s. A little slack for a loaded CI machine.
const NOTICE: Duration = Duration::from_millis(2500);

async fn next_event(
    events: &mut broadcast::Receiver<DongleEvent>,
    within: Duration,
) -> DongleEvent {
    tokio::time::timeout(within, events.recv())
        .await
        .expect("an event in time")
        .expect("the manager runs")
}

fn plan() -> ScanPlan {
    ScanPlan {
        usb_filter: Vec::new(),
        broadcast: false,
        ..ScanPlan::default()
    }
}

async fn hub() -> UdpHub {
    UdpHub::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

async fn answers_pairing(manager: &DongleManager, device_id: DeviceId) {
    let session = manager.session(&device_id).expect("served");
    let ack = session
        .pairing_start(CorrelationId([1; 16]))
        .await
        .expect("the served dongle answers");
    assert_eq!(ack.status, PairingStatus::Ok);
}

#[tokio::test]
async fn a_serial_dongle_appears_goes_and_comes_back_at_the_same_link() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dongle0");
    let mut config = SimConfig::serial(dir.path().join("flash.json"));
    config.link = LinkConfig::Serial {
        link: Some(link.clone()),
    };
    let sim = Simulator::start(config).await.unwrap();

    let (manager, mut events) = DongleManager::start(
        ManagerConfig::new(ScanPlan {
            explicit_ports: vec![link.clone()],
            ..plan()
        }),
        hub().await,
    );

    let DongleEvent::Appeared { info, location } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to appear");
    };
    assert_eq!(info.device_id, sim.device_id());
    assert_eq!(location, Location::Serial { path: link.clone() });
    assert_eq!(manager.list().len(), 1);
    answers_pairing(&manager, sim.device_id()).await;

    sim.unplug().await;
    let DongleEvent::Gone { device_id } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to go");
    };
    assert_eq!(device_id, sim.device_id());
    assert!(manager.list().is_empty());

    sim.replug().await;
    let DongleEvent::Appeared { info, .. } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to come back");
    };
    assert_eq!(info.device_id, sim.device_id());
    answers_pairing(&manager, sim.device_id()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_lan_dongle_appears_and_goes_after_missed_scans() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::udp(dir.path().join("flash.json")))
        .await
        .unwrap();
    let mut config = ManagerConfig::new(ScanPlan {
        udp_targets: vec![sim.discovery_addr().unwrap()],
        ..plan()
    });
    config.lan_idle = Duration::from_millis(200);
    let (manager, mut events) = DongleManager::start(config, hub().await);

    let DongleEvent::Appeared { info, location } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to appear");
    };
    assert_eq!(info.device_id, sim.device_id());
    assert_eq!(
        location,
        Location::Lan {
            addr: sim.udp_addr().unwrap(),
            interface: None
        }
    );
    answers_pairing(&manager, sim.device_id()).await;

    // Unplugged, a LAN dongle simply goes silent; three missed scans later it is gone.
    sim.unplug().await;
    let DongleEvent::Gone { device_id } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to go");
    };
    assert_eq!(device_id, sim.device_id());

    sim.replug().await;
    let DongleEvent::Appeared { info, .. } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to come back");
    };
    assert_eq!(info.device_id, sim.device_id());
    answers_pairing(&manager, sim.device_id()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_port_that_is_not_a_dongle_is_left_alone() {
    // A pseudo-terminal nobody answers on: probed once, then rested.
    let pty = nix::pty::openpty(None, None).unwrap();
    let path = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
    ))
    .unwrap();
    let (manager, mut events) = DongleManager::start(
        ManagerConfig::new(ScanPlan {
            explicit_ports: vec![path],
            ..plan()
        }),
        hub().await,
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), events.recv())
            .await
            .is_err(),
        "a silent port must not become a dongle"
    );
    assert!(manager.list().is_empty());
    drop(pty);
}

/// The daemon subscribed to the manager's events after its scans had started, and on a loaded
/// machine a LAN dongle could answer the first scan in between: its "appeared" was missed, so the
/// agent never read its frames nor its BUS_STATUS counters (the loss test failed about one run in
/// three in CI). Whatever the caller does after the start, the first dongle's arrival is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dongle_found_before_the_caller_looks_at_the_events_is_still_announced() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimConfig::udp(dir.path().join("flash.json")))
        .await
        .unwrap();
    let config = ManagerConfig::new(ScanPlan {
        udp_targets: vec![sim.discovery_addr().unwrap()],
        ..plan()
    });
    let (manager, mut events) = DongleManager::start(config, hub().await);
    // A caller that is slow to get to its events (preempted on a busy machine).
    while manager.list().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let DongleEvent::Appeared { info, .. } = next_event(&mut events, NOTICE).await else {
        panic!("expected the dongle to appear");
    };
    assert_eq!(info.device_id, sim.device_id());
    sim.shutdown().await;
}
