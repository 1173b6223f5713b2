//! A test agent: a tokio-tungstenite client speaking `control_proto` on `/ws/agent`, answering the
//! server's requests as a dongle behind a real agent would (pairing start with a nonce, pairing submit ok
//! only for the PIN the test chose; CAN configurations, commands and frames as the test configures), and
//! recording what it was sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::{
    AgentMessage, CanEffective, CommandOutcome, CommandResult, DongleReport, Hello, Reply,
    ReplyError, ReplyErrorCode, ReplyOk, ReplyResult, RequestBody, ServerMessage, Transport,
};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use super::{TestClient, read};

/// The PIN the test dongles show.
pub const PIN: &str = "123456";
pub const NONCE: &str = "0123456789abcdef0123456789abcdef";

/// Registers an agent for the client's user: (agent id, token).
pub async fn register(client: &TestClient) -> (Uuid, String) {
    let answer = read(
        client
            .post_json("/agents/register", json!({"agent_name": "bench"}))
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    (
        answer.json["agent_id"].as_str().unwrap().parse().unwrap(),
        answer.json["agent_token"].as_str().unwrap().to_string(),
    )
}

/// What the test agent saw and how it behaves.
#[derive(Default)]
pub struct Seen {
    pub pairing_starts: usize,
    pub pairing_submits: usize,
    /// The tokens of accepted pairing submits, base64.
    pub paired_tokens: Vec<String>,
    /// `dongle_token` messages: (device id, token).
    pub dongle_tokens: Vec<(String, String)>,
    pub forgets: Vec<String>,
    pub errors: Vec<String>,
    /// How long the "dongle" takes to answer a pairing submit.
    pub submit_delay: Duration,
    /// The device ids of the last report; a pairing start re-reports them (the dongle is now in pairing
    /// mode) before it answers, as a real agent does.
    pub reported: Vec<String>,
    /// Capability bits reported by [`TestAgent::report_caps`] (others report CAN FD, as
    /// [`usb_dongle`] does), kept in the re-report of a pairing start.
    pub capabilities: std::collections::HashMap<String, u32>,
    /// How the "dongle" answers a CAN configuration: Ok echoes it with derived effective values.
    pub can_config_answer: Answer,
    /// Every CAN configuration request received.
    pub can_configs: Vec<RequestBody>,
    /// How the agent answers a command request: Ok is `command_accepted`.
    pub command_answer: Answer,
    /// What the "dongle" does with an accepted command.
    pub command: CommandPlan,
    /// Every command delivery: (command id, line, allow_dangerous), duplicates included.
    pub commands: Vec<(Uuid, String, bool)>,
    /// `command_result_ack` ids received.
    pub acks: Vec<Uuid>,
    /// Results sent, duplicates included.
    pub results_sent: Vec<Uuid>,
    /// How the "dongle" answers a frame to send.
    pub frame_answer: Answer,
    /// Frames received: (can id, extended, data hex, fd).
    pub frames: Vec<(u32, bool, String, bool)>,
    /// `groups` messages received, in order.
    pub groups: Vec<control_proto::Groups>,
    /// `watch` messages received, in order.
    pub watches: Vec<control_proto::Watch>,
    /// `cli_telemetry_ack` report ids received.
    pub telemetry_acks: Vec<Uuid>,
    /// Host commands received.
    pub host_commands: Vec<control_proto::HostCommand>,
    /// How the agent answers a host command: Ok prints `<name> ok`.
    pub host_answer: Answer,
}

/// How the test agent answers a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Answer {
    /// The success reply of the request.
    #[default]
    Ok,
    /// An error reply with code `refused` and this message (a NACK).
    Refuse(String),
    /// No reply at all.
    Silent,
    /// A reply of the right id whose body does not parse as a control message (a CAN configuration
    /// in a mode no dongle has), as a broken or hostile agent might send.
    Garbled,
}

/// What the test "dongle" does with an accepted command.
#[derive(Debug, Clone)]
pub struct CommandPlan {
    /// How long after accepting it the result is sent.
    pub delay: Duration,
    /// False: the command never ends (no result is ever sent).
    pub send_result: bool,
    pub outcome: CommandOutcome,
    pub exit_code: i32,
    /// The output; None: `ran <line>\n`.
    pub output: Option<String>,
    pub truncated: bool,
    /// Sent as the result's message (stderr).
    pub message: Option<String>,
    /// Resend the result every this long until it is acknowledged.
    pub resend_every: Duration,
}

impl Default for CommandPlan {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            send_result: true,
            outcome: CommandOutcome::Done,
            exit_code: 0,
            output: None,
            truncated: false,
            message: None,
            resend_every: Duration::from_millis(300),
        }
    }
}

pub struct TestAgent {
    pub agent_id: Uuid,
    pub seen: Arc<Mutex<Seen>>,
    out: mpsc::UnboundedSender<AgentMessage>,
    task: tokio::task::JoinHandle<()>,
}

/// Opens `/ws/agent` with `token`; Err with the HTTP status when refused.
pub async fn try_connect(
    base: &str,
    token: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    u16,
> {
    let url = format!("{}/ws/agent", base.replacen("http://", "ws://", 1));
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

impl TestAgent {
    /// Connects, says hello, and waits for the welcome.
    pub async fn connect(base: &str, token: &str) -> Self {
        Self::connect_speaking(base, token, control_proto::PROTOCOL_VERSION).await
    }

    /// [`TestAgent::connect`] for an agent whose hello says `protocol`.
    pub async fn connect_speaking(base: &str, token: &str, protocol: u32) -> Self {
        let hello = Hello {
            protocol,
            agent_version: "test-0.1".into(),
            hostname: "bench-host".into(),
            os: "linux".into(),
            interfaces: vec![],
        };
        Self::connect_with(base, token, hello).await
    }

    /// [`TestAgent::connect`] with this hello.
    pub async fn connect_with(base: &str, token: &str, hello: Hello) -> Self {
        let mut ws = try_connect(base, token)
            .await
            .expect("the upgrade succeeds");
        let hello = AgentMessage::Hello(hello);
        ws.send(Message::text(hello.to_json())).await.unwrap();
        let agent_id = loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("a welcome in time")
                .expect("open")
                .unwrap();
            if let Message::Text(text) = frame
                && let ServerMessage::Welcome(w) = ServerMessage::from_json(text.as_str()).unwrap()
            {
                assert_eq!(w.heartbeat_secs, 10);
                break w.agent_id;
            }
        };
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (out, mut out_rx) = mpsc::unbounded_channel::<AgentMessage>();
        let (mut sink, mut stream) = ws.split();
        let seen2 = seen.clone();
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel::<String>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(m) = out_rx.recv() => {
                        if sink.send(Message::text(m.to_json())).await.is_err() { break; }
                    }
                    Some(text) = reply_rx.recv() => {
                        if sink.send(Message::text(text)).await.is_err() { break; }
                    }
                    frame = stream.next() => {
                        let Some(Ok(Message::Text(text))) = frame else {
                            if frame.is_none() || matches!(frame, Some(Err(_))) { break; }
                            continue;
                        };
                        let msg = ServerMessage::from_json(text.as_str()).unwrap();
                        handle(&seen2, msg, &reply_tx);
                    }
                }
            }
        });
        Self {
            agent_id,
            seen,
            out,
            task,
        }
    }

    pub fn send(&self, message: AgentMessage) {
        self.out.send(message).unwrap();
    }

    /// Reports `device_ids` as present USB dongles (a full snapshot) and waits until the server has
    /// recorded it.
    pub async fn report(&self, pool: &sqlx::PgPool, device_ids: &[&str]) {
        self.send(AgentMessage::Devices(control_proto::Devices {
            dongles: device_ids.iter().map(|d| usb_dongle(d)).collect(),
        }));
        let ids: Vec<String> = device_ids.iter().map(|d| d.to_string()).collect();
        self.seen.lock().unwrap().reported = ids.clone();
        wait_until(|| async {
            // The agent's own sighting: an owned dongle's row changes only on its owner's reports.
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dongles d JOIN dongle_sightings s ON s.dongle_id = d.id \
                 WHERE d.device_id = ANY($1) AND s.present AND s.agent_id = $2",
            )
            .bind(&ids)
            .bind(self.agent_id)
            .fetch_one(pool)
            .await
            .unwrap();
            n == ids.len() as i64
        })
        .await;
    }

    /// Reports dongles with their capability bits, (device id, capabilities), as a full snapshot, and
    /// waits until the server has recorded it.
    pub async fn report_caps(&self, pool: &sqlx::PgPool, dongles: &[(&str, u32)]) {
        self.send(AgentMessage::Devices(control_proto::Devices {
            dongles: dongles
                .iter()
                .map(|(d, caps)| DongleReport {
                    capabilities: *caps,
                    ..usb_dongle(d)
                })
                .collect(),
        }));
        let ids: Vec<String> = dongles.iter().map(|(d, _)| d.to_string()).collect();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.reported = ids.clone();
            for (d, caps) in dongles {
                seen.capabilities.insert(d.to_string(), *caps);
            }
        }
        let caps: Vec<i64> = dongles.iter().map(|(_, c)| *c as i64).collect();
        wait_until(|| async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM dongles d JOIN unnest($1::text[], $3::bigint[]) AS r(id, caps) \
                 ON r.id = d.device_id JOIN dongle_sightings s ON s.dongle_id = d.id \
                 JOIN agents a ON a.id = s.agent_id \
                 WHERE s.present AND s.agent_id = $2 AND (d.capabilities = r.caps \
                   OR (d.owner_user_id IS NOT NULL AND d.owner_user_id <> a.user_id))",
            )
            .bind(&ids)
            .bind(self.agent_id)
            .bind(&caps)
            .fetch_one(pool)
            .await
            .unwrap();
            n == ids.len() as i64
        })
        .await;
    }

    pub fn close(self) {
        self.task.abort();
    }

    /// Whether the server ended the connection (or it was dropped).
    pub fn is_closed(&self) -> bool {
        self.task.is_finished()
    }

    /// Drops the connection (as [`TestAgent::close`]) but keeps what it recorded readable.
    pub fn disconnect(&self) {
        self.task.abort();
    }
}

/// Polls `check` every 20 ms for up to 10 s.
pub async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the condition did not become true in 10 s");
}

/// A token in its wire form, standard base64, as the tests compare tokens.
pub fn base64_of(token: &control_proto::Token) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(token.as_bytes())
}

pub fn usb_dongle(device_id: &str) -> DongleReport {
    DongleReport {
        device_id: device_id.parse().expect("a device id"),
        fw_build: "1.4.2".into(),
        proto_ver: 1,
        capabilities: 1,
        transport: Transport::Usb {
            path: "/dev/ttyACM0".into(),
            serial_number: Some("SN1".into()),
        },
        pairing_mode: false,
        present: true,
        claimed: false,
    }
}

fn handle(seen: &Arc<Mutex<Seen>>, msg: ServerMessage, reply: &mpsc::UnboundedSender<String>) {
    match msg {
        ServerMessage::Request(req) => {
            let id = req.id;
            let seen = seen.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let result = match req.body {
                    RequestBody::PairingStart { device_id, .. } => {
                        let (reported, capabilities) = {
                            let mut s = seen.lock().unwrap();
                            s.pairing_starts += 1;
                            (s.reported.clone(), s.capabilities.clone())
                        };
                        let dongles = reported
                            .iter()
                            .map(|d| {
                                let base = usb_dongle(d);
                                DongleReport {
                                    pairing_mode: *d == device_id.to_string(),
                                    capabilities: capabilities
                                        .get(d)
                                        .copied()
                                        .unwrap_or(base.capabilities),
                                    ..base
                                }
                            })
                            .collect();
                        let _ = reply.send(
                            AgentMessage::Devices(control_proto::Devices { dongles }).to_json(),
                        );
                        ReplyResult::Ok {
                            body: ReplyOk::PairingStarted {
                                pairing_nonce: NONCE.into(),
                                expires_in_ms: 120_000,
                            },
                        }
                    }
                    RequestBody::PairingSubmit {
                        pin,
                        token,
                        pairing_nonce,
                        ..
                    } => {
                        let delay = {
                            let mut s = seen.lock().unwrap();
                            s.pairing_submits += 1;
                            s.submit_delay
                        };
                        tokio::time::sleep(delay).await;
                        assert_eq!(pairing_nonce, NONCE);
                        if pin.as_str() == PIN {
                            seen.lock().unwrap().paired_tokens.push(base64_of(&token));
                            ReplyResult::Ok {
                                body: ReplyOk::Paired,
                            }
                        } else {
                            ReplyResult::Error(ReplyError {
                                code: ReplyErrorCode::InvalidPin,
                                message: "wrong PIN".into(),
                            })
                        }
                    }
                    RequestBody::Forget { device_id } => {
                        seen.lock().unwrap().forgets.push(device_id.to_string());
                        ReplyResult::Ok {
                            body: ReplyOk::Forgotten,
                        }
                    }
                    body @ RequestBody::CanConfig { .. } => {
                        let answer = {
                            let mut s = seen.lock().unwrap();
                            s.can_configs.push(body.clone());
                            s.can_config_answer.clone()
                        };
                        match answer {
                            Answer::Ok => ReplyResult::Ok {
                                body: ReplyOk::CanConfigApplied {
                                    effective: effective_of(&body),
                                },
                            },
                            Answer::Refuse(message) => refused(message),
                            Answer::Silent => return,
                            Answer::Garbled => {
                                let mut text = AgentMessage::Reply(Reply {
                                    id,
                                    result: ReplyResult::Ok {
                                        body: ReplyOk::CanConfigApplied {
                                            effective: effective_of(&body),
                                        },
                                    },
                                })
                                .to_json();
                                text = text.replace(r#""mode":""#, r#""mode":"warp_"#);
                                let _ = reply.send(text);
                                return;
                            }
                        }
                    }
                    RequestBody::Command {
                        command_id,
                        device_id,
                        line,
                        allow_dangerous,
                        ..
                    } => {
                        let (answer, plan, first) = {
                            let mut s = seen.lock().unwrap();
                            let first = !s.commands.iter().any(|(id, ..)| *id == command_id);
                            s.commands.push((command_id, line.clone(), allow_dangerous));
                            (s.command_answer.clone(), s.command.clone(), first)
                        };
                        match answer {
                            Answer::Ok => {
                                // A command id seen before is not run again, as the real agent does.
                                if first && plan.send_result {
                                    let result = CommandResult {
                                        command_id,
                                        device_id,
                                        outcome: plan.outcome,
                                        exit_code: plan.exit_code,
                                        output: plan
                                            .output
                                            .clone()
                                            .unwrap_or_else(|| format!("ran {line}\n")),
                                        truncated: plan.truncated,
                                        message: plan.message.clone(),
                                    };
                                    tokio::spawn(send_result_until_acked(
                                        seen.clone(),
                                        reply.clone(),
                                        result,
                                        plan,
                                    ));
                                }
                                ReplyResult::Ok {
                                    body: ReplyOk::CommandAccepted,
                                }
                            }
                            Answer::Refuse(message) => refused(message),
                            Answer::Silent | Answer::Garbled => return,
                        }
                    }
                    // A latency run: the echoing side arms at once; the sender answers with fixed figures
                    // (one probe of the run lost), as if the run had taken no time.
                    RequestBody::LatencyProbe { role, .. } => match role {
                        control_proto::ProbeRole::Echo { .. } => ReplyResult::Ok {
                            body: ReplyOk::ProbeArmed,
                        },
                        control_proto::ProbeRole::Send { count, .. } => ReplyResult::Ok {
                            body: ReplyOk::ProbeDone {
                                summary: control_proto::ProbeSummary {
                                    sent: count,
                                    received: count - 1,
                                    duplicates: 0,
                                    out_of_order: 0,
                                    round_trip: Some(control_proto::RoundTrips {
                                        min_us: 900,
                                        p50_us: 1_250,
                                        p95_us: 2_000,
                                        p99_us: 3_500,
                                        max_us: 9_000,
                                    }),
                                },
                            },
                        },
                    },
                    RequestBody::SendFrame {
                        can_id,
                        extended,
                        data,
                        fd,
                        ..
                    } => {
                        let answer = {
                            let mut s = seen.lock().unwrap();
                            s.frames.push((can_id, extended, data, fd));
                            s.frame_answer.clone()
                        };
                        match answer {
                            Answer::Ok => ReplyResult::Ok {
                                body: ReplyOk::FrameSent,
                            },
                            Answer::Refuse(message) => refused(message),
                            Answer::Silent | Answer::Garbled => return,
                        }
                    }
                    RequestBody::HostCommand {
                        run_id,
                        device_id,
                        command,
                    } => {
                        let answer = {
                            let mut s = seen.lock().unwrap();
                            s.host_commands.push(command);
                            s.host_answer.clone()
                        };
                        match answer {
                            Answer::Ok => {
                                // The output streams first, as a real agent's does.
                                let line = format!("{} ok\n", command.name());
                                let _ = reply.send(
                                    AgentMessage::Event(control_proto::Event::HostOutput {
                                        run_id,
                                        device_id,
                                        chunk: line.clone(),
                                    })
                                    .to_json(),
                                );
                                ReplyResult::Ok {
                                    body: ReplyOk::HostCommandDone {
                                        exit_code: 0,
                                        output: line,
                                        truncated: false,
                                    },
                                }
                            }
                            Answer::Refuse(message) => refused(message),
                            Answer::Silent | Answer::Garbled => return,
                        }
                    }
                };
                let _ = reply.send(AgentMessage::Reply(Reply { id, result }).to_json());
            });
        }
        ServerMessage::CommandResultAck { command_id } => {
            seen.lock().unwrap().acks.push(command_id);
        }
        ServerMessage::DongleToken(t) => {
            seen.lock()
                .unwrap()
                .dongle_tokens
                .push((t.device_id.to_string(), base64_of(&t.token)));
        }
        ServerMessage::Error { code, .. } => seen.lock().unwrap().errors.push(code),
        ServerMessage::Groups(groups) => seen.lock().unwrap().groups.push(groups),
        ServerMessage::Watch(watch) => seen.lock().unwrap().watches.push(watch),
        ServerMessage::CliTelemetryAck { report_id } => {
            seen.lock().unwrap().telemetry_acks.push(report_id)
        }
        ServerMessage::Welcome(_) => {}
    }
}

fn refused(message: String) -> ReplyResult {
    ReplyResult::Error(ReplyError {
        code: ReplyErrorCode::Refused,
        message,
    })
}

/// The effective values a dongle reports for a CAN configuration: the request itself, with the timing a
/// 500 kbit/s default would use when the request leaves it to the dongle.
pub fn effective_of(body: &RequestBody) -> CanEffective {
    let RequestBody::CanConfig { settings: s, .. } = body else {
        panic!("not a CAN configuration: {body:?}")
    };
    CanEffective {
        bitrate: s.bitrate,
        sample_point_permille: s.sample_point_permille,
        prescaler: s.prescaler.unwrap_or(10),
        sjw: s.sjw.unwrap_or(1),
        tseg1: s.tseg1.unwrap_or(13),
        tseg2: s.tseg2.unwrap_or(2),
        mode: s.mode,
        use_raw: s.use_raw,
        auto_retx: s.auto_retx,
        tx_pause: s.tx_pause,
        protocol_exc: s.protocol_exc,
    }
}

/// Sends a command's result after the plan's delay, and again until the server acknowledges it, as the
/// real agent's outbox does.
async fn send_result_until_acked(
    seen: Arc<Mutex<Seen>>,
    out: mpsc::UnboundedSender<String>,
    result: CommandResult,
    plan: CommandPlan,
) {
    tokio::time::sleep(plan.delay).await;
    for _ in 0..50 {
        if seen.lock().unwrap().acks.contains(&result.command_id) {
            return;
        }
        seen.lock().unwrap().results_sent.push(result.command_id);
        if out
            .send(AgentMessage::CommandResult(result.clone()).to_json())
            .is_err()
        {
            return;
        }
        tokio::time::sleep(plan.resend_every).await;
    }
}
