//! An agent stopped and started again while it relays: what it put on a dongle's bus before it stopped is
//! acknowledged to the server before it goes, so the server does not send it again, and what it had not
//! put there yet arrives after the restart. Every frame reaches the far bus once and in order (issue 20's
//! soak found frames delivered twice after each graceful stop of agent B).

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Server, collect, numbered};
use sqlx::PgPool;

/// Frames the test sends through the group at once.
const FRAMES: u16 = 3000;

/// B's bus runs at 125 kbit/s, so the agent holds a backlog for it (about two seconds of that bus's
/// time) when it is told to stop, in the middle of handing it over.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_stopped_while_it_delivers_a_backlog_puts_every_frame_on_the_bus_once_after_its_restart(
    pool: PgPool,
) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let common::TowardsASlowBus {
        a,
        b,
        mut slow_bus,
        mut agent,
        group,
        bus_root: _bus_root,
    } = common::towards_a_slow_bus(&server, &user).await;

    // A stream that A's queue towards its host keeps up with: 100 frames every 20 ms.
    let frames: Vec<_> = (0..FRAMES).map(numbered).collect();
    for chunk in frames.chunks(100) {
        a.sim.inject_bus_frames(chunk);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stopped (SIGTERM, as systemd stops it) once the server holds every frame from A (what A's bus
    // carries while no agent runs is lost on any dongle), with part of them on B's bus.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, g) = user.get(&format!("/groups/{group}")).await;
        if g["frames_received"]["a"] == u64::from(FRAMES) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's frames never all reached the server: {g}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = collect(&mut slow_bus, 300, Duration::from_secs(10)).await;
    assert_eq!(seen.len(), 300, "the relay started");
    let status = agent.stop().await.expect("the agent ran");
    assert!(
        status.success(),
        "the agent ends cleanly on SIGTERM: {status}"
    );
    // Whatever it handed over while stopping is on the bus now.
    seen.extend(collect(&mut slow_bus, usize::MAX, Duration::from_millis(500)).await);
    let before_restart = seen.len();

    let mut args = a.agent_args();
    args.extend(b.agent_args());
    agent.run(&args);
    seen.extend(collect(&mut slow_bus, usize::MAX, Duration::from_secs(5)).await);
    let duplicates = seen.len().saturating_sub(usize::from(FRAMES));
    assert_eq!(
        seen,
        (0..FRAMES).collect::<Vec<u16>>(),
        "every frame once and in order; {before_restart} arrived before the restart, {duplicates} more than were sent\nA: {:?}\nB: {:?}",
        a.sim.stats(),
        b.sim.stats()
    );
    assert_eq!(
        b.sim.stats().bus.tx_queue_full,
        0,
        "nothing overran B's queue"
    );
    assert_eq!(
        a.sim.stats().dongle.lost_to_host,
        0,
        "A sent every frame to the agent"
    );
    let (_, g) = user.get(&format!("/groups/{group}")).await;
    assert_eq!(g["frames_relayed"]["a_to_b"], u64::from(FRAMES), "{g}");
    agent.stop().await;
}
