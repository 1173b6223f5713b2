//! A test data-plane client: a tokio-tungstenite client on `/ws/data` speaking `control_proto::data`, as
//! the real agent's data plane does; and a user with two paired dongles on two agents, for the relay's
//! tests.
//!
//! Test frames carry a number in their data (4 bytes, big-endian), so a test can check order and
//! completeness by reading the numbers back.

use std::collections::VecDeque;
use std::time::Duration;

use bridge_server::users::Role;
use control_proto::data::{self, DataMessage, Kind, Side};
use firmware_proto::ext::batch::{CanRecord, encode_batch};
use firmware_proto::ids::CanId;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::agent::{self, PIN, TestAgent};
use super::{TestApp, TestClient, read};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the client received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// FRAMES: the position of the first frame and each frame's number.
    Frames {
        group: Uuid,
        side: Side,
        first: u64,
        numbers: Vec<u32>,
    },
    Ack {
        group: Uuid,
        side: Side,
        next: u64,
    },
    Drops {
        group: Uuid,
        side: Side,
        total: u64,
    },
    /// The server closed the connection.
    Closed,
}

/// One chunk of `n` frames at `seq`, as the relay stores them: each frame's data is its position
/// (8 bytes, big-endian).
pub fn stored_chunk(seq: u64, n: u32) -> bridge_server::groups::chunk::Chunk {
    use firmware_proto::ext::batch::BatchWriter;
    let mut buf = vec![0u8; data::MAX_MESSAGE_LEN];
    let mut writer = BatchWriter::new(&mut buf).unwrap();
    for i in 0..n {
        writer
            .push(&CanRecord {
                timestamp_us: 0,
                id: CanId::standard(0x123).unwrap(),
                flags: 0,
                data: &(seq + u64::from(i)).to_be_bytes(),
            })
            .unwrap();
    }
    let len = writer.finish().unwrap();
    bridge_server::groups::chunk::Chunk {
        seq,
        count: n,
        batch: buf[..len].into(),
    }
}

/// A batch of test frames numbered `numbers` (id 0x100, 4 data bytes).
pub fn batch(numbers: impl IntoIterator<Item = u32>) -> Vec<u8> {
    let data: Vec<[u8; 4]> = numbers.into_iter().map(u32::to_be_bytes).collect();
    let records: Vec<CanRecord> = data
        .iter()
        .map(|d| CanRecord::classic(0, CanId::standard(0x100).unwrap(), d))
        .collect();
    let mut buf = vec![0u8; 4 + records.len() * 20];
    let n = encode_batch(&records, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn decode(bytes: &[u8]) -> Option<Received> {
    let m = DataMessage::decode(bytes).ok()?;
    Some(match m.kind {
        Kind::Frames => Received::Frames {
            group: m.group_id,
            side: m.side,
            first: m.n,
            numbers: m
                .batch?
                .iter()
                .map(|r| u32::from_be_bytes(r.data.try_into().unwrap_or([0xff; 4])))
                .collect(),
        },
        Kind::Ack => Received::Ack {
            group: m.group_id,
            side: m.side,
            next: m.n,
        },
        Kind::Drops => Received::Drops {
            group: m.group_id,
            side: m.side,
            total: m.n,
        },
    })
}

/// Opens `/ws/data` with `token`; Err with the HTTP status when refused.
pub async fn try_connect(base: &str, token: &str) -> Result<Socket, u16> {
    let url = format!("{}/ws/data", base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("unexpected WebSocket error: {e}"),
    }
}

/// A data-plane connection.
pub struct DataClient {
    sink: SplitSink<Socket, Message>,
    rx: mpsc::UnboundedReceiver<Received>,
    /// Received and not yet taken by a `wait_*` call.
    kept: VecDeque<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl DataClient {
    pub async fn connect(base: &str, token: &str) -> Self {
        let ws = try_connect(base, token)
            .await
            .expect("the upgrade succeeds");
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                match frame {
                    Ok(Message::Binary(bytes)) => {
                        if let Some(m) = decode(&bytes) {
                            let _ = tx.send(m);
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = tx.send(Received::Closed);
        });
        Self {
            sink,
            rx,
            kept: VecDeque::new(),
            task,
        }
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.sink.send(Message::Binary(bytes.into())).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        let _ = self.sink.send(Message::text(text)).await;
    }

    /// FRAMES of `side` from position `first`, numbered `numbers`.
    pub async fn send_frames(
        &mut self,
        group: Uuid,
        side: Side,
        first: u64,
        numbers: impl IntoIterator<Item = u32>,
    ) {
        let message = data::encode_frames(group, side, first, &batch(numbers));
        self.send_raw(message).await;
    }

    pub async fn ack(&mut self, group: Uuid, side: Side, next: u64) {
        self.send_raw(data::encode_ack(group, side, next)).await;
    }

    pub async fn drops(&mut self, group: Uuid, side: Side, total: u64) {
        self.send_raw(data::encode_drops(group, side, total)).await;
    }

    /// The next message, waiting up to `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Received> {
        if let Some(m) = self.kept.pop_front() {
            return Some(m);
        }
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits (up to 10 s) for an ACK of `side` of at least `at_least`; other messages are kept.
    pub async fn wait_ack(&mut self, group: Uuid, side: Side, at_least: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut other = VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.next(left).await.unwrap_or_else(|| {
                panic!("no ACK of {side:?} up to {at_least} in 10 s; other messages: {other:?}")
            });
            match m {
                Received::Ack {
                    group: g,
                    side: s,
                    next,
                } if g == group && s == side && next >= at_least => {
                    other.extend(self.kept.drain(..));
                    self.kept = other;
                    return next;
                }
                Received::Ack { .. } => {}
                Received::Closed => panic!("the connection closed while waiting for an ACK"),
                m => other.push_back(m),
            }
        }
    }

    /// Receives frames towards `side` as the real agent does (positions below the next expected one
    /// are skipped, each FRAMES message is acknowledged when `ack`), until `count` new frames arrived.
    /// Returns every (position, number) received, repeats included, in arrival order.
    pub async fn receive(
        &mut self,
        group: Uuid,
        side: Side,
        count: usize,
        ack: bool,
    ) -> Vec<(u64, u32)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut all = Vec::new();
        let mut fresh = 0usize;
        let mut next_expected: Option<u64> = None;
        let mut other = VecDeque::new();
        while fresh < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self.next(left).await.unwrap_or_else(|| {
                panic!("{fresh} of {count} frames in 10 s: {all:?}; other messages: {other:?}")
            });
            match m {
                Received::Frames {
                    group: g,
                    side: s,
                    first,
                    numbers,
                } if g == group && s == side => {
                    let end = first + numbers.len() as u64;
                    for (i, number) in numbers.into_iter().enumerate() {
                        let position = first + i as u64;
                        all.push((position, number));
                        if next_expected.is_none_or(|n| position >= n) {
                            fresh += 1;
                        }
                    }
                    next_expected = Some(next_expected.map_or(end, |n| n.max(end)));
                    if ack {
                        self.ack(group, side, end).await;
                    }
                }
                Received::Closed => panic!("the connection closed after {fresh} of {count} frames"),
                m => other.push_back(m),
            }
        }
        other.extend(self.kept.drain(..));
        self.kept = other;
        all
    }

    /// Asserts that no FRAMES message arrives for `window`, and returns the other messages seen.
    pub async fn no_frames(&mut self, window: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + window;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return seen;
            }
            match self.next(left).await {
                Some(m @ Received::Frames { .. }) => panic!("unexpected frames: {m:?}"),
                Some(m) => seen.push(m),
                None => return seen,
            }
        }
    }

    /// True once the server closed the connection (waits up to `timeout`).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Received::Closed) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }

    /// Drops the connection without a close handshake, as a crash or a cut cable would.
    pub fn cut(self) {
        self.task.abort();
        drop(self.sink);
    }
}

/// A user with two paired dongles, each served by its own agent (with its control connection open).
pub struct TwoDongles {
    pub client: TestClient,
    pub user_id: Uuid,
    pub agent_a: TestAgent,
    pub token_a: String,
    pub dongle_a: Uuid,
    pub agent_b: TestAgent,
    pub token_b: String,
    pub dongle_b: Uuid,
}

/// Pairs `device_id`, which `agent` already reports, to the client's user.
pub async fn pair(app: &TestApp, client: &TestClient, device_id: &str) -> Uuid {
    let dongle_id: Uuid = sqlx::query_scalar("SELECT id FROM dongles WHERE device_id = $1")
        .bind(device_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let started = read(
        client
            .post_json(
                &format!("/dongles/{dongle_id}/pairing-mode"),
                json!({"action": "start"}),
            )
            .await,
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text);
    let paired = read(
        client
            .post_json(
                &format!("/dongles/{dongle_id}/pairing-submit"),
                json!({"pairing_session_id": started.json["pairing_session_id"], "pin": PIN}),
            )
            .await,
    )
    .await;
    assert_eq!(paired.status, StatusCode::OK, "{}", paired.text);
    dongle_id
}

/// Logs in a new user, connects two agents of theirs reporting `dev_a` and `dev_b`, and pairs both.
pub async fn two_dongles(app: &TestApp, email: &str, dev_a: &str, dev_b: &str) -> TwoDongles {
    let (client, user_id) = app.logged_in(email, Role::User).await;
    let (_, token_a) = agent::register(&client).await;
    let (_, token_b) = agent::register(&client).await;
    let agent_a = TestAgent::connect(&app.base, &token_a).await;
    agent_a.report(&app.pool, &[dev_a]).await;
    let dongle_a = pair(app, &client, dev_a).await;
    let agent_b = TestAgent::connect(&app.base, &token_b).await;
    agent_b.report(&app.pool, &[dev_b]).await;
    let dongle_b = pair(app, &client, dev_b).await;
    TwoDongles {
        client,
        user_id,
        agent_a,
        token_a,
        dongle_a,
        agent_b,
        token_b,
        dongle_b,
    }
}

/// Creates a group of two dongles and activates it; returns its id.
pub async fn active_group(client: &TestClient, a: Uuid, b: Uuid) -> Uuid {
    let created = read(
        client
            .post_json("/groups", json!({"dongle_a_id": a, "dongle_b_id": b}))
            .await,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id: Uuid = created.json["id"].as_str().unwrap().parse().unwrap();
    let activated = read(
        client
            .post_json(&format!("/groups/{id}/activate"), json!({}))
            .await,
    )
    .await;
    assert_eq!(activated.status, StatusCode::OK, "{}", activated.text);
    id
}

/// `GET /groups/{id}`.
pub async fn group(client: &TestClient, id: Uuid) -> Value {
    let answer = read(client.get(&format!("/groups/{id}")).await).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.json
}

/// Waits (up to 10 s) until `GET /groups/{id}` satisfies `check`; returns that answer.
pub async fn group_until(client: &TestClient, id: Uuid, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..500 {
        last = group(client, id).await;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the group never got there; last: {last}");
}
