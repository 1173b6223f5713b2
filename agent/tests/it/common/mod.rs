//! The whole system for a test: the real server in this process on 127.0.0.1 over the database that
//! `#[sqlx::test]` made, simulated dongles on real pseudo-terminals and UDP sockets, and `bridge-agent`
//! as a real process with its own folder.
//!
//! Set `TEST_LOG=1` to see the server's logs and the agent's stderr, or `AGENT_LOG_DIR=<folder>` to
//! keep each agent's log in a file of its own there (the way to read the agents of a whole parallel
//! run, when a test fails only among the others).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::users::{self, Email, Role};
use dongle_sim::{SimConfig, SimEvent, SimHandle};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

/// The agent binary of this package.
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bridge-agent")
}

fn verbose() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// The server, running in this process.
pub struct Server {
    pub base: String,
    pub pool: PgPool,
    running: Option<RunningServer>,
}

impl Server {
    pub async fn start(pool: PgPool) -> Self {
        Self::start_with(pool, |_| {}).await
    }

    pub async fn start_with(pool: PgPool, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        if verbose() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,sqlx=warn,hyper=info")
                .with_test_writer()
                .try_init();
        }
        let mut config = ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let running = app::spawn(config, pool.clone())
            .await
            .expect("the server starts");
        Self {
            base: running.base_url.clone(),
            pool,
            running: Some(running),
        }
    }

    /// Makes a verified user in the database; answers its id.
    pub async fn create_user(&self, email: &str, role: Role) -> Uuid {
        let hash = bridge_server::auth::password::hash(PASSWORD, Default::default()).unwrap();
        let user = users::insert(&self.pool, &Email::parse(email).unwrap(), &hash, role)
            .await
            .unwrap()
            .expect("a new email");
        users::mark_email_verified(&self.pool, user.id)
            .await
            .unwrap();
        user.id
    }

    /// Makes a verified user and returns a client logged in as them.
    pub async fn user(&self, email: &str, role: Role) -> User {
        let id = self.create_user(email, role).await;
        let mut client = User {
            base: self.base.clone(),
            email: email.to_string(),
            id,
            http: reqwest::Client::builder()
                .cookie_store(true)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            csrf: String::new(),
        };
        let answer = client
            .call(
                Method::POST,
                "/auth/login",
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(answer.0, StatusCode::OK, "login: {}", answer.1);
        client.csrf = answer.1["csrf_token"].as_str().unwrap().to_string();
        client
    }

    /// Stops the server gracefully (agents see their connection drop).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }

    /// The dongle-token keys the server runs with; another instance or a restart needs the same.
    fn keys(&self) -> bridge_server::dongle_tokens::KeyRing {
        self.running.as_ref().unwrap().state.keys.as_ref().clone()
    }

    /// A second instance on the same database with the same dongle-token keys, as a second process
    /// behind a load balancer would run.
    pub async fn second_instance(&self) -> Self {
        let keys = self.keys();
        Self::start_with(self.pool.clone(), |c| c.dongle_keys = keys).await
    }

    /// Stops the server and starts a new one on the same address and database, as a restart would.
    pub async fn restart(mut self, down_for: Duration) -> Self {
        let keys = self.keys();
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
        Self::start_again(&self.base, keys, down_for, self.pool.clone()).await
    }

    /// After `down_for`, a new server on the address of `base` with `keys`, over `pool`.
    async fn start_again(
        base: &str,
        keys: bridge_server::dongle_tokens::KeyRing,
        down_for: Duration,
        pool: PgPool,
    ) -> Self {
        let addr: std::net::SocketAddr = base
            .trim_start_matches("http://")
            .parse()
            .expect("an http://IP:PORT base");
        tokio::time::sleep(down_for).await;
        Self::start_with(pool, |c| {
            c.bind = addr;
            c.dongle_keys = keys;
        })
        .await
    }

    /// A server on a connection pool of its own, so that [`Server::crash_and_restart`] can cut it off
    /// from the database as a killed process would be.
    pub async fn start_crashable(pool: &PgPool) -> Self {
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect_with((*pool.connect_options()).clone())
            .await
            .expect("a second pool on the test database");
        Self::start(own).await
    }

    /// Kills the server as SIGKILL would (its pool closes first, so nothing it held in memory reaches
    /// the database afterwards; no shutdown runs), waits, and starts a new one on the same address over
    /// `pool`. Only for a server from [`Server::start_crashable`].
    pub async fn crash_and_restart(mut self, down_for: Duration, pool: PgPool) -> Self {
        let keys = self.keys();
        self.pool.close().await;
        if let Some(running) = self.running.take() {
            running.abort();
        }
        Self::start_again(&self.base, keys, down_for, pool).await
    }

    /// Waits until the agent `agent_id` counts as connected (a heartbeat or connection recorded).
    pub async fn wait_agent_seen_after(
        &self,
        agent_id: Uuid,
        after: chrono::DateTime<chrono::Utc>,
    ) {
        for _ in 0..200 {
            let seen: Option<chrono::DateTime<chrono::Utc>> =
                sqlx::query_scalar("SELECT last_seen_at FROM agents WHERE id = $1")
                    .bind(agent_id)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap();
            if seen.is_some_and(|s| s > after) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("agent {agent_id} never connected after {after}");
    }

    pub async fn scalar<T>(&self, sql: &str, bind: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl User {
    /// The same person, session and all, talking to another instance at `base`.
    pub fn via(&self, base: &str) -> User {
        User {
            base: base.to_string(),
            email: self.email.clone(),
            id: self.id,
            http: self.http.clone(),
            csrf: self.csrf.clone(),
        }
    }
}

/// A person using the API with a session cookie.
pub struct User {
    pub base: String,
    pub email: String,
    pub id: Uuid,
    http: reqwest::Client,
    csrf: String,
}

impl User {
    /// Calls `/api/v1{path}`; answers the status and the JSON body (Null when there is none).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .header("x-csrf-token", &self.csrf);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Opens the live console (SSE) of the dongle with id `dongle_id`.
    pub async fn console(&self, dongle_id: &str) -> ConsoleStream {
        let response = self
            .http
            .get(format!(
                "{}/api/v1/streams/dongles/{dongle_id}/console",
                self.base
            ))
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), StatusCode::OK);
        ConsoleStream {
            response,
            buffer: String::new(),
        }
    }

    /// Configures the dongle with id `dongle_id` for `bitrate` (sample point 87.5 %, normal mode), which
    /// must be applied; answers the server's reply, with the effective timing.
    pub async fn apply_can_config(&self, dongle_id: &str, bitrate: u32) -> Value {
        let (status, body) = self
            .call(
                Method::PUT,
                &format!("/dongles/{dongle_id}/can-config"),
                Some(json!({
                    "bitrate": bitrate, "sample_point_permille": 875, "mode": "normal",
                    "use_raw": false, "auto_retx": true, "tx_pause": false, "protocol_exc": false
                })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["applied"], true, "{body}");
        body
    }

    /// Runs `command` on the dongle with id `dongle_id` and waits (at most 20 s) for its result; answers
    /// the command's last view, done or not.
    pub async fn command_answer(&self, dongle_id: &str, command: &str) -> Value {
        let (status, queued) = self
            .post(
                &format!("/dongles/{dongle_id}/commands"),
                json!({ "command": command }),
            )
            .await;
        assert!(status.is_success(), "{status} {queued}");
        let id = queued["command_id"].as_str().unwrap().to_string();
        let mut last = Value::Null;
        for _ in 0..200 {
            let (_, body) = self
                .get(&format!("/dongles/{dongle_id}/commands/{id}"))
                .await;
            if body["status"] == "done" {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    }

    /// The user's view of the dongle with `device_id`, if listed.
    pub async fn dongle(&self, device_id: &str) -> Option<Value> {
        let (status, body) = self.get("/dongles").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device_id)
            .cloned()
    }

    /// Waits until the dongle's listing satisfies `check`.
    pub async fn wait_dongle(
        &self,
        device_id: &str,
        what: &str,
        check: impl Fn(Option<&Value>) -> bool,
    ) -> Option<Value> {
        let mut last = None;
        for _ in 0..150 {
            last = self.dongle(device_id).await;
            if check(last.as_ref()) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("dongle {device_id}: {what} never happened; last seen {last:?}");
    }
}

/// A live console as a browser reads it: server-sent events, one at a time.
pub struct ConsoleStream {
    response: reqwest::Response,
    buffer: String,
}

impl ConsoleStream {
    /// The next event (its `event:` name and JSON data), or None when none comes within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = None;
                let mut data = Value::Null;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = serde_json::from_str(v.trim()).unwrap_or(Value::Null);
                    }
                }
                match name {
                    Some(name) => return Some((name, data)),
                    // A comment (keep-alive).
                    None => continue,
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .ok()?
                .expect("the stream reads")
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Waits up to `within` for an event named `name` whose data satisfies `check`.
    pub async fn wait_for(
        &mut self,
        name: &str,
        within: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (event, data) = self.next(left).await?;
            if event == name && check(&data) {
                return Some(data);
            }
        }
    }
}

/// A simulated dongle on a pseudo-terminal (behind a stable symlink, so unplug and replug keep the
/// path) or on UDP, with its own state folder.
pub struct Dongle {
    pub sim: SimHandle,
    pub device_id: String,
    /// The path the agent should open (`--port`), for a serial dongle.
    pub port: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Dongle {
    pub async fn serial() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ttyDONGLE");
        let mut config = SimConfig::serial(dir.path().join("flash.json"));
        config.link = dongle_sim::LinkConfig::Serial {
            link: Some(link.clone()),
        };
        Self::start(config, dir, Some(link)).await
    }

    pub async fn udp() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = SimConfig::udp(dir.path().join("flash.json"));
        Self::start(config, dir, None).await
    }

    /// A serial dongle on the virtual bus `name` under `root`, which a [`dongle_sim::BusTap`] can join.
    pub async fn serial_on_bus(root: &Path, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ttyDONGLE");
        let mut config = SimConfig::serial(dir.path().join("flash.json")).with_bus(name);
        config.bus_root = Some(root.to_path_buf());
        config.link = dongle_sim::LinkConfig::Serial {
            link: Some(link.clone()),
        };
        Self::start(config, dir, Some(link)).await
    }

    /// A LAN (UDP) dongle on the virtual bus `name` under `root`.
    pub async fn udp_on_bus(root: &Path, name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SimConfig::udp(dir.path().join("flash.json")).with_bus(name);
        config.bus_root = Some(root.to_path_buf());
        Self::start(config, dir, None).await
    }

    pub async fn start(config: SimConfig, dir: tempfile::TempDir, port: Option<PathBuf>) -> Self {
        let sim = dongle_sim::Simulator::start(config)
            .await
            .expect("the simulator starts");
        Self {
            device_id: sim.device_id().to_string(),
            sim,
            port,
            _dir: dir,
        }
    }

    /// The agent arguments that find this dongle and nothing else.
    pub fn agent_args(&self) -> Vec<String> {
        match &self.port {
            Some(port) => vec!["--port".into(), port.display().to_string()],
            None => vec![
                "--udp".into(),
                self.sim.discovery_addr().unwrap().to_string(),
            ],
        }
    }

    /// The PIN of the next pairing window, as the dongle's display would show it.
    pub async fn next_pin(events: &mut tokio::sync::broadcast::Receiver<SimEvent>) -> String {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                Ok(Ok(SimEvent::Dongle(dongle_sim::Event::Pin { pin, .. }))) => {
                    return pin.as_str().to_string();
                }
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                other => panic!("no PIN shown: {other:?}"),
            }
        }
    }
}

/// A `bridge-agent` installation: its own folder, and the daemon as a child process.
pub struct Agent {
    pub home: tempfile::TempDir,
    pub daemon: Option<Child>,
    /// The Windows build under Wine, instead of this package's binary.
    wine: Option<Wine>,
}

/// Where the Windows build of the agent and Wine are: scripts/test gives both.
struct Wine {
    wine64: String,
    exe: String,
}

impl Agent {
    pub fn new() -> Self {
        Self {
            home: tempfile::tempdir().unwrap(),
            daemon: None,
            wine: None,
        }
    }

    /// The Windows build of the agent (`BRIDGE_AGENT_EXE`), run under Wine (`WINE64`).
    pub fn windows() -> Self {
        Self {
            wine: Some(Wine {
                wine64: std::env::var("WINE64").expect("scripts/test sets WINE64"),
                exe: std::env::var("BRIDGE_AGENT_EXE").expect("scripts/test sets BRIDGE_AGENT_EXE"),
            }),
            ..Self::new()
        }
    }

    pub fn command(&self) -> Command {
        let mut command = match &self.wine {
            None => {
                let mut command = Command::new(agent_bin());
                command.env("BRIDGE_AGENT_HOME", self.home.path());
                command
            }
            Some(wine) => {
                let mut command = Command::new(&wine.wine64);
                command
                    .arg(&wine.exe)
                    .env("WINEDEBUG", "-all")
                    .env("BRIDGE_AGENT_HOME", windows_path(self.home.path()));
                command
            }
        };
        command
            .env_remove("BRIDGE_AGENT_PASSWORD")
            .kill_on_drop(true);
        command
    }

    /// Runs a one-shot command; answers (success, stdout, stderr).
    pub async fn exec(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut command = self.command();
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("bridge-agent starts");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("bridge-agent finishes within a minute")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if verbose() {
            eprintln!("bridge-agent {args:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
        }
        (out.status.success(), stdout, stderr)
    }

    /// `bridge-agent pair DEVICE` as a technician runs it: waits for the PIN the dongle shows, and types
    /// `wrong` PINs first, then the right one. Answers (success, stdout, stderr) and the PIN.
    pub async fn pair_with_cli(
        &self,
        dongle: &Dongle,
        wrong: &[&str],
    ) -> (bool, String, String, String) {
        let mut pins = dongle.sim.events();
        let mut command = self.command();
        command
            .args(["pair", &dongle.device_id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("bridge-agent pair starts");
        let pin = Dongle::next_pin(&mut pins).await;
        let mut stdin = child.stdin.take().unwrap();
        for line in wrong.iter().copied().chain([pin.as_str()]) {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .unwrap();
        }
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("bridge-agent pair finishes within 30 s")
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            pin,
        )
    }

    /// `bridge-agent login` as `user`, with the password from the environment.
    pub async fn login(&self, server: &Server, user: &User) {
        self.login_as(&server.base, &user.email, &[]).await;
    }

    /// `bridge-agent login --server base --email email extra...`, which must succeed.
    pub async fn login_as(&self, base: &str, email: &str, extra: &[&str]) {
        let mut command = self.command();
        command
            .args(["login", "--server", base, "--email", email])
            .args(extra)
            .env("BRIDGE_AGENT_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = command.output().await.unwrap();
        assert!(
            out.status.success(),
            "login failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The agent id stored by `login`.
    pub fn agent_id(&self) -> Uuid {
        let text = std::fs::read_to_string(self.home.path().join("agent.json")).unwrap();
        let creds: Value = serde_json::from_str(&text).unwrap();
        creds["agent_id"].as_str().unwrap().parse().unwrap()
    }

    /// Starts `bridge-agent run` with `args` (where to look for dongles); LAN broadcast off, fast LAN
    /// scans.
    pub fn run(&mut self, args: &[String]) {
        let mut command = self.command();
        command
            .arg("run")
            .args(["--no-broadcast", "--lan-scan-secs", "1"])
            .args(args)
            .env(
                "BRIDGE_AGENT_LOG",
                if verbose() || std::env::var_os("AGENT_LOG_DIR").is_some() {
                    "debug"
                } else {
                    "info"
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if verbose() {
                Stdio::inherit()
            } else if let Some(dir) = std::env::var_os("AGENT_LOG_DIR") {
                Stdio::from(agent_log_file(Path::new(&dir)))
            } else {
                Stdio::null()
            });
        self.daemon = Some(command.spawn().expect("bridge-agent run starts"));
    }

    /// Stops the daemon: SIGTERM, as systemd would, then waits for it.
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.daemon.take()?;
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Kills the daemon with SIGKILL: no clean-up of any kind.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill().await;
        }
    }

    /// Waits for the daemon to exit on its own; answers its status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.daemon.as_mut().expect("a daemon");
        let status = tokio::time::timeout(within, child.wait())
            .await
            .expect("the daemon exits")
            .unwrap();
        self.daemon = None;
        status
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }
}

/// `path` as a Windows program under Wine names it: Wine maps drive Z: to /.
pub fn windows_path(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// Frame `n` of a numbered stream: id 0x321, its number in the first two data bytes.
pub fn numbered(n: u16) -> dongle_sim::frame::Frame {
    let id = firmware_proto::ids::CanId::standard(0x321).unwrap();
    dongle_sim::frame::Frame::classic(id, &n.to_be_bytes()).unwrap()
}

/// Reads numbered frames from `tap` until `total` have arrived or nothing comes for `quiet`.
pub async fn collect(tap: &mut dongle_sim::BusTap, total: usize, quiet: Duration) -> Vec<u16> {
    let mut seen = Vec::new();
    while seen.len() < total {
        match tokio::time::timeout(quiet, tap.recv()).await {
            Ok(Ok(frame)) if frame.id().raw() == 0x321 && frame.data().len() == 2 => {
                seen.push(u16::from_be_bytes([frame.data()[0], frame.data()[1]]));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the bus tap failed: {e}"),
            Err(_) => break,
        }
    }
    seen
}

/// The mode bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Pairs `dongle` to `user` through the API (the agent serving it must run); answers the dongle's id.
pub async fn pair(user: &User, dongle: &Dongle) -> String {
    let listed = user
        .wait_dongle(&dongle.device_id, "seen by the agent", |d| {
            d.is_some_and(|d| d["online"] == true)
        })
        .await
        .unwrap();
    let id = listed["id"].as_str().unwrap().to_string();
    let mut pins = dongle.sim.events();
    let (status, started) = user
        .post(
            &format!("/dongles/{id}/pairing-mode"),
            json!({"action": "start"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let pin = Dongle::next_pin(&mut pins).await;
    let (status, body) = user
        .post(
            &format!("/dongles/{id}/pairing-submit"),
            json!({"pairing_session_id": started["pairing_session_id"], "pin": pin}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    id
}

/// One agent of `user` serving dongles `a` and `b`, both paired, in a group that relays: the agent and
/// the group's id.
pub async fn one_agent_relaying(
    server: &Server,
    user: &User,
    a: &Dongle,
    b: &Dongle,
) -> (Agent, String) {
    let mut agent = Agent::new();
    agent.login(server, user).await;
    let mut args = a.agent_args();
    args.extend(b.agent_args());
    agent.run(&args);
    let a_id = pair(user, a).await;
    let b_id = pair(user, b).await;
    let group = active_group(user, &a_id, &b_id).await;
    (agent, group)
}

/// Two serial dongles relaying A -> B through one agent, with B on a bus of its own at 125 kbit/s
/// and a tap recording that bus: a receiving bus much slower than the sending one.
pub struct TowardsASlowBus {
    pub a: Dongle,
    pub b: Dongle,
    pub slow_bus: dongle_sim::BusTap,
    pub agent: Agent,
    pub group: String,
    /// The folder of the buses, which must live as long as they do: a caller that takes the parts
    /// apart binds it to a name (`bus_root: _bus_root`), since `..` would drop it at once.
    pub bus_root: tempfile::TempDir,
}

pub async fn towards_a_slow_bus(server: &Server, user: &User) -> TowardsASlowBus {
    let bus_root = tempfile::tempdir().unwrap();
    let a = Dongle::serial().await;
    let b = Dongle::serial_on_bus(bus_root.path(), "slow").await;
    let mut slow_bus = dongle_sim::BusTap::recorder_at(bus_root.path(), "slow").unwrap();
    let (agent, group) = one_agent_relaying(server, user, &a, &b).await;
    let b_id = user.dongle(&b.device_id).await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    user.apply_can_config(&b_id, 125_000).await;
    assert!(slow_bus.wait_for_peers(1, Duration::from_secs(5)).await);
    TowardsASlowBus {
        a,
        b,
        slow_bus,
        agent,
        group,
        bus_root,
    }
}

/// Makes a group of `a` and `b`, activates it and waits until it relays.
pub async fn active_group(user: &User, a: &str, b: &str) -> String {
    let (status, group) = user
        .post("/groups", json!({"dongle_a_id": a, "dongle_b_id": b}))
        .await;
    assert!(status.is_success(), "{status} {group}");
    let gid = group["id"].as_str().unwrap().to_string();
    let (status, body) = user
        .post(&format!("/groups/{gid}/activate"), json!({}))
        .await;
    assert!(status.is_success(), "{status} {body}");
    for _ in 0..100 {
        let (_, g) = user.get(&format!("/groups/{gid}")).await;
        if g["state"] == "ACTIVE" {
            return gid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the group did not become ACTIVE");
}

/// A new file in `dir` for one agent's log, for `AGENT_LOG_DIR`.
fn agent_log_file(dir: &Path) -> std::fs::File {
    use std::sync::atomic::{AtomicU32, Ordering};
    static STARTED: AtomicU32 = AtomicU32::new(0);
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("agent-{}-{n}.log", std::process::id()));
    std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
