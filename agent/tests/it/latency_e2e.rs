//! The admins' latency test of a group, end to end with the real agent and simulated dongles: probes go
//! from side A's agent through the server to side B's agent and back, every one is counted once, none
//! reaches either dongle's bus, and the group's own frames keep flowing between them.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Dongle, Server, collect, numbered};
use dongle_sim::BusTap;
use dongle_sim::frame::Frame as SimFrame;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

/// Reads `tap` until it is quiet for `quiet`: the ids of the frames it saw.
async fn ids_until_quiet(tap: &mut BusTap, quiet: Duration) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Ok(Ok(frame)) = tokio::time::timeout(quiet, tap.recv()).await {
        ids.push(frame.id().raw());
    }
    ids
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_latency_test_counts_every_probe_and_no_bus_sees_one(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;
    let admin = server.user("admin@example.com", Role::SuperAdmin).await;
    let buses = tempfile::tempdir().unwrap();
    let a = Dongle::serial_on_bus(buses.path(), "bus-a").await;
    let b = Dongle::serial_on_bus(buses.path(), "bus-b").await;
    let mut bus_a = BusTap::recorder_at(buses.path(), "bus-a").unwrap();
    let mut bus_b = BusTap::recorder_at(buses.path(), "bus-b").unwrap();
    let (_agent, group) = common::one_agent_relaying(&server, &user, &a, &b).await;
    assert!(bus_a.wait_for_peers(1, Duration::from_secs(5)).await);
    assert!(bus_b.wait_for_peers(1, Duration::from_secs(5)).await);
    let path = format!("/admin/groups/{group}/latency-test");

    // Only a super_admin may run one, and only within bounds.
    let (status, _) = user.post(&path, json!({"rate": 100, "seconds": 1})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = admin.post(&path, json!({"rate": 0, "seconds": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // 1 000 probes in 2 s, while the group carries 200 frames of its own from A to B.
    let traffic = async {
        let frames: Vec<SimFrame> = (0..200).map(numbered).collect();
        for chunk in frames.chunks(10) {
            a.sim.inject_bus_frames(chunk);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((status, report), ()) = tokio::join!(
        admin.post(&path, json!({"rate": 500, "seconds": 2})),
        traffic
    );
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["sent"], 1000, "{report}");
    assert_eq!(report["received"], 1000, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["out_of_order"], 0, "{report}");
    let rtt = &report["round_trip_ms"];
    let (min, p50, p99, max) = (
        rtt["min"].as_f64().unwrap(),
        rtt["p50"].as_f64().unwrap(),
        rtt["p99"].as_f64().unwrap(),
        rtt["max"].as_f64().unwrap(),
    );
    assert!(
        0.0 < min && min <= p50 && p50 <= p99 && p99 <= max,
        "{report}"
    );

    // The group's frames all reached B's bus, once and in order, between the probes...
    let seen = collect(&mut bus_b, 200, Duration::from_secs(5)).await;
    assert_eq!(seen, (0..200).collect::<Vec<u16>>());
    // ...and no probe reached either bus.
    let probe_id = control_proto::probe::CAN_ID;
    let on_a = ids_until_quiet(&mut bus_a, Duration::from_millis(500)).await;
    let on_b = ids_until_quiet(&mut bus_b, Duration::from_millis(500)).await;
    assert!(!on_a.contains(&probe_id), "a probe on A's bus");
    assert!(!on_b.contains(&probe_id), "a probe on B's bus");

    // The run is in the audit log.
    let (status, logs) = admin
        .get("/admin/audit-logs?action=group.latency_test")
        .await;
    assert_eq!(status, StatusCode::OK, "{logs}");
    assert_eq!(logs["items"][0]["details"]["received"], 1000, "{logs}");

    // A group that does not relay cannot be measured.
    let (status, _) = user
        .post(&format!("/groups/{group}/deactivate"), json!({}))
        .await;
    assert!(status.is_success());
    let (status, body) = admin.post(&path, json!({"rate": 100, "seconds": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}
