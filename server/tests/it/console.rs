//! The live console over SSE (SPEC 3.9): headers at once, events with increasing ids, resume with
//! Last-Event-ID, stream_reset when too old, and the same authorization as the dongle.

use crate::common;

use std::time::Duration;

use common::dongle::paired;
use common::{TestClient, spawn_app, spawn_app_with};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

const DEV: &str = "00000000000000c1";

/// An open SSE stream and the text read so far.
pub(crate) struct Sse {
    response: reqwest::Response,
    buffer: String,
}

/// One event: its id (if any), name and JSON data.
#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) id: Option<u64>,
    pub(crate) name: String,
    pub(crate) data: Value,
}

impl Sse {
    pub(crate) async fn open(
        client: &TestClient,
        path: &str,
        last_event_id: Option<u64>,
    ) -> (StatusCode, Option<Self>, Option<String>) {
        let mut request = client.request(reqwest::Method::GET, path);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = tokio::time::timeout(Duration::from_secs(5), request.send())
            .await
            .expect("the headers come at once")
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        if !status.is_success() {
            return (status, None, content_type);
        }
        (
            status,
            Some(Self {
                response,
                buffer: String::new(),
            }),
            content_type,
        )
    }

    /// Reads until the server ends the stream, at most `within`; the names of the events read, or None
    /// when the stream was still open.
    async fn until_closed(&mut self, within: Duration) -> Option<Vec<String>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.response.chunk()).await {
                Err(_) => return None,
                Ok(Err(_)) | Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
        Some(
            self.buffer
                .lines()
                .filter_map(|l| l.strip_prefix("event:"))
                .map(|n| n.trim().to_string())
                .collect(),
        )
    }

    /// The next event (comments such as keep-alives are skipped).
    pub(crate) async fn next(&mut self) -> Event {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event {
                    id: None,
                    name: "message".into(),
                    data: Value::Null,
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = v.trim().parse().ok();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.name = v.trim().to_string();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data = serde_json::from_str(v.trim()).unwrap();
                        any = true;
                    }
                }
                if any {
                    return event;
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.response.chunk())
                .await
                .expect("an event within 5 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

async fn send_frame(client: &TestClient, dongle: uuid::Uuid, data_hex: &str) {
    let res = client
        .post_json(
            &format!("/dongles/{dongle}/can/send"),
            json!({"can_id": 0x7df, "is_extended": false, "data_hex": data_hex}),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn events_resume_and_reset(pool: PgPool) {
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (status, stream, content_type) = Sse::open(&owner.client, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("text/event-stream"));
    let mut stream = stream.unwrap();

    send_frame(&owner.client, owner.dongle_id, "0201").await;
    let first = stream.next().await;
    assert_eq!(first.name, "can_frame");
    assert_eq!(first.data["direction"], "tx");
    assert_eq!(first.data["data_hex"], "0201");
    // The fields of v0.7 section 18.4.
    assert_eq!(first.data["id"], "0x7DF");
    assert_eq!(first.data["is_extended"], false);
    assert_eq!(first.data["dlc"], 2);
    assert_eq!(first.data["bus"], 0);
    let ts = first.data["ts"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
    let first_id = first.id.unwrap();

    let queued = owner
        .client
        .post_json(
            &format!("/dongles/{}/commands", owner.dongle_id),
            json!({"command": "version"}),
        )
        .await;
    assert!(queued.status().is_success());
    let command = stream.next().await;
    assert_eq!(command.name, "command_status");
    assert_eq!(command.data["status"], "queued");
    assert!(command.id.unwrap() > first_id, "ids strictly increase");
    drop(stream);

    // Back with the first id: everything after it again, in order.
    send_frame(&owner.client, owner.dongle_id, "0202").await;
    let (_, resumed, _) = Sse::open(&owner.client, &path, Some(first_id)).await;
    let mut resumed = resumed.unwrap();
    // The command's status, then the frame (with the bus figures of the console, every 2 s, and the
    // command's entry in the history between).
    let mut again = resumed.next().await;
    while again.name == "bus_load" {
        again = resumed.next().await;
    }
    assert_eq!(again.name, "command_status");
    let mut later = resumed.next().await;
    while ["command_status", "bus_load", "cli_telemetry"].contains(&later.name.as_str()) {
        later = resumed.next().await;
    }
    assert_eq!(later.name, "can_frame");
    assert_eq!(later.data["data_hex"], "0202");
    assert!(later.id.unwrap() > again.id.unwrap());

    // Back with an id older than the ring keeps: told so, and then live.
    let (_, reset, _) = Sse::open(&owner.client, &path, Some(first_id - 1_000_000)).await;
    let mut reset = reset.unwrap();
    let notice = reset.next().await;
    assert_eq!(notice.name, "stream_reset");
    assert_eq!(notice.id, None);
    send_frame(&owner.client, owner.dongle_id, "0203").await;
    let mut live = reset.next().await;
    while live.name != "can_frame" {
        live = reset.next().await;
    }
    assert_eq!(live.data["data_hex"], "0203");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn only_the_owner_watches(pool: PgPool) {
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (status, _, _) = Sse::open(&bob, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = Sse::open(&app.client(), &path, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let group = format!("/streams/groups/{}/console", uuid::Uuid::new_v4());
    let (status, _, _) = Sse::open(&owner.client, &group, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A stream checked access only when it opened, then streamed for ever. Now it ends, after one
/// `access_ended` event, within a few seconds of its caller losing access: the dongle unpaired, the
/// session logged out, the agent token revoked, the group deleted.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_console_stream_ends_when_its_caller_loses_access(pool: PgPool) {
    let app = spawn_app_with(pool, |c| c.stream_recheck = Duration::from_millis(200)).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let dongle = format!("/streams/dongles/{}/console", owner.dongle_id);
    let ended = |events: Option<Vec<String>>, what: &str| {
        let events = events.unwrap_or_else(|| panic!("{what}: the stream is still open"));
        assert_eq!(
            events.last().map(String::as_str),
            Some("access_ended"),
            "{what}: {events:?}"
        );
    };

    // An agent token that is revoked.
    let mut by_agent = owner
        .client
        .http
        .get(owner.client.api(&dongle))
        .bearer_auth(&owner.token);
    by_agent = by_agent.header("accept", "text/event-stream");
    let response = by_agent.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut agent_stream = Sse {
        response,
        buffer: String::new(),
    };
    let agents = common::read(owner.client.get("/agents").await).await;
    let agent_id = agents.json["items"][0]["id"].as_str().unwrap().to_string();
    let res = owner
        .client
        .delete(&format!("/agents/{agent_id}/tokens"))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    ended(
        agent_stream.until_closed(Duration::from_secs(5)).await,
        "revoked agent token",
    );

    // The dongle unpaired.
    let (_, stream, _) = Sse::open(&owner.client, &dongle, None).await;
    let mut stream = stream.unwrap();
    let res = owner
        .client
        .post_json(&format!("/dongles/{}/unpair", owner.dongle_id), json!({}))
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    ended(
        stream.until_closed(Duration::from_secs(5)).await,
        "unpaired",
    );

    // A group deleted, and a session logged out.
    let mut bob = paired(&app, "bob@example.com", "00000000000000c2", 0).await;
    let (_, token) = common::agent::register(&bob.client).await;
    let agent = common::agent::TestAgent::connect(&app.base, &token).await;
    agent.report(&app.pool, &["00000000000000c3"]).await;
    let second = common::data::pair(&app, &bob.client, "00000000000000c3").await;
    let group = common::read(
        bob.client
            .post_json(
                "/groups",
                json!({"dongle_a_id": bob.dongle_id, "dongle_b_id": second}),
            )
            .await,
    )
    .await;
    let group_id = group.json["id"].as_str().unwrap().to_string();
    let (status, stream, _) = Sse::open(
        &bob.client,
        &format!("/streams/groups/{group_id}/console"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut stream = stream.unwrap();
    let res = bob.client.delete(&format!("/groups/{group_id}")).await;
    assert!(res.status().is_success(), "{}", res.status());
    ended(
        stream.until_closed(Duration::from_secs(5)).await,
        "group deleted",
    );

    let bob_dongle = format!("/streams/dongles/{}/console", bob.dongle_id);
    let (_, stream, _) = Sse::open(&bob.client, &bob_dongle, None).await;
    let mut stream = stream.unwrap();
    let res = bob.client.post_json("/auth/logout", json!({})).await;
    assert!(res.status().is_success(), "{}", res.status());
    bob.client.csrf = None;
    ended(
        stream.until_closed(Duration::from_secs(5)).await,
        "logged out",
    );
}

/// The `watch` messages `agent` received so far.
fn watches(agent: &common::agent::TestAgent) -> Vec<control_proto::Watch> {
    agent.seen.lock().unwrap().watches.clone()
}

/// A console opened on a dongle in no group asks its agent for the dongle's traffic (at once, and again
/// while it stays open); closing it tells the agent to stop. An agent whose protocol predates `watch`
/// is never sent one (it would take the unknown message for a violation).
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_open_console_asks_the_agent_for_the_dongles_traffic_and_closing_it_stops_it(
    pool: PgPool,
) {
    use common::agent::{self, TestAgent, wait_until};
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    assert!(watches(&owner.agent).is_empty(), "nobody watches yet");
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (_, stream, _) = Sse::open(&owner.client, &path, None).await;
    let stream = stream.unwrap();
    wait_until(|| async {
        watches(&owner.agent).iter().any(|w| {
            w.device_ids == [DEV.parse().unwrap()] && w.seconds == control_proto::WATCH_SECS
        })
    })
    .await;
    drop(stream);
    wait_until(|| async {
        watches(&owner.agent)
            .last()
            .is_some_and(|w| w.device_ids == [DEV.parse().unwrap()] && w.seconds == 0)
    })
    .await;

    // An agent of protocol 3 serving a watched dongle: no `watch`, and its connection stays open.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, token) = agent::register(&bob).await;
    let old = TestAgent::connect_speaking(&app.base, &token, 3).await;
    old.report_caps(&app.pool, &[("00000000000000c2", 0)]).await;
    let dongle = common::data::pair(&app, &bob, "00000000000000c2").await;
    let (_, stream, _) = Sse::open(&bob, &format!("/streams/dongles/{dongle}/console"), None).await;
    tokio::time::sleep(Duration::from_millis(
        2500 + 1000 * u64::from(control_proto::WATCH_REFRESH_SECS),
    ))
    .await;
    assert!(watches(&old).is_empty());
    assert!(!old.is_closed());
    drop(stream);
}

/// MONITOR messages show on the dongle's console, with the agent's sampling said in `sampled`; an agent
/// cannot put frames on the console of a dongle that is not its user's, and one that keeps trying is
/// disconnected.
#[sqlx::test(migrator = "MIGRATOR")]
async fn monitored_frames_reach_only_their_own_dongles_console(pool: PgPool) {
    use common::data::{DataClient, batch};
    use control_proto::data::{Direction, encode_monitor};
    use firmware_proto::ids::DeviceId;
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (_, stream, _) = Sse::open(&owner.client, &path, None).await;
    let mut stream = stream.unwrap();
    let device: DeviceId = DEV.parse().unwrap();

    let mut data = DataClient::connect(&app.base, &owner.token).await;
    // Ten frames seen, two sent: each shown one for five.
    data.send_raw(encode_monitor(device, Direction::Rx, 10, &batch([7, 8])))
        .await;
    let mut shown = Vec::new();
    while shown.len() < 2 {
        let event = stream.next().await;
        if event.name == "can_frame" {
            shown.push(event.data);
        }
    }
    assert_eq!(shown[0]["direction"], "rx");
    assert_eq!(shown[0]["dongle_id"], owner.dongle_id.to_string());
    assert_eq!(shown[0]["sampled"], 5);

    // Bob's agent names Alice's dongle: nothing reaches her console, and Bob's connection is closed.
    let (bob, _) = app.logged_in("bob@example.com", Role::User).await;
    let (_, token) = common::agent::register(&bob).await;
    let mut intruder = DataClient::connect(&app.base, &token).await;
    for _ in 0..150 {
        intruder
            .send_raw(encode_monitor(device, Direction::Rx, 1, &batch([666])))
            .await;
    }
    assert!(intruder.closed_within(Duration::from_secs(10)).await);
    // Alice's own frame after the intruder's: the first frame her console shows again.
    data.send_raw(encode_monitor(device, Direction::Rx, 1, &batch([9])))
        .await;
    let next = loop {
        let event = stream.next().await;
        if event.name == "can_frame" {
            break event.data;
        }
    };
    assert!(next.get("sampled").is_none(), "{next}");
    assert_eq!(next["data_hex"], "00000009", "{next}");
}

/// A dongle's presence says which agent and when (v0.7 section 18.4).
#[sqlx::test(migrator = "MIGRATOR")]
async fn presence_names_the_agent_and_the_time(pool: PgPool) {
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (_, stream, _) = Sse::open(&owner.client, &path, None).await;
    let mut stream = stream.unwrap();
    owner.agent.disconnect();
    let presence = loop {
        let event = stream.next().await;
        if event.name == "presence" {
            break event.data;
        }
    };
    assert_eq!(presence["online"], false, "{presence}");
    assert_eq!(presence["dongle_id"], owner.dongle_id.to_string());
    assert_eq!(presence["agent_id"], owner.agent.agent_id.to_string());
    let seen_at = presence["seen_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(seen_at).is_ok(),
        "{seen_at}"
    );
}

/// A watched dongle's console says how busy its bus is: frames per second (every frame the agent
/// counted, not only the sample it sent) and the share of the bus at the configured bitrate.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_console_shows_the_bus_load(pool: PgPool) {
    use common::data::{DataClient, batch};
    use control_proto::data::{Direction, encode_monitor};
    let app = spawn_app(pool).await;
    let owner = paired(&app, "alice@example.com", DEV, 0).await;
    let applied = owner
        .client
        .put_json(
            &format!("/dongles/{}/can-config", owner.dongle_id),
            json!({"bitrate": 500000, "sample_point_permille": 875}),
        )
        .await;
    assert_eq!(applied.status(), StatusCode::OK);
    let path = format!("/streams/dongles/{}/console", owner.dongle_id);
    let (_, stream, _) = Sse::open(&owner.client, &path, None).await;
    let mut stream = stream.unwrap();
    let mut data = DataClient::connect(&app.base, &owner.token).await;
    // 4 000 frames of 4 bytes seen, a sample of 4 sent: about 2 000 frames/s over the 2 s period.
    data.send_raw(encode_monitor(
        DEV.parse().unwrap(),
        Direction::Rx,
        4000,
        &batch([1, 2, 3, 4]),
    ))
    .await;
    let load = loop {
        let event = stream.next().await;
        if event.name == "bus_load" && event.data["frames_per_sec"].as_f64().unwrap() > 0.0 {
            break event.data;
        }
    };
    assert_eq!(load["dongle_id"], owner.dongle_id.to_string());
    assert_eq!(load["bitrate"], 500000);
    let fps = load["frames_per_sec"].as_f64().unwrap();
    assert!((1000.0..=4000.0).contains(&fps), "{load}");
    // Each 4-byte frame takes 87 bits with average stuffing: 2 000 frames/s are about a third of
    // 500 kbit/s.
    let bits = bridge_server::console::bus_load::frame_bits(false, 4) as f64;
    assert_eq!(bits, 87.0);
    let percent = load["load_percent"].as_f64().unwrap();
    let expected = fps * bits / 500_000.0 * 100.0;
    assert!((percent - expected).abs() < 0.2, "{load}");
}
