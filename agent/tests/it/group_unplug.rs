//! A group side whose dongle is unplugged, replugged, or not yet authenticated: the agent acknowledges a
//! frame to the server only once it is on the dongle's link, so the server keeps (and buffers) what the
//! dongle did not get, and every frame reaches the far bus once and in order.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Dongle, Server, collect, numbered};
use dongle_sim::BusTap;
use dongle_sim::frame::Frame as SimFrame;
use sqlx::PgPool;

/// The issue's own trial: B unplugged in the middle of a stream A -> B lost every frame sent while it was
/// away (the agent acknowledged them as "dropped"), and frames replayed before the agent had
/// authenticated to the replugged dongle were lost the same way. Now every frame arrives once, in order.
#[sqlx::test(migrator = "MIGRATOR")]
async fn frames_to_an_unplugged_and_replugged_dongle_arrive_once_and_in_order(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let bus_root = tempfile::tempdir().unwrap();
    let a = Dongle::serial().await;
    let b = Dongle::serial_on_bus(bus_root.path(), "vehicle").await;
    let mut vehicle = BusTap::recorder_at(bus_root.path(), "vehicle").unwrap();
    let (mut agent, _) = common::one_agent_relaying(&server, &user, &a, &b).await;
    assert!(vehicle.wait_for_peers(1, Duration::from_secs(5)).await);

    const PER_PHASE: u16 = 300;
    let send = |from: u16| {
        let frames: Vec<SimFrame> = (from..from + PER_PHASE).map(numbered).collect();
        let a = &a.sim;
        async move {
            // A stream, not one burst: 30 frames every 10 ms.
            for chunk in frames.chunks(30) {
                a.inject_bus_frames(chunk);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Live, then B unplugged while frames keep coming, then back.
    send(0).await;
    b.sim.unplug().await;
    send(PER_PHASE).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.sim.replug().await;
    send(2 * PER_PHASE).await;

    let total = 3 * PER_PHASE as usize;
    let seen = collect(&mut vehicle, total, Duration::from_secs(10)).await;
    // Once and in order: strictly increasing.
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "duplicated or out of order: {seen:?}"
    );
    // Every frame sent while B was away, and after it came back, arrives: the agent acknowledged none
    // that did not reach B's link, so the server kept and replayed them.
    let missing: Vec<u16> = (0..3 * PER_PHASE).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.iter().all(|&n| n < PER_PHASE),
        "{} of {total} arrived; frames sent while B was unplugged or after its return are missing: {missing:?}",
        seen.len()
    );
    // What may be lost is what was inside the link itself (the agent's link queue and the serial
    // buffers) at the instant of the unplug: REMP v1 has no acknowledgement of frames by the dongle, so
    // nobody can know whether those reached it (docs/SECURITY.md, residual risks). They are the frames
    // just before the unplug, one run, never more than the link holds.
    eprintln!(
        "lost inside the link at the unplug: {} frames",
        missing.len()
    );
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        assert_eq!(
            usize::from(last - first) + 1,
            missing.len(),
            "one run: {missing:?}"
        );
        assert!(missing.len() <= 256, "{} lost in the link", missing.len());
    }
    agent.stop().await;
    server.stop().await;
}
