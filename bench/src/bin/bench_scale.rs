//! `bench-scale`: how many agents one server holds, and what they cost it.
//!
//! The server runs as its own process (`bridge-server serve`, this build) on a PostgreSQL the benchmark
//! starts, so that its memory can be read from /proc/PID/status and its file descriptors are its own.
//! The benchmark registers `--agents` agents through the server's library (straight into the database:
//! registering 10 000 agents through the API would mostly measure Argon2 logins and rate limits), then:
//! 1. command latency: one simulated dongle served by a real agent daemon; `--commands` times
//!    `POST /dongles/:id/commands {"command": "version"}`, and the time until `GET` shows it done,
//!    both by the wall clock (polling every 2 ms) and by the server's own created_at -> finished_at;
//! 2. connections: every agent opens the control WebSocket, says hello and waits for the welcome;
//!    the server's RSS and file descriptors before and after, per connection;
//! 3. heartbeats: `--heartbeat-agents` of those connections each send `--heartbeats` heartbeats and
//!    then a hello, whose welcome comes back only after the heartbeats before it were handled (the
//!    server handles one connection's messages in order): heartbeats handled per second;
//! 4. command latency again, with every agent still connected.
//!
//! RLIMIT_NOFILE is raised to its hard limit (as root, the hard limit too) before anything starts, and
//! the server inherits it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bridge_bench::flow::{self, ms};
use bridge_bench::server_process::{ServerProcess, free_port, server_binary};
use bridge_rig::{AgentPart, DonglePart, UserClient};
use bridge_server::embedded_pg::EmbeddedPostgres;
use bridge_server::users::{self, Email, Role};
use clap::Parser;
use control_proto::{AgentMessage, Hello, PROTOCOL_VERSION, ServerMessage};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Agents held by one server process, its memory, heartbeats per second, command latency.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench-scale", version, about, long_about)]
struct Args {
    /// Agents that connect their control WebSocket at the same time.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Connections opened at once while connecting them.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Seconds the connections are held (idle) before they are counted again.
    #[arg(long, default_value_t = 10.0)]
    hold_secs: f64,
    /// Connections that send heartbeats in the heartbeat measurement.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_agents: usize,
    /// Heartbeats each of them sends back to back.
    #[arg(long, default_value_t = 20)]
    heartbeats: usize,
    /// Commands timed in each command-latency measurement (0 skips both).
    #[arg(long, default_value_t = 100)]
    commands: usize,
    /// The bridge-server binary to run. Without it, the benchmark builds the one next to itself with
    /// cargo (same profile), so that it measures the code of this checkout.
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
}

/// What a held connection can be asked to do.
enum Order {
    /// Send this many heartbeats and a hello; answer when the welcome comes back.
    Heartbeats(usize, oneshot::Sender<()>),
}

/// One agent's control connection, held by a task; dropping the sender closes it.
struct Held {
    orders: mpsc::Sender<Order>,
}

/// Raises RLIMIT_NOFILE as far as allowed; answers the soft limit now in force.
fn raise_nofile(wanted: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // As root the hard limit may go up too (up to fs.nr_open); otherwise the soft one up to the hard.
    let target_hard = hard.max(wanted);
    if setrlimit(Resource::RLIMIT_NOFILE, target_hard, target_hard).is_ok() {
        return Ok(target_hard);
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// Opens one agent's control WebSocket, says hello, waits for the welcome, and hands the socket to a
/// task that keeps it (answering pings, reading what the server sends) until `Held` is dropped.
async fn connect(url: &str, token: &str) -> anyhow::Result<Held> {
    let mut request = format!("{url}/ws/agent")
        .replace("http://", "ws://")
        .into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // Small buffers: 10 000 connections at tungstenite's default 128 KiB read buffer would be over a
    // gigabyte in this process.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
    let hello = AgentMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: "bench".into(),
        hostname: "bench".into(),
        os: "linux".into(),
        interfaces: vec![],
    })
    .to_json();
    socket.send(Message::Text(hello.clone().into())).await?;
    wait_welcome(&mut socket).await?;
    let (tx, mut rx) = mpsc::channel::<Order>(1);
    tokio::spawn(async move {
        let mut waiting: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        if matches!(ServerMessage::from_json(text.as_str()), Ok(ServerMessage::Welcome(_)))
                            && let Some(done) = waiting.take()
                        {
                            let _ = done.send(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
                order = rx.recv() => match order {
                    Some(Order::Heartbeats(n, done)) => {
                        let heartbeat = AgentMessage::Heartbeat.to_json();
                        for _ in 0..n {
                            if socket.send(Message::Text(heartbeat.clone().into())).await.is_err() {
                                return;
                            }
                        }
                        if socket.send(Message::Text(hello.clone().into())).await.is_err() {
                            return;
                        }
                        waiting = Some(done);
                    }
                    None => {
                        let _ = socket.close(None).await;
                        break;
                    }
                },
            }
        }
    });
    Ok(Held { orders: tx })
}

async fn wait_welcome<S>(socket: &mut S) -> anyhow::Result<()>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let wait = async {
        while let Some(message) = socket.next().await {
            if let Message::Text(text) = message?
                && let Ok(ServerMessage::Welcome(_)) = ServerMessage::from_json(text.as_str())
            {
                return Ok(());
            }
        }
        bail!("the server closed the connection before its welcome")
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("no welcome within 60 s")?
}

/// `n` commands to the dongle, one after the other; prints their latency.
async fn command_latency(
    user: &UserClient,
    dongle_id: &str,
    n: usize,
    label: &str,
) -> anyhow::Result<()> {
    if n == 0 {
        return Ok(());
    }
    let mut wall = Vec::with_capacity(n);
    let mut server = Vec::with_capacity(n);
    // The server's part split in two: until the agent accepted the command (dispatch, the agent's
    // journal entry, its answer), and from there to the stored result (the dongle's run, the journal
    // again, the result's message and transaction).
    let mut to_accept = Vec::with_capacity(n);
    let mut to_result = Vec::with_capacity(n);
    for _ in 0..n {
        let began = Instant::now();
        let queued = user
            .post(
                &format!("/dongles/{dongle_id}/commands"),
                json!({"command": "version"}),
            )
            .await?;
        let id = queued["command_id"]
            .as_str()
            .context("a command id")?
            .to_string();
        let view = loop {
            let c = user
                .get(&format!("/dongles/{dongle_id}/commands/{id}"))
                .await?;
            match c["status"].as_str() {
                Some("done") => break c,
                Some("error" | "timeout") => {
                    bail!("a command ended {}: {}", c["status"], c["stderr"])
                }
                _ => {}
            }
            if began.elapsed() > Duration::from_secs(30) {
                bail!("a command did not finish within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        wall.push(began.elapsed());
        let at = |field: &str| {
            view[field]
                .as_str()
                .and_then(micros)
                .with_context(|| format!("the command's {field}"))
        };
        let (created, started, finished) =
            (at("created_at")?, at("started_at")?, at("finished_at")?);
        server.push(Duration::from_micros(finished.saturating_sub(created)));
        to_accept.push(Duration::from_micros(started.saturating_sub(created)));
        to_result.push(Duration::from_micros(finished.saturating_sub(started)));
    }
    println!(
        "command latency {label} ({n} commands): wall clock (POST to GET done, 2 ms polls) p50 {} ms, p99 {} ms; server created_at -> finished_at p50 {} ms, p99 {} ms",
        ms(flow::quantile(&wall, 0.5)),
        ms(flow::quantile(&wall, 0.99)),
        ms(flow::quantile(&server, 0.5)),
        ms(flow::quantile(&server, 0.99)),
    );
    println!(
        "  of which created_at -> started_at (accepted by the agent) p50 {} ms, p99 {} ms; started_at -> finished_at p50 {} ms, p99 {} ms",
        ms(flow::quantile(&to_accept, 0.5)),
        ms(flow::quantile(&to_accept, 0.99)),
        ms(flow::quantile(&to_result, 0.5)),
        ms(flow::quantile(&to_result, 0.99)),
    );
    Ok(())
}

/// Microseconds since the epoch of an RFC 3339 time, as the API writes them.
fn micros(t: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(t).ok()?;
    u64::try_from(t.timestamp_micros()).ok()
}

async fn bench(dir: std::path::PathBuf, args: Args) -> anyhow::Result<()> {
    let nofile = raise_nofile(args.agents as u64 * 2 + 4096)?;
    println!("RLIMIT_NOFILE: {nofile} (inherited by the server)");
    if (nofile as usize) < args.agents + 1024 {
        bail!(
            "RLIMIT_NOFILE is {nofile}, too low for {} connections: raise the hard limit (ulimit -Hn) or use --agents",
            args.agents
        );
    }
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => server_binary()?,
    };
    let postgres = EmbeddedPostgres::start(dir.join("postgres"))
        .await
        .context("could not start the embedded PostgreSQL (is PostgreSQL installed?)")?;
    println!("PostgreSQL: embedded, started by the benchmark (initdb's defaults)");
    let pool = bridge_server::db::connect(&postgres.url(), 10).await?;
    bridge_server::db::migrate(&pool).await?;

    // The user and the agents, through the server's library.
    let email = "scale@bench.example";
    let password = "bench-scale-password-1";
    let hash = bridge_server::auth::password::hash(password, Default::default())?;
    let user = users::insert(&pool, &Email::parse(email)?, &hash, Role::User)
        .await?
        .context("the benchmark's user exists already")?;
    users::mark_email_verified(&pool, user.id).await?;
    let registering = Instant::now();
    let tokens: Vec<String> = futures::stream::iter(0..args.agents)
        .map(|i| {
            let pool = pool.clone();
            async move {
                bridge_server::agents::register(&pool, user.id, &format!("bench-{i}"), None)
                    .await
                    .map(|(_, token)| token)
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("registering the agents")?;
    println!(
        "registered {} agents in {:.1} s",
        tokens.len(),
        registering.elapsed().as_secs_f64()
    );
    pool.close().await;

    let port = free_port()?;
    let mut server = ServerProcess::start(
        &bin,
        &postgres.url(),
        &dir.join("server-data"),
        port,
        &dir.join("server.log"),
    )
    .await?;
    let outcome = measure(&server, &dir, &args, email, password, &tokens).await;
    if outcome.is_err() {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        eprintln!(
            "the server's last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    server.stop();
    let _ = postgres.stop().await;
    outcome
}

async fn measure(
    server: &ServerProcess,
    dir: &std::path::Path,
    args: &Args,
    email: &str,
    password: &str,
    tokens: &[String],
) -> anyhow::Result<()> {
    let url = server.url.clone();
    // The commands' dongle and agent: a real daemon, in this process, against the server process.
    let dongle = DonglePart::usb(&dir.join("dongle"), "scale").await?;
    let mut agent = AgentPart::login(
        &dir.join("agent"),
        &url,
        email,
        password,
        "cmd-agent",
        dongle.plan.clone(),
    )
    .await
    .context("the command agent could not log in")?;
    agent.start();
    let user = UserClient::login(&url, email, password).await?;
    let outcome = async {
        let dongle_id = bridge_rig::pair(&user, &dongle).await.context("pairing the dongle")?;
        // The first command warms the path (connections in the pool, the agent's session).
        command_latency(&user, &dongle_id, 1, "warm-up").await?;
        command_latency(&user, &dongle_id, args.commands, "with one agent connected").await?;

        let rss_before = server.status_kb("VmRSS");
        let fds_before = server.open_fds();
        let cpu_before = server.cpu();
        println!(
            "\nserver before: RSS {} MiB, {} file descriptors",
            rss_before / 1024,
            fds_before
        );
        let started = Instant::now();
        let failed = Arc::new(AtomicUsize::new(0));
        let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let held: Vec<Held> = futures::stream::iter(tokens.iter())
            .map(|token| {
                let url = url.clone();
                let failed = failed.clone();
                let first_error = first_error.clone();
                async move {
                    match connect(&url, token).await {
                        Ok(h) => Some(h),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(format!("{e:#}"));
                            None
                        }
                    }
                }
            })
            .buffer_unordered(args.connect_concurrency.max(1))
            .filter_map(|h| async move { h })
            .collect()
            .await;
        let took = started.elapsed();
        println!(
            "connected {} agents (hello -> welcome) in {:.1} s ({:.0} per second), {} failed{}",
            held.len(),
            took.as_secs_f64(),
            held.len() as f64 / took.as_secs_f64(),
            failed.load(Ordering::Relaxed),
            first_error
                .lock()
                .unwrap()
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        println!(
            "server CPU while connecting: {:.1} s",
            (server.cpu() - cpu_before).as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
        let alive = held.iter().filter(|h| !h.orders.is_closed()).count();
        let rss = server.status_kb("VmRSS");
        let hwm = server.status_kb("VmHWM");
        let fds = server.open_fds();
        println!(
            "after holding them {:.0} s: {alive} still open; server RSS {} MiB (peak {} MiB), {fds} file descriptors; {:.1} KiB RSS per connection",
            args.hold_secs,
            rss / 1024,
            hwm / 1024,
            (rss.saturating_sub(rss_before)) as f64 / held.len().max(1) as f64
        );

        let senders = args.heartbeat_agents.min(held.len());
        if senders > 0 && args.heartbeats > 0 {
            let cpu = server.cpu();
            let began = Instant::now();
            let mut done = Vec::with_capacity(senders);
            for h in &held[..senders] {
                let (tx, rx) = oneshot::channel();
                if h.orders.send(Order::Heartbeats(args.heartbeats, tx)).await.is_ok() {
                    done.push(rx);
                }
            }
            let asked = done.len();
            let mut answered = 0usize;
            for rx in done {
                if tokio::time::timeout(Duration::from_secs(120), rx).await.is_ok_and(|r| r.is_ok()) {
                    answered += 1;
                }
            }
            let wall = began.elapsed().as_secs_f64();
            let beats = answered * args.heartbeats;
            println!(
                "\nheartbeats: {answered} of {asked} connections x {} heartbeats (+ one hello each) handled in {wall:.2} s: {:.0} heartbeats/s; server CPU {:.2} s ({:.0} us per heartbeat)",
                args.heartbeats,
                beats as f64 / wall,
                (server.cpu() - cpu).as_secs_f64(),
                (server.cpu() - cpu).as_secs_f64() * 1e6 / beats.max(1) as f64,
            );
        }

        command_latency(
            &user,
            &dongle_id,
            args.commands,
            &format!("with {} agents connected", held.len() + 1),
        )
        .await?;
        drop(held);
        anyhow::Ok(())
    }
    .await;
    let _ = agent.stop().await;
    dongle.sim.shutdown().await;
    outcome
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bridge_bench::run_in_temp_dir("bench-scale", |dir| bench(dir, args))
}
