//! Frames a grouped dongle loses itself are counted and shown with the group's figures: the agent reads
//! the dongle's BUS_STATUS counters (issue 24: a burst sent to a dongle faster than its bus carries was
//! lost in its transmit queue, and nobody counted it).

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, active_group, pair};
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
    let mut agent = Agent::new();
    agent.login(&server, &user).await;
    let mut args = a.agent_args();
    args.extend(b.agent_args());
    agent.run(&args);
    let a_id = pair(&user, &a).await;
    let b_id = pair(&user, &b).await;
    let group = active_group(&user, &a_id, &b_id).await;
    // The agent's first reading of B's counters, once it holds B's token, is its baseline: what B lost
    // before that is not counted. Readings come every two seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Another host on dongle B's UDP port, which the agent does not pace, sends 200 frames at once: the
    // dongle's transmit queue of 32 takes what it can and drops the rest.
    let token = b.sim.flash().token.expect("B is paired");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let id = CanId::standard(0x555).unwrap();
    let mut buf = [0u8; firmware_proto::MAX_PACKET_LEN];
    for seq in 0..200u32 {
        let mut header = Header::new(MsgType::Can, b.sim.device_id(), 1_000_000 + seq);
        header.token = token.as_bytes();
        let payload = Payload::Can(CanFrame::new(id, &[0xAA; 8]).unwrap());
        let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
        socket
            .send_to(&buf[..n], b.sim.udp_addr().unwrap())
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.sim.stats().dongle.frames_from_host < 200 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = b.sim.stats().bus.tx_queue_full;
    assert!(lost > 100, "the burst overran the queue: {lost}");

    // Within a few readings, the group shows them lost at side B, and nothing at side A.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, g) = user.get(&format!("/groups/{group}")).await;
        if g["agent_drops"]["b"] == lost {
            assert_eq!(g["agent_drops"]["a"], 0, "{g}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the group never showed the {lost} frames dongle B lost: {g}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ok, status, _) = agent.exec(&["status"], None).await;
    assert!(ok, "{status}");
    assert!(
        status.contains(&format!("{lost} frames lost by dongles themselves")),
        "{status}"
    );
    agent.stop().await;
}
