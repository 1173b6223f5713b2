//! Frames a grouped dongle loses itself are counted and shown with the group's figures: the agent reads
//! the dongle's BUS_STATUS counters (issue 24: a burst sent to a dongle faster than its bus carries was
//! lost in its transmit queue, and nobody counted it).

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Dongle, Server};
use dongle_sim::{Extensions, SimConfig};
use firmware_proto::ids::CanId;
use firmware_proto::remp::{self, CanFrame, Header, MsgType, Packet, Payload};
use sqlx::PgPool;

#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_a_grouped_dongle_loses_itself_show_in_the_groups_figures(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let a = Dongle::serial().await;
    let b = {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SimConfig::udp(dir.path().join("flash.json"));
        config.extensions = Extensions::parse("bus-status").unwrap();
        Dongle::start(config, dir, None).await
    };
    let (mut agent, group) = common::one_agent_relaying(&server, &user, &a, &b).await;
    // The agent's first reading of B's counters, once it holds B's token, is its baseline: what B lost
    // before that is not counted. A frame relayed to B shows that the agent holds its token; the next
    // reading comes within two seconds of that.
    a.sim.inject_bus_frames(&[common::numbered(1)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while b.sim.stats().dongle.frames_from_host == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never got the frame"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Another host on dongle B's UDP port, which the agent does not pace, sends 200 frames at once: the
    // dongle's transmit queue of 32 takes what it can and drops the rest. If the agent's first reading
    // (its baseline) came only after a burst, that burst is not counted: a few bursts make sure.
    let token = b.sim.flash().token.expect("B is paired");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let id = CanId::standard(0x555).unwrap();
    let mut buf = [0u8; firmware_proto::MAX_PACKET_LEN];
    let mut seq = 1_000_000u32;
    // The dongle's drops after each burst (0 before the first).
    let mut after_burst = vec![b.sim.stats().bus.tx_queue_full];
    let shown = 'bursts: loop {
        let sent_before = b.sim.stats().dongle.frames_from_host;
        for _ in 0..200 {
            seq += 1;
            let mut header = Header::new(MsgType::Can, b.sim.device_id(), seq);
            header.token = token.as_bytes();
            let payload = Payload::Can(CanFrame::new(id, &[0xAA; 8]).unwrap());
            let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
            socket
                .send_to(&buf[..n], b.sim.udp_addr().unwrap())
                .await
                .unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while b.sim.stats().dongle.frames_from_host < sent_before + 200
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let dropped = b.sim.stats().bus.tx_queue_full;
        assert!(
            dropped - after_burst.last().unwrap() > 100,
            "the burst overran the queue: {dropped}"
        );
        after_burst.push(dropped);
        // Readings come every two seconds; the group's figures are written every second.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        while tokio::time::Instant::now() < deadline {
            let (_, g) = user.get(&format!("/groups/{group}")).await;
            let b_lost = g["agent_drops"]["b"].as_u64().unwrap();
            if b_lost > 0 {
                assert_eq!(g["agent_drops"]["a"], 0, "{g}");
                // A reading taken while the burst was still arriving is completed by the next.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let (_, g) = user.get(&format!("/groups/{group}")).await;
                break 'bursts g["agent_drops"]["b"].as_u64().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if after_burst.len() > 4 {
            let (_, status, _) = agent.exec(&["status"], None).await;
            let (_, g) = user.get(&format!("/groups/{group}")).await;
            panic!(
                "the group never showed what dongle B lost ({after_burst:?}); agent status:\n{status}\ngroup: {g}\nsim: {:?}",
                b.sim.stats()
            );
        }
    };
    // What the group shows is exactly what B dropped since the agent's baseline, which came before one
    // of the bursts.
    let total = *after_burst.last().unwrap();
    let baseline = total - shown;
    assert!(
        after_burst.contains(&baseline),
        "shown {shown} of {total}; drops after each burst: {after_burst:?}"
    );
    let lost = shown;
    let (ok, status, _) = agent.exec(&["status"], None).await;
    assert!(ok, "{status}");
    assert!(
        status.contains(&format!("{lost} frames lost by dongles themselves")),
        "{status}"
    );
    agent.stop().await;
}

/// A burst from a fast bus towards a slower one arrives whole, at the slower bus's pace: the agent
/// writes frames to dongle B no faster than its 125 kbit/s bus carries them (issue 24: it wrote them as
/// they came, and all but the few that fit dongle B's transmit queue were lost there).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_burst_towards_a_slower_bus_arrives_whole_at_that_buses_pace(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let common::TowardsASlowBus {
        a,
        b,
        mut slow_bus,
        mut agent,
        bus_root: _bus_root,
        ..
    } = common::towards_a_slow_bus(&server, &user).await;

    // 500 frames at once, as a 1 Mbit/s bus brings them in a busy moment: about a third of a second of
    // the 125 kbit/s bus's time.
    let frames: Vec<_> = (0..500).map(common::numbered).collect();
    let started = std::time::Instant::now();
    a.sim.inject_bus_frames(&frames);
    let seen = common::collect(&mut slow_bus, 500, Duration::from_secs(10)).await;
    assert_eq!(
        seen,
        (0..500).collect::<Vec<u16>>(),
        "every frame, once, in order"
    );
    assert_eq!(
        b.sim.stats().bus.tx_queue_full,
        0,
        "nothing overran B's queue"
    );
    // 500 two-byte frames take at least 500 x 63 bits at 125 kbit/s.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    agent.stop().await;
}
