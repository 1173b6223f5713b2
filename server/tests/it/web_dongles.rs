//! A dongle's page in a real browser (SPEC 9): pairing with the PIN from the simulator's log and a
//! wrong PIN first, the CAN configuration with the timing preview and the effective values, a command
//! and its output, and a frame sent from the live console onto the simulator's bus. Headless Chromium,
//! the real server, the agent daemon and simulated dongles (see `web_support`).

use crate::common;
use crate::web_support;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use common::spawn_app;
use sqlx::PgPool;
use web_support::{OneDongle, pair};

/// The dongle's page, reached from the list by its device id.
async fn open_dongle(s: &OneDongle) {
    let b = &s.browser;
    b.goto("/dongles").await;
    b.wait_text("[data-region=dongles]", &s.dongle.device_id)
        .await;
    b.wait_text("[data-region=dongles] [data-presence]", "online")
        .await;
    b.click("[data-region=dongles] tr[data-dongle-id] a").await;
    b.wait_text("main h1", &s.dongle.device_id).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn pairing_with_the_pin_from_the_simulator_after_a_wrong_one(pool: PgPool) {
    let s = OneDongle::start(
        spawn_app(pool).await,
        "pairing_with_the_pin_from_the_simulator_after_a_wrong_one",
    )
    .await;
    let b = &s.browser;
    open_dongle(&s).await;
    b.check_page().await;
    b.wait_text("main", "UNCLAIMED").await;

    let mut events = s.dongle.sim.events();
    b.click("#pairing-start button[type=submit]").await;
    // The simulator's log shows the PIN, as a dongle's display would.
    let pin = bridge_rig::next_pin(&mut events).await.unwrap();
    let countdown = b
        .wait_text("#pairing-countdown", "left to type the PIN")
        .await;
    assert!(
        countdown.contains("1:5") || countdown.contains("2:00"),
        "a 120 s window counting down: {countdown}"
    );
    b.check_page().await;

    let wrong: String = pin
        .chars()
        .map(|c| char::from(b'0' + (c as u8 - b'0' + 1) % 10))
        .collect();
    b.fill("#pairing-pin", &wrong).await;
    b.click("#pairing-submit button[type=submit]").await;
    b.wait_text("#pairing-submit .form-error", "4 attempts left")
        .await;
    b.screenshot_as("pairing_with_the_pin_from_the_simulator_after_a_wrong_one-wrong-pin")
        .await;

    b.fill("#pairing-pin", &pin).await;
    b.click("#pairing-submit button[type=submit]").await;
    b.wait_text("[data-notice]", "paired to your account").await;
    b.wait_text("main", "CLAIMED_ACTIVE").await;
    // The owner's sections are there now.
    b.find("#can-config").await;
    b.find("#command-form").await;
    b.find("[data-console]").await;
    b.check_page().await;
    b.screenshot().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn a_can_configuration_shows_the_effective_values(pool: PgPool) {
    let s = OneDongle::start(
        spawn_app(pool).await,
        "a_can_configuration_shows_the_effective_values",
    )
    .await;
    pair(&s.user, &s.dongle).await;
    let b = &s.browser;
    open_dongle(&s).await;
    b.wait_text("[data-region=can-effective]", "No configuration applied")
        .await;

    b.fill("#can-bitrate", "250000").await;
    b.fill("#can-sample-point", "800").await;
    // The preview, computed in the page for the dongle's 80 MHz clock.
    b.wait_text("#timing-preview", "250,000 bit/s").await;
    let preview = |key: &'static str| async move {
        b.text_of(&format!("#timing-preview [data-preview={key}]"))
            .await
            .unwrap_or_default()
    };
    let (prescaler, tseg1, tseg2) = (
        preview("prescaler").await,
        preview("tseg1").await,
        preview("tseg2").await,
    );
    assert_eq!(preview("sample_point_permille").await, "800");

    b.click("#can-config button[type=submit]").await;
    b.wait_text("#can-config .form-status", "Applied").await;
    let effective = |key: &'static str| async move {
        b.text_of(&format!("[data-effective={key}]"))
            .await
            .unwrap_or_default()
    };
    assert_eq!(effective("bitrate").await, "250000");
    assert_eq!(effective("sample_point_permille").await, "800");
    // The dongle's own derivation is the preview's.
    assert_eq!(effective("prescaler").await, prescaler);
    assert_eq!(effective("tseg1").await, tseg1);
    assert_eq!(effective("tseg2").await, tseg2);
    assert_eq!(s.dongle.sim.flash().can.bitrate, 250_000);

    // A value out of range is refused with the field named, and nothing changes.
    b.fill("#can-bitrate", "5000").await;
    // The preview states the range the API checks (firmware-proto's, handed to the page).
    b.wait_text("#timing-preview", "Bitrate: 10,000 to 1,000,000 bit/s")
        .await;
    b.js("document.getElementById('can-bitrate').removeAttribute('min');")
        .await;
    b.click("#can-config button[type=submit]").await;
    b.wait_text("#can-config .form-error", "bitrate").await;
    assert_eq!(effective("bitrate").await, "250000");
    b.fill("#can-bitrate", "250000").await;
    // Raw timing within FDCAN's ranges but beyond bxCAN's, which this dongle has (it does not announce
    // CAN FD): the page says so before anything is sent.
    b.wait_text("#can-config", "bxCAN ranges: prescaler 1–1024, tseg1 1–16")
        .await;
    b.click("#can-use-raw").await;
    b.fill("#can-prescaler", "10").await;
    b.fill("#can-tseg2", "8").await;
    b.fill("#can-tseg1", "40").await;
    b.wait_text("#timing-preview", "outside the controller")
        .await;
    b.fill("#can-tseg1", "13").await;
    b.wait_text("#timing-preview", "quanta per bit").await;
    b.click("#can-use-raw").await;
    // The whole dongle page reads on a phone.
    b.phone(true).await;
    b.check_page().await;
    b.screenshot_as("a_can_configuration_shows_the_effective_values-phone")
        .await;
    b.phone(false).await;
    b.screenshot().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn a_command_shows_its_output(pool: PgPool) {
    let s = OneDongle::start(spawn_app(pool).await, "a_command_shows_its_output").await;
    pair(&s.user, &s.dongle).await;
    let b = &s.browser;
    open_dongle(&s).await;
    // Not a development server: neither a dangerous command nor the box that would allow one.
    assert_eq!(
        b.js("return [document.querySelector('#command-dangerous') === null, \
              [...document.querySelectorAll('#command-name option')].some(o => o.value === 'factory-reset')]")
            .await,
        serde_json::json!([true, false])
    );

    b.select("#command-name", "echo").await;
    b.fill("#command-args", "hello from the dashboard").await;
    b.click("#command-form button[type=submit]").await;
    b.wait_text("[data-command-status]", "done").await;
    b.wait_text("[data-command-stdout]", "hello from the dashboard")
        .await;
    b.wait_text("[data-region=commands]", "echo").await;

    b.select("#command-name", "version").await;
    b.fill("#command-args", "").await;
    b.click("#command-form button[type=submit]").await;
    b.wait_text("[data-command-stdout]", "dongle-sim").await;
    b.wait_text("[data-command-exit]", "exit code 0").await;
    // The live console heard about it too.
    b.wait_text("[data-events]", "is done").await;
    b.screenshot_as("a_command_shows_its_output-dongle").await;

    // A command's own page has its output (and reloads itself while the command runs).
    b.click("[data-region=commands] tbody tr:first-child a")
        .await;
    b.wait_path("/dongles/").await;
    b.wait_text("main pre", "dongle-sim").await;
    b.check_page().await;
    b.screenshot().await;

    // The agents page shows the workstation the agent runs on, with its interfaces: the loopback one
    // (which every machine has) is not scanned, and says why.
    b.goto("/agents").await;
    let lo = b
        .wait_text("[data-region=agents] [data-interface=lo]", "127.0.0.1")
        .await;
    assert!(lo.contains("not scanned: loopback"), "{lo}");
    b.check_page().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn a_frame_sent_from_the_console_reaches_the_bus(pool: PgPool) {
    let s = OneDongle::start(
        spawn_app(pool).await,
        "a_frame_sent_from_the_console_reaches_the_bus",
    )
    .await;
    pair(&s.user, &s.dongle).await;
    let mut tap = s.dongle.tap().unwrap();
    let b = &s.browser;
    open_dongle(&s).await;
    b.wait_text("[data-console-status]", "Live").await;

    b.fill("#send-id", "7DF").await;
    b.fill("#send-data", "02010C").await;
    b.click("#send-frame button[type=submit]").await;
    b.wait_text("#send-frame .form-status", "Sent").await;
    // On the simulator's bus, as any device on it sees it.
    let frame = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let f = tap.recv().await.unwrap();
            if f.id().raw() == 0x7DF {
                return f;
            }
        }
    })
    .await
    .expect("the frame reaches the bus");
    assert_eq!(frame.data(), &[0x02, 0x01, 0x0C]);
    // And on the console, as tx.
    let row = b.wait_text("[data-frames] tr", "7DF").await;
    assert!(row.contains("tx") && row.contains("02 01 0C"), "{row}");
    // The bus's figure comes every few seconds (no CAN configuration applied: no share in %).
    let load = b.wait_text("[data-bus-load]", "frames/s").await;
    assert!(load.contains("apply a CAN configuration"), "{load}");

    // The filters: another id hides it, its own shows it again.
    b.fill("#filter-id", "123").await;
    b.wait_until(
        "the filter to hide the frame",
        Duration::from_secs(5),
        || async { b.text_of("[data-frames] tr").await.is_none() },
    )
    .await;
    b.fill("#filter-id", "7df").await;
    b.select("#filter-dir", "tx").await;
    b.wait_text("[data-frames] tr", "7DF").await;
    b.screenshot().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn a_command_typed_on_the_dongles_uart_shows_on_its_page(pool: PgPool) {
    let s = OneDongle::start(
        spawn_app(pool).await,
        "a_command_typed_on_the_dongles_uart_shows_on_its_page",
    )
    .await;
    pair(&s.user, &s.dongle).await;
    let b = &s.browser;
    open_dongle(&s).await;
    b.wait_text("[data-console-status]", "Live").await;
    b.wait_text("[data-region=cli-history]", "No command yet")
        .await;
    // Typed on the dongle's own console until its agent (authenticating to it) passes it on.
    let typed = async {
        loop {
            s.dongle.sim.uart_command("uptime");
            if b.text_of("[data-events]")
                .await
                .is_some_and(|t| t.contains("Typed on the dongle"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), typed)
        .await
        .expect("the UART command on the live console");
    let event = b.wait_text("[data-events]", "uptime").await;
    assert!(event.contains("exit code 0"), "{event}");
    // And in the history once the page is loaded again.
    open_dongle(&s).await;
    let history = b
        .wait_text("[data-region=cli-history] tr[data-source=uart]", "uptime")
        .await;
    assert!(history.contains("UART console"), "{history}");
    b.check_page().await;

    // A diagnostic on the agent's workstation: its lines stream to the console, and it joins the
    // history.
    b.wait_text("[data-console-status]", "Live").await;
    b.select("#host-command-name", "interfaces").await;
    b.click("#host-command-form button[type=submit]").await;
    b.wait_text("[data-events]", "Workstation: lo 127.0.0.1")
        .await;
    b.wait_text(
        "[data-region=cli-history] tr[data-source=host]",
        "interfaces",
    )
    .await;
    b.check_page().await;
    b.screenshot().await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn an_admin_finds_a_held_dongle_in_the_list_and_releases_it(pool: PgPool) {
    let s = OneDongle::start(
        spawn_app(pool.clone()).await,
        "an_admin_finds_a_held_dongle_in_the_list_and_releases_it",
    )
    .await;
    let id = pair(&s.user, &s.dongle).await;
    sqlx::query("UPDATE dongles SET ownership_state = 'SECURITY_HOLD' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    s.app
        .create_user("boss@example.com", bridge_server::users::Role::SuperAdmin)
        .await;
    let admin = web_support::Browser::start(
        &s.app.base,
        "an_admin_finds_a_held_dongle_in_the_list_and_releases_it-admin",
    )
    .await;
    admin.sign_in("boss@example.com", common::PASSWORD).await;
    admin.goto("/admin/dongles").await;
    admin.select("#dongles-state", "SECURITY_HOLD").await;
    admin.click("form.filters button[type=submit]").await;
    let row = admin
        .wait_text("[data-region=admin-dongles] tbody tr", &s.dongle.device_id)
        .await;
    assert!(row.contains(web_support::EMAIL), "{row}");
    assert!(row.contains("bench-pc"), "the agent that sees it: {row}");
    admin.check_page().await;
    admin.screenshot().await;
    admin
        .click_and_confirm("[data-region=admin-dongles] button.danger")
        .await;
    admin
        .wait_text("[data-notice]", "security hold is cleared")
        .await;
    admin.goto("/admin/dongles?state=UNCLAIMED").await;
    admin
        .wait_text("[data-region=admin-dongles] tbody tr", &s.dongle.device_id)
        .await;
    admin.close().await;
    s.stop().await;
}
