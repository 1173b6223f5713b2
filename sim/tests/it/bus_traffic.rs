//! The virtual bus, the CAN modes, the generator and replay, and two simulators in two
//! processes sharing a bus.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use dongle_sim::traffic::sequence_of;
use dongle_sim::{BusTap, Extensions, SimConfig, SimEvent, SimHandle};
use firmware_proto::ids::DeviceId;
use firmware_proto::remp::{CanConfig, CanMode, ConfigAction};
use tokio::io::AsyncBufReadExt;

struct Bench {
    _dir: tempfile::TempDir,
    sim: SimHandle,
    host: Host,
    tap: BusTap,
}

/// A claimed simulator on a fresh bus, a host that has authenticated, and a tap on the bus.
async fn bench(serial: bool, tweak: impl FnOnce(&mut SimConfig)) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let state = state_in(&dir);
    provision_claimed(&state, DeviceId([0xB0, 0, 0, 0, 0, 0, 0, 1]));
    let mut config = if serial {
        SimConfig::serial(&state)
    } else {
        SimConfig::udp(&state)
    };
    config.bus = Some("bench".into());
    config.bus_root = Some(root.clone());
    tweak(&mut config);
    let sim = start(config).await;
    let mut tap = BusTap::join_at(&root, "bench").unwrap();
    assert!(tap.wait_for_peers(1, WAIT).await);
    let mut host = Host::connect(&sim).await;
    // Any authenticated packet makes this host the one frames flow to.
    host.config(CanConfig::get()).await.unwrap();
    // Let the simulator's sender notice the tap.
    tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
    Bench {
        _dir: dir,
        sim,
        host,
        tap,
    }
}

async fn tap_recv(tap: &mut BusTap, wait: Duration) -> Option<dongle_sim::Frame> {
    tokio::time::timeout(wait, tap.recv())
        .await
        .ok()
        .map(|r| r.unwrap())
}

#[tokio::test]
async fn normal_mode_puts_host_frames_on_the_bus_and_bus_frames_to_the_host() {
    let mut b = bench(true, |_| {}).await;
    b.host.send_frame(&frame("123#DEADBEEF")).await;
    assert_eq!(
        tap_recv(&mut b.tap, WAIT).await.unwrap().to_string(),
        "123#DEADBEEF"
    );
    assert!(
        b.host.recv_frames(1, QUIET).await.is_empty(),
        "normal mode does not echo"
    );

    b.tap
        .send_all(&[frame("7E8#0641000000000000"), frame("18DAF110#0102")])
        .await;
    let got = b.host.recv_frames(2, WAIT).await;
    let got: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got, ["7E8#0641000000000000", "18DAF110#0102"]);
    assert_eq!(b.sim.stats().dongle.frames_to_bus, 1);
    b.sim.shutdown().await;
}

#[tokio::test]
async fn listen_only_never_transmits_but_still_receives() {
    let mut b = bench(false, |_| {}).await;
    b.host.set_mode(CanMode::ListenOnly).await;
    for _ in 0..5 {
        b.host.send_frame(&frame("123#01")).await;
    }
    assert!(
        tap_recv(&mut b.tap, QUIET).await.is_none(),
        "listen-only transmitted"
    );
    assert!(b.host.recv_frames(1, QUIET).await.is_empty());
    assert_eq!(b.sim.stats().dongle.tx_refused, 5);
    b.tap.send(&frame("321#AA")).await;
    assert_eq!(b.host.recv_frames(1, WAIT).await.len(), 1);
    b.sim.shutdown().await;
}

#[tokio::test]
async fn loopback_modes_echo_with_the_loopback_flag() {
    let mut b = bench(true, |_| {}).await;
    b.host.set_mode(CanMode::Loopback).await;
    b.host.send_frame(&frame("123#0102")).await;
    let echo = b.host.recv_frames(1, WAIT).await;
    assert_eq!(echo.len(), 1);
    assert!(echo[0].is_loopback());
    assert_eq!(echo[0].data(), [1, 2]);
    assert!(
        tap_recv(&mut b.tap, QUIET).await.is_none(),
        "internal loopback stays off the bus"
    );

    b.host.set_mode(CanMode::ExtLoop).await;
    b.host.send_frame(&frame("124#03")).await;
    let echo = b.host.recv_frames(1, WAIT).await;
    assert!(echo[0].is_loopback());
    assert_eq!(
        tap_recv(&mut b.tap, WAIT).await.unwrap().to_string(),
        "124#03"
    );
    b.sim.shutdown().await;
}

#[tokio::test]
async fn generated_frames_arrive_in_order_without_loss() {
    let mut b = bench(true, |c| c.generate = Some(2000.0)).await;
    // The host and a tap on the bus read the stream at the same time; both must see it whole.
    let tap = &mut b.tap;
    let on_bus = async move {
        let mut seqs = Vec::new();
        while seqs.len() < 1000 {
            seqs.push(sequence_of(&tap_recv(tap, WAIT).await.expect("bus frame")).unwrap());
        }
        seqs
    };
    let (frames, on_bus) = tokio::join!(b.host.recv_frames(1000, Duration::from_secs(5)), on_bus);
    assert_eq!(frames.len(), 1000);
    assert!(
        frames
            .iter()
            .all(|f| f.is_simulated() && f.id() == can_id(0x100))
    );
    let at_host: Vec<u32> = frames.iter().map(|f| sequence_of(f).unwrap()).collect();
    for pair in at_host.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "order or loss at the host");
    }
    // The tap was not read while the bench was set up, so its queue overflowed then (counted
    // as lost by the sender); from the time it is read, nothing is lost and order holds.
    for pair in on_bus.windows(2) {
        assert!(pair[1] > pair[0], "order on the bus");
    }
    for pair in on_bus[500..].windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "loss on the bus while read");
    }
    b.sim.shutdown().await;
}

#[tokio::test]
async fn generated_fd_frames_travel_in_batches() {
    let mut b = bench(false, |c| {
        c.generate = Some(500.0);
        c.fd = true;
        c.extensions = Extensions::ALL;
    })
    .await;
    let frames = b.host.recv_frames(50, WAIT).await;
    assert_eq!(frames.len(), 50);
    assert!(frames.iter().all(|f| f.is_fd() && f.data().len() == 64));
    b.sim.shutdown().await;
}

fn obd2_log() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/obd2-session.log");
    assert!(
        path.exists(),
        "the OBD-II test log is missing: {}",
        path.display()
    );
    path
}

#[tokio::test]
async fn the_obd2_log_replays_in_order_with_its_timing_scaled() {
    let log = dongle_sim::traffic::CandumpLog::read(&obd2_log()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let mut tap = BusTap::join_at(&root, "replay").unwrap();
    let mut config = SimConfig::serial(state_in(&dir));
    config.bus = Some("replay".into());
    config.bus_root = Some(root.clone());
    config.replay = Some(obd2_log());
    config.replay_speed = 10.0;
    let started = Instant::now();
    let sim = start(config).await;
    let mut events = sim.events();
    let mut got = Vec::new();
    while got.len() < log.entries.len() {
        got.push(tap_recv(&mut tap, WAIT).await.expect("replayed frame"));
    }
    let elapsed = started.elapsed();
    let (frames, skipped) = wait_event(&mut events, |e| match e {
        SimEvent::ReplayFinished {
            frames,
            skipped_remote,
        } => Some((*frames, *skipped_remote)),
        _ => None,
    })
    .await;
    assert_eq!((frames, skipped), (log.entries.len(), 0));
    let expected: Vec<String> = log.entries.iter().map(|e| e.frame.to_string()).collect();
    let got: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got, expected);
    assert!(got.contains(&"7E8#064100BE3FA81300".to_string()));
    // Two seconds of log at ten times the speed take about 0.2 s.
    let span = log.entries.last().unwrap().offset / 10;
    assert!(elapsed >= span, "{elapsed:?} < {span:?}");
    assert!(elapsed < span + Duration::from_secs(2), "{elapsed:?}");
    sim.shutdown().await;
}

/// A CAN_CONFIG SET to 125 kbit/s, where an 8-byte frame takes about a millisecond.
fn at_125_kbits() -> CanConfig {
    CanConfig {
        action: ConfigAction::Set,
        bitrate: 125_000,
        sample_point_permille: 875,
        flags: CanConfig::FLAG_AUTO_RETX,
        ..CanConfig::get()
    }
}

/// A dongle's controller queues a frame when the frame reaches it, however busy its firmware is. The
/// simulator shares a machine with other programs and may not run for a while; frames that arrived
/// over UDP at the bus's pace meanwhile must then queue as of their arrival, not all at once when the
/// simulator wakes (which overran its transmit queue and dropped frames a real dongle keeps).
#[test]
fn frames_that_arrive_at_the_bus_pace_while_the_simulator_stalls_all_reach_the_bus() {
    // The simulator gets a runtime of its own, with one thread, which the test blocks.
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let state = state_in(&dir);
    provision_claimed(&state, DeviceId([0xB0, 0, 0, 0, 0, 0, 0, 2]));
    let mut config = SimConfig::udp(&state);
    config.bus = Some("stall".into());
    config.bus_root = Some(root.clone());
    let sim = sim_rt.block_on(start(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tap = BusTap::join_at(&root, "stall").unwrap();
        assert!(tap.wait_for_peers(1, WAIT).await);
        let mut host = Host::connect(&sim).await;
        let applied = host.config(at_125_kbits()).await.unwrap();
        assert_eq!(applied.bitrate, 125_000);
        tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;

        // 100 frames of about 1 ms each, one every 2 ms or a little more: half the bus at most. The
        // simulator does not run for 150 ms of that time, in which more frames arrive than its
        // transmit queue holds.
        sim_rt.spawn(async { std::thread::sleep(Duration::from_millis(150)) });
        for i in 0..100u8 {
            host.send_frame(&frame(&format!("125#{i:02X}00000000000000")))
                .await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut seen = Vec::new();
        while let Some(f) = tap_recv(&mut tap, Duration::from_millis(500)).await {
            seen.push(f.data()[0]);
        }
        let stats = sim.stats();
        assert_eq!(stats.bus.tx_queue_full, 0, "{stats:?}");
        assert_eq!(seen, (0..100).collect::<Vec<u8>>());
        assert!(
            stats.link.rx_late_max >= Duration::from_millis(100),
            "the stall shows in the link's counters: {stats:?}"
        );
    });
    sim_rt.block_on(sim.shutdown());
}

#[tokio::test]
async fn frames_sent_faster_than_the_bus_carries_are_dropped_and_counted() {
    // 125 kbit/s: an 8-byte frame takes about a millisecond, so 100 frames sent at once overrun the
    // transmit queue, as they would a real dongle's.
    let mut b = bench(false, |_| {}).await;
    let applied = b
        .host
        .config(at_125_kbits())
        .await
        .expect("the dongle answers");
    assert_eq!(applied.bitrate, 125_000, "{applied:?}");
    let started = Instant::now();
    for i in 0..100u8 {
        b.host
            .send_frame(&frame(&format!("123#{i:02X}00000000000000")))
            .await;
    }
    let mut seen = Vec::new();
    while let Some(f) = tap_recv(&mut b.tap, Duration::from_millis(500)).await {
        seen.push(f.data()[0]);
    }
    let stats = b.sim.stats();
    let queue = dongle_sim::transmitter::TX_QUEUE as u64;
    assert_eq!(stats.dongle.frames_to_bus, 100);
    assert!(
        (queue..=queue + 8).contains(&(seen.len() as u64)),
        "about a queue's worth reach the bus: {}",
        seen.len()
    );
    assert_eq!(
        stats.bus.tx_queue_full,
        100 - seen.len() as u64,
        "{stats:?}"
    );
    // What reaches the bus is in order, and takes its bit time: 32 frames at about 1 ms each.
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(25));

    // Sent at the bus's pace, every frame arrives.
    for i in 0..64u8 {
        b.host
            .send_frame(&frame(&format!("124#{i:02X}00000000000000")))
            .await;
        if i % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut paced = 0;
    while tap_recv(&mut b.tap, Duration::from_millis(500))
        .await
        .is_some()
    {
        paced += 1;
    }
    assert_eq!(paced, 64);
    assert_eq!(b.sim.stats().bus.tx_queue_full, stats.bus.tx_queue_full);
    b.sim.shutdown().await;
}

#[tokio::test]
async fn two_simulators_in_two_processes_exchange_frames() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let state_a = dir.path().join("a.json");
    let state_b = dir.path().join("b.json");
    let id_a = DeviceId([0xA0, 0, 0, 0, 0, 0, 0, 0xA]);
    provision_claimed(&state_a, id_a);
    provision_claimed(&state_b, DeviceId([0xB0, 0, 0, 0, 0, 0, 0, 0xB]));

    // Simulator A: the built binary, on UDP.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dongle-sim"))
        .args([
            "--state",
            state_a.to_str().unwrap(),
            "--udp",
            "127.0.0.1:0",
            "--discovery-port",
            "0",
        ])
        .args(["--bus", "shared", "--bus-dir", root.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!((words[0], words[2]), ("udp", "discovery"), "{first}");
    let remp: std::net::SocketAddr = words[1].parse().unwrap();

    // Simulator B: in this process, on a pseudo-terminal.
    let mut config = SimConfig::serial(&state_b);
    config.bus = Some("shared".into());
    config.bus_root = Some(root.clone());
    let sim_b = start(config).await;

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut host_a = Host::udp_to(socket, remp, id_a);
    let mut host_b = Host::connect(&sim_b).await;
    host_a.config(CanConfig::get()).await.expect("A answers");
    host_b.config(CanConfig::get()).await.expect("B answers");
    tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;

    // Sent no faster than the bus carries them: bursts shorter than the transmit queue.
    for i in 0..50u8 {
        host_a
            .send_frame(&dongle_sim::Frame::classic(can_id(0x200), &[i]).unwrap())
            .await;
        if i % 16 == 15 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let at_b = host_b.recv_frames(50, WAIT).await;
    assert_eq!(
        at_b.iter().map(|f| f.data()[0]).collect::<Vec<_>>(),
        (0..50).collect::<Vec<u8>>()
    );
    for i in 0..50u8 {
        host_b
            .send_frame(&dongle_sim::Frame::classic(can_id(0x300), &[i]).unwrap())
            .await;
        if i % 16 == 15 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let at_a = host_a.recv_frames(50, WAIT).await;
    assert_eq!(
        at_a.iter().map(|f| f.data()[0]).collect::<Vec<_>>(),
        (0..50).collect::<Vec<u8>>()
    );
    assert!(at_a.iter().all(|f| f.id() == can_id(0x300)));

    sim_b.shutdown().await;
    child.kill().await.unwrap();
}
