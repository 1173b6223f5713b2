//! The demo end to end with small numbers: every part starts, the dongles pair, configure and group,
//! frames cross both ways and survive one side's absence, an administrator measures the group's
//! latency, and the summary says so; on one server instance, with the two agents on two, and on two
//! with the relay's buffer on NATS JetStream.

use std::os::unix::fs::PermissionsExt;

/// Runs the demo on `instances` server instances and checks what every run must show; answers the
/// summary for the caller's own checks.
async fn demo_on(instances: usize, nats: bool) -> bridge_demo::report::Summary {
    let dir = tempfile::tempdir().unwrap();
    // As root, the embedded PostgreSQL runs as the postgres user, which must reach its folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let options = bridge_demo::Options {
        frames: 300,
        rate: 1000,
        progress: false,
        instances,
        nats,
    };
    let (summary, running) = bridge_demo::run(dir.path(), &options)
        .await
        .expect("the demo runs");
    running.stop().await;
    println!("{}", summary.render());
    assert!(summary.ok(), "{}", summary.render());
    assert_eq!(summary.live_ab.delivered, 300);
    assert_eq!(summary.live_ba.delivered, 300);
    assert_eq!(
        summary.buffered.delivered, 300,
        "every buffered frame replayed"
    );
    let latency = summary.latency.as_ref().expect("the latency test ran");
    assert_eq!(latency["sent"], 3000, "{latency}");
    assert_eq!(latency["received"], 3000, "{latency}");
    assert!(
        summary.backlog_peak > 0,
        "the server buffered while B was away"
    );
    assert!(
        summary.states.iter().any(|s| s == "DEGRADED"),
        "{:?}",
        summary.states
    );
    assert_eq!(summary.configs.len(), 2);
    assert!(
        summary.configs[0].contains("500000"),
        "{:?}",
        summary.configs
    );
    assert!(
        summary.command_output.contains("dongle-sim"),
        "{}",
        summary.command_output
    );
    assert!(summary.live_ab.quantile(0.99).is_some());
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_and_loses_nothing() {
    let summary = demo_on(1, false).await;
    assert_eq!(summary.frame_store, "postgres");
    assert!(
        summary.states.iter().any(|s| s == "ACTIVE"),
        "{:?}",
        summary.states
    );
}

/// `bridge-demo --instances 2`: agent B on a second instance of the server, so that the group relays
/// across instances, and still nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_on_two_instances_relays_across_them_and_loses_nothing() {
    let summary = demo_on(2, false).await;
    assert!(
        summary.states.iter().any(|s| s == "CROSS_INSTANCE"),
        "{:?}",
        summary.states
    );
    assert!(
        !summary.states.iter().any(|s| s == "ACTIVE"),
        "both agents on one instance: {:?}",
        summary.states
    );
}

/// `bridge-demo --instances 2 --nats`: the same across two instances, with the relay's buffer on a
/// nats-server with JetStream that the demo starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "nats-tests"),
    ignore = "needs nats-server (Debian: nats-server); scripts/test turns this on where it is installed"
)]
async fn the_demo_on_two_instances_with_nats_loses_nothing() {
    let summary = demo_on(2, true).await;
    assert_eq!(summary.frame_store, "jetstream");
    assert!(
        summary.states.iter().any(|s| s == "CROSS_INSTANCE"),
        "{:?}",
        summary.states
    );
}
