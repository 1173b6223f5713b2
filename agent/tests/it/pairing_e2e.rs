//! Agents and pairing end to end (issue: agents, the control WebSocket, discovery and pairing): the real
//! server, simulated dongles on a pseudo-terminal and on UDP, and `bridge-agent` as a real process,
//! driven through its command line as a technician would.

use crate::common;

use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, mode, pair};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

fn online(d: Option<&serde_json::Value>) -> bool {
    d.is_some_and(|d| d["online"] == true)
}

/// The technician's flow: login, run, `pair` with the PIN the dongle shows; and pairing a LAN dongle from
/// the API; the tokens end in the agent's vault and the dongles accept them.
#[sqlx::test(migrator = "MIGRATOR")]
async fn login_run_and_pair_a_usb_and_a_lan_dongle(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let usb = Dongle::serial().await;
    let lan = Dongle::udp().await;
    let mut agent = Agent::new();

    let (ok, out, _) = agent.exec(&["status", "--offline"], None).await;
    assert!(ok && out.contains("not logged in"), "{out}");
    agent.login(&server, &alice).await;
    assert_eq!(mode(&agent.path("agent.json")), 0o600);
    let token = std::fs::read_to_string(agent.path("agent.json")).unwrap();
    assert!(token.contains("agent_token"));

    let mut args = usb.agent_args();
    args.extend(lan.agent_args());
    agent.run(&args);
    for d in [&usb, &lan] {
        let seen = alice
            .wait_dongle(&d.device_id, "seen by the agent", online)
            .await
            .unwrap();
        assert_eq!(seen["ownership_state"], "UNCLAIMED");
        assert_eq!(seen["owned"], false);
    }

    // `bridge-agent pair` on the USB dongle: the technician reads the PIN off the dongle and types it.
    let (ok, stdout, stderr, pin) = agent.pair_with_cli(&usb, &["000000"]).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("Wrong PIN: 4 attempts left"), "{stderr}");
    assert!(stdout.contains("Paired"), "{stdout}");
    assert!(!stderr.contains(&pin) && !stdout.contains(&pin));
    let paired = alice.dongle(&usb.device_id).await.unwrap();
    assert_eq!(paired["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(paired["owned"], true);
    assert!(
        usb.sim.flash().token.is_some(),
        "the dongle keeps its token"
    );

    // The LAN dongle, paired from the API with a user session.
    pair(&alice, &lan).await;
    let paired = alice.dongle(&lan.device_id).await.unwrap();
    assert_eq!(paired["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(paired["owned"], true);

    // The agent holds both tokens, encrypted, and says so.
    let vault = std::fs::read_to_string(agent.path("vault/vault.json")).unwrap();
    assert!(vault.contains(&usb.device_id) && vault.contains(&lan.device_id));
    let mut held = String::new();
    for _ in 0..50 {
        held = agent.exec(&["status"], None).await.1;
        if held.matches("token held").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(held.contains("connected to the server"), "{held}");
    assert!(held.contains("token accepted"), "{held}");
    assert_eq!(held.matches("token held").count(), 2, "{held}");

    // Stopped cleanly, the daemon leaves no status file behind.
    let exit = agent.stop().await.expect("the daemon stops on SIGTERM");
    assert!(exit.success(), "{exit:?}");
    assert!(!agent.path("daemon.json").exists());
    server.stop().await;
}

/// A USB dongle pulled out goes offline within seconds, and is served again when plugged back in,
/// without restarting the agent.
#[sqlx::test(migrator = "MIGRATOR")]
async fn unplug_and_replug_without_restarting_the_agent(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let usb = Dongle::serial().await;
    let mut agent = Agent::new();
    agent.login(&server, &alice).await;
    agent.run(&usb.agent_args());
    alice.wait_dongle(&usb.device_id, "appears", online).await;

    let pulled = std::time::Instant::now();
    usb.sim.unplug().await;
    alice
        .wait_dongle(&usb.device_id, "goes offline", |d| !online(d))
        .await;
    let noticed = pulled.elapsed();
    assert!(
        noticed < Duration::from_secs(5),
        "unplug noticed after {noticed:?}"
    );

    usb.sim.replug().await;
    alice
        .wait_dongle(&usb.device_id, "comes back", online)
        .await;
    agent.stop().await;
    server.stop().await;
}

/// Another user's agent sees a dongle on the same LAN, and cannot pair it once it is taken; nor can that
/// user see it at all.
#[sqlx::test(migrator = "MIGRATOR")]
async fn another_users_agent_cannot_take_a_paired_dongle(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let bob = server.user("bob@example.com", Role::User).await;
    let lan = Dongle::udp().await;
    let mut alices = Agent::new();
    alices.login(&server, &alice).await;
    alices.run(&lan.agent_args());
    let mut bobs = Agent::new();
    bobs.login(&server, &bob).await;
    bobs.run(&lan.agent_args());
    alice.wait_dongle(&lan.device_id, "seen", online).await;
    bob.wait_dongle(&lan.device_id, "seen", online).await;

    let (ok, _, stderr, _) = alices.pair_with_cli(&lan, &[]).await;
    assert!(ok, "{stderr}");

    // Bob's agent still sees the dongle on the LAN, but it is Alice's now.
    let (ok, _, stderr) = bobs
        .exec(&["pair", &lan.device_id, "--wait", "2"], Some(""))
        .await;
    assert!(!ok);
    assert!(
        stderr.contains("does not see an unclaimed dongle"),
        "{stderr}"
    );
    assert!(bob.dongle(&lan.device_id).await.is_none());
    let alices_id = alice.dongle(&lan.device_id).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = bob.get(&format!("/dongles/{alices_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = bob
        .post(
            &format!("/dongles/{alices_id}/pairing-mode"),
            json!({"action": "start"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "DONGLE_OWNED_BY_OTHER");
    alices.stop().await;
    bobs.stop().await;
    server.stop().await;
}

/// A revoked agent token: the server closes the socket, the daemon's reconnect is refused, and it stops
/// with a message that says what to do; `status` says the same.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_revoked_agent_stops_and_says_why(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let mut agent = Agent::new();
    agent.login(&server, &alice).await;
    agent.run(&[]);
    let agent_id = agent.agent_id();
    for _ in 0..100 {
        let (_, agents) = alice.get("/agents").await;
        if agents["items"][0]["online"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = alice
        .call(
            reqwest::Method::DELETE,
            &format!("/agents/{agent_id}/tokens"),
            None,
        )
        .await;
    assert!(status.is_success(), "{status} {body}");
    let exit = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(!exit.success());
    let (_, out, _) = agent.exec(&["status"], None).await;
    assert!(out.contains("token refused"), "{out}");
    server.stop().await;
}

/// `logout` forgets everything local; a second login registers afresh. A damaged credentials file is
/// an error that says what to do, not a crash.
#[sqlx::test(migrator = "MIGRATOR")]
async fn logout_and_damaged_credentials(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let agent = Agent::new();
    agent.login(&server, &alice).await;
    let first = agent.agent_id();
    let (ok, _, stderr) = agent
        .exec(
            &[
                "login",
                "--server",
                &server.base,
                "--email",
                "x@example.com",
            ],
            None,
        )
        .await;
    assert!(!ok && stderr.contains("already logged in"), "{stderr}");
    let (ok, out, _) = agent.exec(&["logout"], None).await;
    assert!(ok && out.contains("Logged out"), "{out}");
    assert!(!agent.path("agent.json").exists());
    agent.login(&server, &alice).await;
    assert_ne!(agent.agent_id(), first);

    std::fs::write(agent.path("agent.json"), "{ not json").unwrap();
    let (ok, _, stderr) = agent.exec(&["run"], None).await;
    assert!(!ok);
    assert!(
        stderr.contains("damaged") && stderr.contains("login"),
        "{stderr}"
    );
    server.stop().await;
}

/// `logout` revokes the agent's token on the server before it forgets it: a copy of the credentials file
/// (a backup, a disk image) opens nothing afterwards. A server that cannot be reached does not keep the
/// workstation logged in: the token is forgotten, and the output says how to revoke it by hand.
#[sqlx::test(migrator = "MIGRATOR")]
async fn logout_revokes_the_agents_token_on_the_server_before_forgetting_it(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let agent = Agent::new();
    agent.login(&server, &alice).await;
    let credentials: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(agent.path("agent.json")).unwrap()).unwrap();
    let token = credentials["agent_token"].as_str().unwrap().to_string();
    let heartbeat = || async {
        reqwest::Client::new()
            .post(format!("{}/api/v1/agents/heartbeat", server.base))
            .bearer_auth(&token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(heartbeat().await, reqwest::StatusCode::OK);
    let (ok, out, stderr) = agent.exec(&["logout"], None).await;
    assert!(ok, "{stderr}");
    assert!(out.contains("the server revoked"), "{out}");
    assert!(!agent.path("agent.json").exists());
    assert_eq!(heartbeat().await, reqwest::StatusCode::UNAUTHORIZED);
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'agent.logged_out'")
            .fetch_one(&server.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);

    // Logged in again, then the server goes away: logout still forgets, and says what is left to do.
    agent.login(&server, &alice).await;
    let agent_id = agent.agent_id();
    server.stop().await;
    let (ok, out, stderr) = agent.exec(&["logout"], None).await;
    assert!(ok, "{stderr}");
    assert!(
        out.contains("could not revoke") && out.contains(&agent_id.to_string()),
        "{out}"
    );
    assert!(!agent.path("agent.json").exists());
}

/// A paired dongle reset to factory state no longer takes its token: the agent notices when it serves
/// the dongle again, and the server marks it RESET_DETECTED.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_factory_reset_is_detected(pool: PgPool) {
    let server = Server::start(pool).await;
    let alice = server.user("alice@example.com", Role::User).await;
    let usb = Dongle::serial().await;
    let mut agent = Agent::new();
    agent.login(&server, &alice).await;
    agent.run(&usb.agent_args());
    pair(&alice, &usb).await;

    usb.sim.factory_reset();
    usb.sim.unplug().await;
    usb.sim.replug().await;
    alice
        .wait_dongle(&usb.device_id, "marked as reset", |d| {
            d.is_some_and(|d| d["ownership_state"] == "RESET_DETECTED")
        })
        .await;
    agent.stop().await;
    server.stop().await;
}
