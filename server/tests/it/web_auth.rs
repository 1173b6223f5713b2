//! The dashboard in a real browser (SPEC 9): signing up and in, agents and their token shown once, an
//! administrator disabling a user, and the pages without JavaScript. Headless Chromium through
//! chromedriver, against the real server (see `web_support`).

use crate::common;
use crate::web_support;

use std::time::Duration;

use bridge_rig::AgentPart;
use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{PASSWORD, spawn_app};
use sqlx::PgPool;
use web_support::Browser;

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn sign_up_confirm_the_address_and_sign_in(pool: PgPool) {
    let app = spawn_app(pool).await;
    let b = Browser::start(&app.base, "sign_up_confirm_the_address_and_sign_in").await;

    // Signed out, any page leads to the sign-in page.
    b.goto("/dongles").await;
    b.wait_path("/login").await;
    b.check_page().await;

    b.goto("/signup").await;
    b.check_page().await;
    b.fill("#signup-email", "Tech@Example.com").await;
    b.fill("#signup-password", "short").await;
    // The browser's own check stops a password that is too short; the API's answer is the same.
    b.js("document.getElementById('signup-password').removeAttribute('minlength');")
        .await;
    b.click("#signup-form button[type=submit]").await;
    b.wait_text("#signup-form .form-error", "8 to 128").await;
    b.fill("#signup-password", PASSWORD).await;
    b.click("#signup-form button[type=submit]").await;
    b.wait_path("/login").await;
    b.wait_text("[data-notice]", "confirm the address").await;

    // The mailed link.
    let token = app.mailed_token("tech@example.com", "verify_email").await;
    b.goto(&format!("/verify-email?token={token}")).await;
    b.check_page().await;
    b.click("#verify-form button[type=submit]").await;
    b.wait_text("[data-notice]", "confirmed").await;

    // A wrong password, then the right one.
    b.fill("#login-email", "tech@example.com").await;
    b.fill("#login-password", "not the password").await;
    b.click("#login-form button[type=submit]").await;
    b.wait_text("#login-form .form-error", "email or password is wrong")
        .await;
    b.fill("#login-password", PASSWORD).await;
    b.click("#login-form button[type=submit]").await;
    b.wait_path("/dongles").await;
    b.wait_text("main h1", "Dongles").await;
    b.wait_text("header .who", "tech@example.com").await;
    b.wait_text("main", "No dongle yet").await;
    b.check_page().await;

    // Readable on a phone: every page fits 375 px without sideways scrolling.
    b.phone(true).await;
    for path in ["/dongles", "/groups", "/agents"] {
        b.goto(path).await;
        b.check_page().await;
    }
    // The keyboard reaches the content first: the skip link, then the main content.
    let first = b
        .js("document.activeElement.blur(); return document.querySelector('a.skip').getAttribute('href');")
        .await;
    assert_eq!(first, serde_json::json!("#main"));
    b.screenshot_as("sign_up_confirm_the_address_and_sign_in-phone")
        .await;
    b.phone(false).await;

    // Signing out ends the session.
    b.goto("/dongles").await;
    b.click("header form.logout button[type=submit]").await;
    b.wait_path("/login").await;
    b.wait_text("[data-notice]", "signed out").await;
    b.goto("/agents").await;
    b.wait_path("/login").await;

    // A forgotten password: the mailed link sets a new one.
    b.click("main a[href='/reset-password']").await;
    b.wait_path("/reset-password").await;
    b.check_page().await;
    b.fill("#reset-email", "tech@example.com").await;
    b.click("#reset-request-form button[type=submit]").await;
    b.wait_text("[data-notice]", "reset link").await;
    let token = app.mailed_token("tech@example.com", "password_reset").await;
    b.goto(&format!("/reset-password?token={token}")).await;
    b.check_page().await;
    b.fill("#reset-password", "a brand new passphrase").await;
    b.click("#reset-confirm-form button[type=submit]").await;
    b.wait_text("[data-notice]", "password is changed").await;
    b.sign_in("tech@example.com", "a brand new passphrase")
        .await;
    b.screenshot().await;
    b.close().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn registering_an_agent_shows_its_token_once(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("tech@example.com", Role::User).await;
    let b = Browser::start(&app.base, "registering_an_agent_shows_its_token_once").await;
    b.sign_in("tech@example.com", PASSWORD).await;
    b.click("header nav a[href='/agents']").await;
    b.wait_path("/agents").await;
    b.check_page().await;
    b.wait_text("main", "No agent yet").await;

    b.fill("#agent-name", "bench-pc").await;
    b.click("#agent-register button[type=submit]").await;
    b.wait_until("the token", Duration::from_secs(20), || async {
        b.text_of("[data-agent-token]")
            .await
            .is_some_and(|t| t.len() > 20)
    })
    .await;
    let token = b.text_of("[data-agent-token]").await.unwrap();
    let agent_id = b.text_of("[data-new-agent-id]").await.unwrap();
    b.wait_text("[data-region=agents]", "bench-pc").await;
    b.screenshot_as("registering_an_agent_shows_its_token_once-token")
        .await;

    // The token works: an agent daemon started with it comes online.
    let dir = tempfile::tempdir().unwrap();
    let credentials = bridge_agent::home::Credentials {
        server_url: app.base.clone(),
        agent_id: agent_id.parse().unwrap(),
        agent_token: token.clone(),
        ca_file: None,
    };
    let mut agent = AgentPart::with_credentials(
        dir.path(),
        credentials,
        bridge_agent::discovery::scan::ScanPlan {
            usb_filter: Vec::new(),
            broadcast: false,
            ..Default::default()
        },
    )
    .unwrap();
    agent.start();

    // Shown once: a new visit of the page has no token anywhere in its source.
    b.click("[data-hide-token]").await;
    b.goto("/agents").await;
    let source = b.client.source().await.unwrap();
    assert!(!source.contains(&token), "the token is shown only once");
    b.wait_until("the agent online", Duration::from_secs(30), || async {
        b.goto("/agents").await;
        b.text_of("tr[data-agent-id] [data-presence]")
            .await
            .is_some_and(|t| t == "online")
    })
    .await;

    // Revoked, the agent must log in again.
    b.click_and_confirm("tr[data-agent-id] form button[type=submit]")
        .await;
    b.wait_text("[data-region=agents]", "revoked").await;
    // The daemon may have ended already with the revocation as its error, or ends now: either is right.
    let _ = agent.stop().await;
    b.screenshot().await;
    b.close().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn an_admin_disables_a_user_who_is_signed_out(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("boss@example.com", Role::SuperAdmin).await;
    app.create_user("tech@example.com", Role::User).await;
    let tech = Browser::start(&app.base, "an_admin_disables_a_user_who_is_signed_out-user").await;
    tech.sign_in("tech@example.com", PASSWORD).await;
    // A user has no admin pages.
    assert!(
        tech.text_of("header nav a[href='/admin/users']")
            .await
            .is_none()
    );
    tech.goto("/admin/users").await;
    tech.wait_text("main h1", "Not found").await;
    tech.goto("/dongles").await;

    let admin = Browser::start(&app.base, "an_admin_disables_a_user_who_is_signed_out").await;
    admin.sign_in("boss@example.com", PASSWORD).await;
    admin.click("header nav a[href='/admin/users']").await;
    admin.wait_path("/admin/users").await;
    admin.check_page().await;
    admin.fill("#users-email", "tech").await;
    admin.click("form.filters button[type=submit]").await;
    admin.wait_path("/admin/users?email=tech").await;
    admin
        .wait_text("tr[data-email='tech@example.com']", "active")
        .await;
    assert!(
        admin
            .text_of("tr[data-email='boss@example.com']")
            .await
            .is_none(),
        "the search filters by email"
    );
    admin
        .click_and_confirm("tr[data-email='tech@example.com'] button[type=submit]")
        .await;
    admin
        .wait_text(
            "tr[data-email='tech@example.com'] [data-user-status]",
            "disabled",
        )
        .await;

    // The user's page notices at once that the session has ended.
    tech.wait_path("/login").await;
    tech.wait_text("[data-notice]", "signed out").await;
    tech.screenshot().await;
    // And cannot sign in again.
    tech.fill("#login-email", "tech@example.com").await;
    tech.fill("#login-password", PASSWORD).await;
    tech.click("#login-form button[type=submit]").await;
    tech.wait_text("#login-form .form-error", "disabled").await;

    // The audit log has it, found with its filters.
    admin.goto("/admin/audit").await;
    admin.check_page().await;
    admin.fill("#audit-action", "admin.user_disabled").await;
    admin.click("form.filters button[type=submit]").await;
    admin
        .wait_text("[data-region=audit]", "admin.user_disabled")
        .await;
    admin
        .screenshot_as("an_admin_disables_a_user_who_is_signed_out-audit")
        .await;

    // Force-unpair names the dongle by its id; an unknown one is refused with the API's message.
    admin.click(".tabs a[href='/admin/dongles']").await;
    admin.wait_path("/admin/dongles").await;
    admin.check_page().await;
    admin
        .fill("#force-dongle", "00000000-0000-4000-8000-000000000000")
        .await;
    admin.click("#force-unpair-pick button[type=submit]").await;
    admin
        .wait_text("#force-unpair", "Force-unpair dongle")
        .await;
    admin.click("#force-unpair button[type=submit]").await;
    admin
        .wait_text("#force-unpair .form-error", "ot found")
        .await;

    // Enabled again, the user can sign in.
    admin.goto("/admin/users?status=disabled").await;
    admin
        .click("tr[data-email='tech@example.com'] button[type=submit]")
        .await;
    admin.wait_text("[data-announce]", "enabled").await;
    tech.sign_in("tech@example.com", PASSWORD).await;
    admin.goto("/admin/users").await;
    admin.screenshot().await;
    tech.close().await;
    admin.close().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
#[cfg_attr(
    not(feature = "browser-tests"),
    ignore = "browser test: needs Debian's chromium and chromium-driver and the `browser-tests` feature (scripts/test installs them as root and turns the feature on)"
)]
async fn the_pages_work_without_javascript(pool: PgPool) {
    let app = spawn_app(pool).await;
    app.create_user("tech@example.com", Role::User).await;
    // Scripts off: forms post to /forms, which calls the API with the form's CSRF field.
    let b = Browser::start_with(&app.base, "the_pages_work_without_javascript", false).await;
    b.goto("/login").await;
    b.fill("#login-email", "tech@example.com").await;
    b.fill("#login-password", PASSWORD).await;
    b.click("#login-form button[type=submit]").await;
    b.wait_path("/dongles").await;
    b.wait_text("main", "JavaScript is off").await;
    b.goto("/agents").await;
    b.fill("#agent-name", "no-js-pc").await;
    b.click("#agent-register button[type=submit]").await;
    b.wait_text("main h1", "Done").await;
    let token = b.text_of("code.secret").await.unwrap_or_default();
    assert!(token.len() > 20, "the token is shown on the result page");
    b.click("main a[href='/agents']").await;
    b.wait_text("[data-region=agents]", "no-js-pc").await;
    // Revoking goes through /forms too (no confirmation without scripts).
    b.click("tr[data-agent-id] form button[type=submit]").await;
    b.wait_text("[data-notice]", "revoked").await;
    b.wait_text("[data-region=agents]", "revoked").await;
    // Signing out too.
    b.click("header form.logout button[type=submit]").await;
    b.wait_path("/login").await;
    b.wait_text("[data-notice]", "signed out").await;
    b.screenshot().await;
    b.close().await;
}
