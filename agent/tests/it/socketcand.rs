//! The socketcand-compatible endpoint over real TCP on 127.0.0.1: clients that speak socketcand's raw
//! mode (as python-can's `socketcand` interface does) send frames to the group side and receive the
//! group's frames; several tools share the bus; malformed and unsupported commands get errors and the
//! connection survives; slow clients lose frames, counted; and an `EndpointSet` serves the port from
//! `endpoints.json`; and, end to end, a socketcand tool reaches a simulated dongle on the other side of a
//! group through two `bridge-agent` processes and the real server.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;
use common::{Agent, Dongle, Server, active_group, pair};
use dongle_sim::BusTap;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_agent::endpoints::socketcand::MAX_CLIENTS;
use bridge_agent::endpoints::{
    CanEndpoint, EndpointError, EndpointEvent, EndpointOptions, EndpointSet, EndpointSpec,
    EndpointStore, SetOptions,
};
use bridge_agent::home::Home;
use bridge_agent::session::Frame;
use control_proto::CanSettings;
use firmware_proto::ext::batch::flags;
use firmware_proto::ids::CanId;
use firmware_proto::remp::CanMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(3);

/// A socketcand client, reading the server's messages one `< .. >` at a time.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects and goes through the handshake python-can does: hi, open, rawmode.
    async fn raw(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        c.expect("< hi >").await;
        c.send("< open can0 >").await;
        c.expect("< ok >").await;
        c.send("< rawmode >").await;
        c.expect("< ok >").await;
        c
    }

    async fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).await.unwrap();
    }

    async fn message(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'>') {
                let raw: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8(raw).unwrap();
                let start = text.find('<').expect("a message starts with '<'");
                return text[start..].to_string();
            }
            let mut chunk = [0u8; 4096];
            let n = timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("the server said nothing")
                .unwrap();
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn expect(&mut self, wanted: &str) {
        assert_eq!(self.message().await, wanted);
    }

    /// Asserts that nothing arrives for a while.
    async fn quiet(&mut self, wait: Duration) {
        assert!(
            self.buf.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut chunk = [0u8; 256];
        if let Ok(read) = timeout(wait, self.stream.read(&mut chunk)).await {
            let n = read.unwrap();
            panic!("unexpected: {:?}", String::from_utf8_lossy(&chunk[..n]));
        }
    }
}

/// The parts of a `< frame ID SECS.USECS DATA >` message, as python-can splits it.
fn frame_parts(message: &str) -> (String, f64, String) {
    let body = message
        .strip_prefix("< frame ")
        .and_then(|m| m.strip_suffix(" >"))
        .unwrap_or_else(|| panic!("not a frame: {message}"));
    let parts: Vec<&str> = body.splitn(3, ' ').collect();
    (
        parts[0].to_string(),
        parts[1].parse().unwrap(),
        parts[2].to_string(),
    )
}

async fn open() -> (CanEndpoint, SocketAddr) {
    let spec: EndpointSpec = "socketcand:127.0.0.1:0".parse().unwrap();
    let endpoint = CanEndpoint::open(&spec, &EndpointOptions::default())
        .await
        .unwrap();
    let addr = endpoint.info().location.parse().unwrap();
    (endpoint, addr)
}

async fn next_frame(frames: &mut mpsc::Receiver<Frame>) -> Frame {
    timeout(WAIT, frames.recv())
        .await
        .expect("no frame arrived")
        .expect("the endpoint closed")
}

fn std_id(id: u16) -> CanId {
    CanId::standard(id).unwrap()
}

#[tokio::test]
async fn a_raw_mode_client_sends_and_receives_frames() {
    let (endpoint, addr) = open().await;
    let info = endpoint.info();
    assert!(!info.can_set_timing && info.fd);
    assert_eq!(info.identity, "socketcand:127.0.0.1:0");
    let mut frames = endpoint.take_frames().unwrap();

    // python-can reads each handshake reply with one recv and compares it whole.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 256];
    let n = timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"< hi >");
    stream.write_all(b"< open can0 >").await.unwrap();
    let n = timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"< ok >");
    stream.write_all(b"< rawmode >").await.unwrap();
    let n = timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"< ok >");
    let mut client = Client {
        stream,
        buf: Vec::new(),
    };

    // A tool's frames, as python-can writes them (length in hex digits, bytes without padding).
    client.send("< send 7DF 3 2 1 d >").await;
    client.send("< send 18DB33F1 8 2 1 0 0 0 0 0 0 >").await;
    client.send("< send 00000010 0 >").await;
    let f = next_frame(&mut frames).await;
    assert_eq!((f.id, f.data()), (std_id(0x7df), &[2, 1, 0x0d][..]));
    let f = next_frame(&mut frames).await;
    assert_eq!(f.id, CanId::extended(0x18db_33f1).unwrap());
    assert_eq!(f.data(), [2, 1, 0, 0, 0, 0, 0, 0]);
    let f = next_frame(&mut frames).await;
    assert_eq!((f.id, f.data().len()), (CanId::extended(0x10).unwrap(), 0));

    // The group's frames, as python-can reads them.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    endpoint
        .send_frames(&[
            Frame::classic(std_id(0x7e8), &[3, 0x41, 0x0d, 0x32]).unwrap(),
            Frame::classic(CanId::extended(0x18daf110).unwrap(), &[]).unwrap(),
        ])
        .await
        .unwrap();
    let (id, time, data) = frame_parts(&client.message().await);
    assert_eq!((id.as_str(), data.as_str()), ("7E8", "03410D32"));
    assert!(
        (time - now).abs() < 5.0,
        "a wall-clock timestamp, not {time}"
    );
    let (id, _, data) = frame_parts(&client.message().await);
    assert_eq!((id.as_str(), data.as_str()), ("18DAF110", ""));

    // CAN FD both ways, in socketcand's fdsend and fdframe.
    client
        .send(&format!("< fdsend 123 01 12 {} >", "aa ".repeat(12)))
        .await;
    let f = next_frame(&mut frames).await;
    assert!(f.is_fd() && f.fd_flags & flags::BRS != 0);
    assert_eq!(f.data(), [0xaa; 12]);
    endpoint
        .send_frames(&[Frame::with_flags(std_id(0x456), flags::FD, &[0x11; 16]).unwrap()])
        .await
        .unwrap();
    let m = client.message().await;
    assert!(
        m.starts_with("< fdframe 456 04 ") && m.ends_with(&format!(" {} >", "11".repeat(16))),
        "{m}"
    );

    // echo answers at once; bcmmode stops the frames.
    client.send("< echo >").await;
    client.expect("< echo >").await;
    client.send("< bcmmode >").await;
    client.expect("< ok >").await;
    endpoint
        .send_frames(&[Frame::classic(std_id(1), &[1]).unwrap()])
        .await
        .unwrap();
    client.quiet(Duration::from_millis(200)).await;
    // ... and a frame sent then is still the group's.
    client.send("< send 002 1 ff >").await;
    assert_eq!(next_frame(&mut frames).await.data(), [0xff]);

    let stats = endpoint.stats();
    assert_eq!((stats.frames_in, stats.frames_out), (5, 3));
    assert_eq!((stats.frames_out_lost, stats.malformed), (1, 0));
}

#[tokio::test]
async fn tools_on_one_port_share_the_bus() {
    let (endpoint, addr) = open().await;
    let mut frames = endpoint.take_frames().unwrap();
    let mut a = Client::raw(addr).await;
    let mut b = Client::raw(addr).await;

    // A frame of one tool reaches the group once, and the other tool, never its sender.
    a.send("< send 100 1 01 >").await;
    assert_eq!(next_frame(&mut frames).await.data(), [1]);
    let (id, _, data) = frame_parts(&b.message().await);
    assert_eq!((id.as_str(), data.as_str()), ("100", "01"));
    a.quiet(Duration::from_millis(200)).await;

    // A frame of the group reaches both.
    endpoint
        .send_frames(&[Frame::classic(std_id(0x200), &[2]).unwrap()])
        .await
        .unwrap();
    for c in [&mut a, &mut b] {
        let (id, _, _) = frame_parts(&c.message().await);
        assert_eq!(id, "200");
    }
    assert!(frames.try_recv().is_err(), "nothing more for the group");
}

#[tokio::test]
async fn malformed_and_unsupported_commands_are_answered_and_the_connection_survives() {
    let (endpoint, addr) = open().await;
    let mut frames = endpoint.take_frames().unwrap();
    let mut c = Client::connect(addr).await;
    c.expect("< hi >").await;
    // Nothing but open before a bus is open.
    c.send("< rawmode >").await;
    c.expect("< error open a bus first >").await;
    c.send("< open can0 can1 >").await;
    assert!(
        c.message()
            .await
            .starts_with("< error open takes one bus name")
    );
    c.send("< open vcan0 >").await;
    c.expect("< ok >").await;
    c.send("< open vcan0 >").await;
    c.expect("< error a bus is open already >").await;
    // The broadcast manager's commands are not served.
    c.send("< subscribe 0 0 123 >").await;
    assert!(c.message().await.starts_with("< error unsupported command"));
    c.send("< rawmode >").await;
    c.expect("< ok >").await;

    let malformed = [
        "< send 123 9 1 2 3 4 5 6 7 8 9 >".to_string(),
        "< send 123 2 01 >".to_string(),
        "< send 800000000 0 >".to_string(),
        "< send xyz 0 >".to_string(),
        "< fdsend 123 01 13 >".to_string(),
        format!("< send {} >", "1".repeat(2000)),
        "< \u{7f} >".to_string(),
        "< >".to_string(),
    ];
    for m in &malformed {
        c.send(m).await;
        let answer = c.message().await;
        assert!(answer.starts_with("< error "), "{m}: {answer}");
    }
    c.send("< sendrtr 123 0 >").await;
    c.expect("< error remote frames cannot cross the bridge >")
        .await;
    c.send("< controlmode >").await;
    assert!(c.message().await.starts_with("< error this bridge serves"));
    c.send("< frobnicate >").await;
    c.expect("< error unknown command >").await;
    // Stray bytes between commands are skipped without an answer.
    c.send("garbage\r\n< send 321 2 ca fe >").await;
    let f = next_frame(&mut frames).await;
    assert_eq!((f.id, f.data()), (std_id(0x321), &[0xca, 0xfe][..]));
    c.send("< echo >").await;
    c.expect("< echo >").await;
    let stats = endpoint.stats();
    // The two-name open, the malformed list and the stray bytes; refusals of well-formed commands
    // are not malformed.
    assert_eq!(stats.malformed, 1 + malformed.len() as u64 + 1, "{stats:?}");
    assert_eq!((stats.unsupported, stats.frames_in), (1, 1));
}

#[tokio::test]
async fn the_port_has_no_bit_timing_and_says_so() {
    let (endpoint, _) = open().await;
    let err = endpoint
        .configure(&CanSettings::derived(500_000, 875, CanMode::Normal))
        .await
        .unwrap_err();
    assert!(
        matches!(err, EndpointError::TimingNotSettable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no CAN bus of its own"), "{err}");
}

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let (_endpoint, addr) = open().await;
    let spec: EndpointSpec = format!("socketcand:{addr}").parse().unwrap();
    let err = CanEndpoint::open(&spec, &EndpointOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, EndpointError::Bind { .. }), "{err}");
}

#[tokio::test]
async fn clients_beyond_the_limit_are_turned_away() {
    let (_endpoint, addr) = open().await;
    let mut served = Vec::new();
    for _ in 0..MAX_CLIENTS {
        let mut c = Client::connect(addr).await;
        c.expect("< hi >").await;
        served.push(c);
    }
    let mut extra = Client::connect(addr).await;
    extra.expect("< error too many clients >").await;
    // One leaves: there is room again.
    drop(served.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut late = Client::connect(addr).await;
    late.expect("< hi >").await;
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_frames_counted_and_holds_up_nobody() {
    let (endpoint, addr) = open().await;
    let _stalled = Client::raw(addr).await;
    let mut reader = Client::raw(addr).await;
    let burst: Vec<Frame> = (0..50_000u32)
        .map(|i| Frame::classic(std_id(0x100), &i.to_be_bytes()).unwrap())
        .collect();
    for chunk in burst.chunks(1000) {
        timeout(WAIT, endpoint.send_frames(chunk))
            .await
            .expect("a stalled client must not hold up the group")
            .unwrap();
    }
    // The reading client still gets frames.
    let (id, _, _) = frame_parts(&reader.message().await);
    assert_eq!(id, "100");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while endpoint.stats().frames_out_lost == 0 {
        // Keep the reader reading so only the stalled client falls behind.
        let _ = timeout(Duration::from_millis(50), reader.message()).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled client's losses were not counted: {:?}",
            endpoint.stats()
        );
    }
}

#[tokio::test]
async fn the_set_serves_a_port_from_endpoints_json() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("agent"));
    let store = EndpointStore::new(&home);
    store
        .add(&"socketcand:127.0.0.1:0".parse().unwrap())
        .unwrap();
    let agent = uuid::Uuid::new_v4();
    let set = EndpointSet::start_with(
        store,
        agent,
        SetOptions {
            reload_every: Duration::from_millis(100),
            ..SetOptions::default()
        },
    );
    let mut events = set.events();
    let device_id = bridge_agent::endpoints::local_device_id(agent, "socketcand:127.0.0.1:0");
    let deadline = tokio::time::Instant::now() + WAIT;
    let endpoint = loop {
        if let Some(e) = set.endpoint(&device_id) {
            break e;
        }
        assert!(tokio::time::Instant::now() < deadline, "not served");
        let _ = timeout(Duration::from_millis(100), events.recv()).await;
    };
    assert!(set.contains(&device_id));
    let addr: SocketAddr = endpoint.info().location.parse().unwrap();
    let mut frames = endpoint.take_frames().unwrap();
    let mut client = Client::raw(addr).await;
    client.send("< send 7DF 2 1 0 >").await;
    assert_eq!(next_frame(&mut frames).await.id, std_id(0x7df));
    endpoint
        .send_frames(&[Frame::classic(std_id(0x7e8), &[1]).unwrap()])
        .await
        .unwrap();
    assert_eq!(frame_parts(&client.message().await).0, "7E8");

    // Removing it from the file closes the port.
    EndpointStore::new(&home)
        .remove(&"socketcand:127.0.0.1:0".parse().unwrap())
        .unwrap();
    drop(endpoint);
    loop {
        match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            EndpointEvent::Gone { device_id: gone } => {
                assert_eq!(gone, device_id);
                break;
            }
            EndpointEvent::Appeared { .. } => {}
        }
    }
    let mut rest = Vec::new();
    let closed = timeout(WAIT, client.stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the client was not let go");
    assert!(set.list().is_empty());
}

/// python-can's own socketcand client against the endpoint: it connects, sends a frame the group gets,
/// and reads the group's frames. Run with a Python that has python-can:
/// `PYTHON_CAN=/path/to/venv/bin/python cargo test -p bridge-agent --test it socketcand -- --ignored`.
#[tokio::test]
#[ignore = "needs python-can (pip install python-can; set PYTHON_CAN to that python)"]
async fn python_can_speaks_to_the_endpoint() {
    const SCRIPT: &str = r#"
import sys, can
bus = can.Bus(interface="socketcand", host="127.0.0.1", port=int(sys.argv[1]), channel="can0")
bus.send(can.Message(arbitration_id=0x7DF, data=[2, 1, 0x0D], is_extended_id=False))
for _ in range(2):
    m = bus.recv(5.0)
    print(f"{m.arbitration_id:X} {m.is_extended_id} {m.data.hex()}" if m else "none", flush=True)
bus.shutdown()
"#;
    let python = std::env::var("PYTHON_CAN").unwrap_or_else(|_| "python3".into());
    let (endpoint, addr) = open().await;
    let mut frames = endpoint.take_frames().unwrap();
    let child = tokio::process::Command::new(python)
        .args(["-c", SCRIPT, &addr.port().to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python runs");
    // python-can waits for its socket before it sends; the frame says it is connected and in raw mode.
    let f = timeout(Duration::from_secs(15), frames.recv())
        .await
        .expect("python-can sent nothing")
        .unwrap();
    assert_eq!((f.id, f.data()), (std_id(0x7df), &[2, 1, 0x0d][..]));
    endpoint
        .send_frames(&[
            Frame::classic(std_id(0x7e8), &[3, 0x41, 0x0d, 0x32]).unwrap(),
            Frame::classic(CanId::extended(0x18daf110).unwrap(), &[]).unwrap(),
        ])
        .await
        .unwrap();
    let out = timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("python-can did not finish")
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "7E8 False 03410d32\n18DAF110 True \n"
    );
}

/// The whole path: a tool speaking socketcand to agent A's local endpoint, the server's group relay,
/// agent B and its simulated dongle's bus, both ways; and the endpoint as the server shows it: owned
/// without pairing, marked local, its bit timing refused with the reason, no command console.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_socketcand_tool_reaches_a_simulated_dongle_through_a_group(pool: PgPool) {
    let server = Server::start(pool).await;
    let user = server.user("alice@example.com", Role::User).await;

    // Side B: a simulated dongle on the bus "vehicle", served and paired through agent B.
    let bus_root = tempfile::tempdir().unwrap();
    let dongle = Dongle::serial_on_bus(bus_root.path(), "vehicle").await;
    let mut vehicle = BusTap::recorder_at(bus_root.path(), "vehicle").unwrap();
    let mut agent_b = Agent::new();
    agent_b.login(&server, &user).await;
    agent_b.run(&dongle.agent_args());
    let b_id = pair(&user, &dongle).await;

    // Side A: agent A serves a socketcand port and no dongle at all.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = format!("socketcand:127.0.0.1:{port}");
    let mut agent_a = Agent::new();
    agent_a.login(&server, &user).await;
    let (added, out, err) = agent_a.exec(&["endpoint", "add", &spec], None).await;
    assert!(added, "{out}{err}");
    agent_a.run(&["--usb-id".into(), "ffff:ffff".into()]);
    let local = control_proto::local_device_id(agent_a.agent_id(), &spec).to_string();
    assert!(
        out.contains(&local),
        "endpoint add names the device id: {out}"
    );
    let view = user
        .wait_dongle(&local, "served as a local dongle", |d| {
            d.is_some_and(|d| d["online"] == true && d["owned"] == true)
        })
        .await
        .unwrap();
    assert_eq!(view["local"], true);
    assert_eq!(view["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(view["transport"]["kind"], "local");
    assert_eq!(view["transport"]["location"], format!("127.0.0.1:{port}"));
    let a_id = view["id"].as_str().unwrap().to_string();

    // A socketcand port has no bit timing: the server says so and why, and stores nothing.
    let (status, body) = user
        .call(
            reqwest::Method::PUT,
            &format!("/dongles/{a_id}/can-config"),
            Some(json!({"bitrate": 500000, "sample_point_permille": 875, "mode": "normal"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let reason = body["details"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot set the bit timing"), "{body}");
    let (status, stored) = user.get(&format!("/dongles/{a_id}/can-config")).await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert!(
        stored["config"].is_null() && stored["effective"].is_null(),
        "{stored}"
    );
    // Nor does it pair: it is the user's already.
    let (status, body) = user
        .post(&format!("/dongles/{a_id}/pairing-mode"), json!({}))
        .await;
    assert!(!status.is_success(), "{status} {body}");

    active_group(&user, &a_id, &b_id).await;
    assert!(vehicle.wait_for_peers(1, Duration::from_secs(5)).await);

    // The tool's frames reach the vehicle's bus, in order.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut tool = Client::raw(addr).await;
    for i in 0..20u8 {
        tool.send(&format!("< send 7DF 3 2 1 {i:x} >")).await;
    }
    for i in 0..20u8 {
        let f = timeout(Duration::from_secs(10), vehicle.recv())
            .await
            .expect("the tool's frame reaches the vehicle")
            .unwrap();
        assert_eq!((f.id().raw(), f.data()), (0x7df, &[2, 1, i][..]));
    }

    // The vehicle's answers reach the tool, in order.
    for i in 0..20u8 {
        vehicle
            .send(&dongle_sim::frame::Frame::classic(std_id(0x7e8), &[3, 0x41, 0x0d, i]).unwrap())
            .await;
    }
    for i in 0..20u8 {
        let (id, _, data) = frame_parts(&tool.message().await);
        assert_eq!((id.as_str(), data), ("7E8", format!("03410D{i:02X}")));
    }

    // A frame sent by hand to the local dongle reaches the tool.
    let (status, body) = user
        .post(
            &format!("/dongles/{a_id}/can/send"),
            json!({"can_id": 0x123, "is_extended": false, "data_hex": "beef"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (id, _, data) = frame_parts(&tool.message().await);
    assert_eq!((id.as_str(), data.as_str()), ("123", "BEEF"));

    // A command has nowhere to run: it ends refused with the reason, never done.
    let (status, cmd) = user
        .post(
            &format!("/dongles/{a_id}/commands"),
            json!({"command": "version", "args": []}),
        )
        .await;
    assert!(status.is_success(), "{status} {cmd}");
    let cid = cmd["command_id"].as_str().unwrap().to_string();
    let mut last = json!(null);
    for _ in 0..100 {
        let (_, c) = user.get(&format!("/dongles/{a_id}/commands/{cid}")).await;
        if c["status"] != "queued" && c["status"] != "running" {
            last = c;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(last["status"], "done", "{last}");
    assert!(last.to_string().contains("command console"), "{last}");

    agent_a.stop().await;
    agent_b.stop().await;
    server.stop().await;
}
