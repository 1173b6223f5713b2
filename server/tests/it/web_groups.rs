//! Groups in a real browser (SPEC 9): made from two dongles and activated, frames from one bus in the
//! group's live console and on the other bus; one side stopped, the group degraded with a growing
//! backlog, then recovering when the side is back. Headless Chromium, the real server, two agent
//! daemons and two simulated dongles on their own buses (see `web_support`).

use crate::common;
use crate::web_support;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use common::spawn_app;
use sqlx::PgPool;
use web_support::{TwoSides, frame};

/// Makes the group from the groups page and activates it; answers its page's path.
async fn create_and_activate(s: &TwoSides) -> String {
    let b = &s.browser;
    b.click("header nav a[href='/groups']").await;
    b.wait_path("/groups").await;
    b.check_page().await;
    b.select("#group-a", &s.a_id.to_string()).await;
    b.select("#group-b", &s.b_id.to_string()).await;
    b.click("#group-create button[type=submit]").await;
    b.wait_path("/groups/").await;
    b.wait_text("[data-notice]", "group is created").await;
    b.wait_text("[data-group-state]", "INACTIVE").await;
    b.check_page().await;
    b.click("#group-activate button[type=submit]").await;
    b.wait_text("[data-group-state]", "ACTIVE").await;
    b.wait_text("[data-console-status]", "Live").await;
    b.path().await
}

/// The number a `[data-backlog=...]` cell shows.
async fn backlog(s: &TwoSides, direction: &str) -> u64 {
    s.browser
        .text_of(&format!("[data-backlog={direction}]"))
        .await
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn an_active_group_shows_its_frames_in_the_live_console(pool: PgPool) {
    let s = TwoSides::start(
        spawn_app(pool).await,
        "an_active_group_shows_its_frames_in_the_live_console",
    )
    .await;
    create_and_activate(&s).await;
    let b = &s.browser;
    // Both sides connected to the data plane.
    b.wait_text("[data-connected=a]", "connected").await;
    b.wait_text("[data-connected=b]", "connected").await;

    let mut vehicle = s.a.tap().unwrap();
    let mut bench = s.b.tap().unwrap();
    // A tap that has not yet met the simulator on its bus sends its first frames to nobody.
    assert!(vehicle.wait_for_peers(1, Duration::from_secs(5)).await);
    assert!(bench.wait_for_peers(1, Duration::from_secs(5)).await);
    // A few seconds of traffic from the vehicle's bus, as a diagnostic session would make.
    for n in 0..60u8 {
        vehicle
            .send(&frame(0x7E8, &[0x04, 0x41, 0x0C, n, 0x20]))
            .await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let row = b.wait_text("[data-frames] tr", "7E8").await;
    assert!(row.contains("rx"), "{row}");
    assert!(row.contains(" A "), "the side the frame came from: {row}");
    // The other side's bus got them.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let f = bench.recv().await.unwrap();
            if f.id().raw() == 0x7E8 {
                return f;
            }
        }
    })
    .await
    .expect("the frames reach the other bus");
    assert_eq!(&got.data()[..3], &[0x04, 0x41, 0x0C]);
    // The chart counted them.
    b.wait_until("the frame counter", Duration::from_secs(10), || async {
        b.text_of("[data-frames-total]")
            .await
            .and_then(|t| t.parse::<u32>().ok())
            .is_some_and(|n| n >= 50)
    })
    .await;
    let peak = b
        .js("return Math.max.apply(null, document.querySelector('[data-console]').bridgeConsole.buckets);")
        .await;
    assert!(
        peak.as_f64().unwrap_or(0.0) > 5.0,
        "frames per second charted: {peak}"
    );
    // The group page reads on a phone.
    b.phone(true).await;
    b.check_page().await;
    b.screenshot_as("an_active_group_shows_its_frames_in_the_live_console-phone")
        .await;
    b.phone(false).await;
    // Every frame is relayed: none is lost right after the group turns ACTIVE.
    b.wait_until("relayed counter", Duration::from_secs(10), || async {
        b.text_of("[data-count='frames_relayed.a_to_b']")
            .await
            .and_then(|t| t.parse::<u32>().ok())
            .is_some_and(|n| n == 60)
    })
    .await;
    b.screenshot().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn a_stopped_side_degrades_the_group_with_a_growing_backlog_then_it_recovers(pool: PgPool) {
    let mut s = TwoSides::start(
        spawn_app(pool).await,
        "a_stopped_side_degrades_the_group_with_a_growing_backlog_then_it_recovers",
    )
    .await;
    create_and_activate(&s).await;
    let b = &s.browser;
    b.wait_text("[data-connected=b]", "connected").await;

    // The bench's workstation goes away.
    s.agent_b.stop().await.unwrap();
    b.wait_text("[data-group-state]", "DEGRADED").await;
    b.wait_text("[data-connected=b]", "not connected").await;
    b.wait_text("[data-group-explain]", "Side B is offline")
        .await;

    // The vehicle keeps talking: the server keeps its frames for B, and the backlog grows.
    let mut vehicle = s.a.tap().unwrap();
    let mut seen = Vec::new();
    for round in 0..4u8 {
        for n in 0..50u8 {
            vehicle.send(&frame(0x123, &[round, n])).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let want = u64::from(round + 1) * 50;
        b.wait_until("the backlog to grow", Duration::from_secs(15), || async {
            backlog(&s, "a_to_b").await >= want
        })
        .await;
        seen.push(backlog(&s, "a_to_b").await);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "a growing backlog: {seen:?}"
    );
    b.wait_text("[data-waiting=b]", "200").await;
    b.wait_text("[data-replay]", "frames waiting").await;
    b.screenshot_as(
        "a_stopped_side_degrades_the_group_with_a_growing_backlog_then_it_recovers-degraded",
    )
    .await;

    // Back: the backlog replays in order and the group is ACTIVE again.
    let mut bench = s.b.tap().unwrap();
    s.agent_b.start();
    b.wait_text_within("[data-group-state]", "ACTIVE", Duration::from_secs(40))
        .await;
    b.wait_until("the backlog to drain", Duration::from_secs(30), || async {
        backlog(&s, "a_to_b").await == 0
    })
    .await;
    b.wait_text("tr[data-side=b] [data-presence]", "online")
        .await;
    let mut last = None;
    let mut count = 0;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while count < 200 {
            let f = bench.recv().await.unwrap();
            if f.id().raw() == 0x123 {
                let key = (f.data()[0], f.data()[1]);
                if let Some(prev) = last {
                    assert!(key > prev, "in order: {prev:?} then {key:?}");
                }
                last = Some(key);
                count += 1;
            }
        }
    })
    .await;
    // The relay handed every buffered frame to side B's agent (the page counts them); the bench's
    // dongle is on UDP, where a burst can lose a datagram, so the bus is only checked for order.
    assert!(count > 0, "the replayed frames reach the bench's bus");
    eprintln!("{count} of 200 replayed frames seen on the bench's bus");
    b.wait_until(
        "every buffered frame relayed",
        Duration::from_secs(10),
        || async {
            b.text_of("[data-count='frames_relayed.a_to_b']")
                .await
                .and_then(|t| t.parse::<u32>().ok())
                .is_some_and(|n| n >= 200)
        },
    )
    .await;
    b.wait_text("[data-replay]", "every frame has been delivered")
        .await;
    // The backlog chart drew the rise and the fall.
    let peak = b
        .js("return Math.max.apply(null, window.BridgeGroup.history.a_to_b);")
        .await;
    assert!(
        peak.as_u64().unwrap_or(0) >= 200,
        "the chart's peak: {peak}"
    );
    b.screenshot().await;
    s.stop().await;
}

/// An admin measures a relaying group's latency from the dashboard: the dongle list links to the
/// group's test, and the page shows what came back and the round trips, measured by the real agents.
#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn an_admin_measures_a_groups_latency_from_the_dashboard(pool: PgPool) {
    use bridge_server::users::Role;
    use web_support::Browser;
    let s = TwoSides::start(
        spawn_app(pool).await,
        "an_admin_measures_a_groups_latency_from_the_dashboard",
    )
    .await;
    create_and_activate(&s).await;
    s.browser.wait_text("[data-connected=a]", "connected").await;
    s.browser.wait_text("[data-connected=b]", "connected").await;
    s.app
        .create_user("boss@example.com", Role::SuperAdmin)
        .await;
    let admin = Browser::start(
        &s.app.base,
        "an_admin_measures_a_groups_latency_from_the_dashboard-admin",
    )
    .await;
    admin
        .sign_in("boss@example.com", crate::common::PASSWORD)
        .await;
    admin.goto("/admin/dongles").await;
    admin
        .click("[data-region=admin-dongles] a[href$='/latency']")
        .await;
    admin.wait_path("/admin/groups/").await;
    admin.check_page().await;
    admin.fill("#latency-rate", "500").await;
    admin.fill("#latency-seconds", "1").await;
    admin.click("#latency-test button[type=submit]").await;
    admin
        .wait_text("#latency-test .form-status", "Measuring for 1 s")
        .await;
    admin
        .wait_text_within(
            "#latency-test .form-status",
            "every probe came back",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        admin.text_of("[data-latency=received]").await.as_deref(),
        Some("500")
    );
    assert_eq!(
        admin.text_of("[data-latency=lost]").await.as_deref(),
        Some("0")
    );
    let p50 = admin.text_of("[data-latency='rtt.p50']").await.unwrap();
    assert!(p50.ends_with(" ms"), "{p50}");
    admin.check_page().await;
    admin
        .screenshot_as("an_admin_measures_a_groups_latency_from_the_dashboard")
        .await;
    admin.close().await;
    s.stop().await;
}
