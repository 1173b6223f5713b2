//! `bridge-demo`: the whole system on one machine, with nothing but Rust and PostgreSQL's binaries.
//!
//! It starts the server on an embedded PostgreSQL in a temporary folder, makes a user, starts two
//! simulated dongles on two separate virtual CAN buses (one on a pseudo-terminal as if on USB, one on UDP
//! as if on the LAN) and two agents (one per side, as on two workstations), pairs both dongles with the
//! PINs they show, configures their CAN bus, runs a command, groups them, sends frames both ways, stops
//! one side's agent while frames keep coming (buffered by the server), brings it back (replayed), and
//! prints what happened. The same library runs in the integration test with small numbers.
//!
//! - [`system`]: the server part; the dongles, the agents and the user's API client are
//!   [`bridge_rig`]'s.
//! - [`traffic`]: frames onto one bus and off the other, with latency and order.
//! - [`report`]: the summary table.

pub mod report;
pub mod system;
pub mod traffic;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use firmware_proto::ids::CanId;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use bridge_rig::{AgentPart, DonglePart, UserClient, pair};
use report::Summary;
use system::ServerPart;

/// How much traffic the demo sends.
#[derive(Debug, Clone)]
pub struct Options {
    /// Frames per direction in the live phase, and towards the stopped side in the buffering phase.
    pub frames: u32,
    /// Frames per second per direction.
    pub rate: u32,
    /// Draw progress (spinners and bars); off in tests.
    pub progress: bool,
    /// Server instances on the one database: with 2, agent B connects to the second, and the group
    /// relays across instances (CROSS_INSTANCE).
    pub instances: usize,
    /// Keep the relay's buffer on a nats-server with JetStream that the demo starts (`--nats`).
    pub nats: bool,
}

/// The running system, kept for `--keep-running`.
pub struct Running {
    pub server: ServerPart,
    pub agents: Vec<AgentPart>,
    pub dongles: Vec<DonglePart>,
    pub email: String,
    pub password: String,
}

impl Running {
    /// Stops everything, agents first so that nothing talks to a server that is going.
    pub async fn stop(mut self) {
        for agent in &mut self.agents {
            let _ = agent.stop().await;
        }
        for dongle in self.dongles {
            dongle.sim.shutdown().await;
        }
        self.server.stop().await;
    }
}

/// One step at a time, each with a tick when it is done.
pub struct Steps {
    progress: bool,
    started: Instant,
}

impl Steps {
    pub fn new(progress: bool) -> Self {
        use std::io::IsTerminal;
        Self {
            // Spinners and bars only make sense on a terminal; elsewhere each step is one plain line.
            progress: progress && std::io::stderr().is_terminal(),
            started: Instant::now(),
        }
    }

    /// Runs `step`, showing a spinner meanwhile and a tick (or a cross) after.
    pub async fn run<T>(
        &self,
        what: &str,
        step: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let spinner = self.spinner(what);
        let began = Instant::now();
        let outcome = step.await;
        let took = began.elapsed();
        let mark = if outcome.is_ok() { "✔" } else { "✘" };
        let line = format!("{mark} {what} ({:.1} s)", took.as_secs_f64());
        match spinner {
            Some(s) => s.finish_with_message(line),
            None => eprintln!("{line}"),
        }
        outcome.with_context(|| format!("step failed: {what}"))
    }

    fn spinner(&self, what: &str) -> Option<ProgressBar> {
        if !self.progress {
            return None;
        }
        let s = ProgressBar::new_spinner();
        s.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("a valid template"));
        s.set_message(what.to_string());
        s.enable_steady_tick(Duration::from_millis(100));
        Some(s)
    }

    /// A bar of `len` frames.
    pub fn bar(&self, what: &str, len: u64) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("  {msg:<28} [{bar:30}] {pos}/{len} frames")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The group's state as `GET /groups/:id` tells it.
async fn group_state(user: &UserClient, group: &str) -> anyhow::Result<(String, u64)> {
    let g = user.get(&format!("/groups/{group}")).await?;
    let state = g["state"].as_str().unwrap_or("?").to_string();
    let backlog =
        g["backlog"]["a_to_b"].as_u64().unwrap_or(0) + g["backlog"]["b_to_a"].as_u64().unwrap_or(0);
    Ok((state, backlog))
}

/// Runs the whole demo in `dir`; answers the summary and the running system.
pub async fn run(dir: &Path, options: &Options) -> anyhow::Result<(Summary, Running)> {
    let steps = Steps::new(options.progress);
    let mut summary = Summary::default();

    let instances = options.instances.max(1);
    let server = steps
        .run(
            &format!(
                "{} on an embedded PostgreSQL{}",
                if instances > 1 {
                    format!("{instances} server instances")
                } else {
                    "server".to_string()
                },
                if options.nats {
                    ", the relay's buffer on NATS JetStream"
                } else {
                    ""
                }
            ),
            ServerPart::start(dir, instances, options.nats),
        )
        .await?;
    // The state of a group relaying with both sides connected: across instances when the agents
    // reach different ones.
    let relaying = if instances > 1 {
        "CROSS_INSTANCE"
    } else {
        "ACTIVE"
    };
    let email = "technician@demo.example".to_string();
    let password = steps
        .run("user account", server.create_user(&email))
        .await?;
    let server_admin_password = steps
        .run(
            "administrator account",
            server.create_admin("admin@demo.example"),
        )
        .await?;
    let a = steps
        .run(
            "dongle A on a pseudo-terminal (bus A)",
            DonglePart::usb(&dir.join("dongle-a"), "demo-a"),
        )
        .await?;
    let b = steps
        .run(
            "dongle B on UDP (bus B)",
            DonglePart::lan(&dir.join("dongle-b"), "demo-b"),
        )
        .await?;
    let url = server.url().to_string();
    // Agent B reaches the last instance, as a load balancer might send it.
    let url_b = server.last_url().to_string();
    let mut agent_a = steps
        .run(
            "agent A logs in",
            AgentPart::login(
                &dir.join("agent-a"),
                &url,
                &email,
                &password,
                "workstation-a",
                a.plan.clone(),
            ),
        )
        .await?;
    let mut agent_b = steps
        .run(
            "agent B logs in",
            AgentPart::login(
                &dir.join("agent-b"),
                &url_b,
                &email,
                &password,
                "workstation-b",
                b.plan.clone(),
            ),
        )
        .await?;
    agent_a.start();
    agent_b.start();
    let user = UserClient::login(&url, &email, &password).await?;
    let mut running = Running {
        server,
        agents: Vec::new(),
        dongles: Vec::new(),
        email: email.clone(),
        password: password.clone(),
    };

    let flow = async {
        let a_id = steps.run("pair dongle A with the PIN it shows", pair(&user, &a)).await?;
        let b_id = steps.run("pair dongle B with the PIN it shows", pair(&user, &b)).await?;
        let config = json!({"bitrate": 500000, "sample_point_permille": 875, "mode": "normal",
                            "use_raw": false, "auto_retx": true, "tx_pause": false, "protocol_exc": false});
        for (name, id) in [("A", &a_id), ("B", &b_id)] {
            let applied = steps
                .run(
                    &format!("CAN config on dongle {name}: 500 kbit/s, sample point 87.5 %"),
                    user.put(&format!("/dongles/{id}/can-config"), config.clone()),
                )
                .await?;
            let e = &applied["effective"];
            summary.configs.push(format!(
                "dongle {name}: {} bit/s, sample point {} permille, prescaler {}, tseg1 {}, tseg2 {}, sjw {}",
                e["bitrate"], e["sample_point_permille"], e["prescaler"], e["tseg1"], e["tseg2"], e["sjw"]
            ));
        }
        let command = steps
            .run("command `version` on dongle A", async {
                let queued = user
                    .post(&format!("/dongles/{a_id}/commands"), json!({"command": "version"}))
                    .await?;
                let cid = queued["command_id"].as_str().context("a command id")?.to_string();
                for _ in 0..100 {
                    let c = user.get(&format!("/dongles/{a_id}/commands/{cid}")).await?;
                    if c["status"] == "done" {
                        return Ok(c["stdout"].as_str().unwrap_or("").trim().to_string());
                    }
                    if c["status"] == "error" || c["status"] == "timeout" {
                        bail!("the command ended {}: {}", c["status"], c["stderr"]);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bail!("the command did not finish within 10 s")
            })
            .await?;
        summary.command_output = command;
        let group = steps
            .run("group A + B, activated", async {
                let g = user
                    .post("/groups", json!({"dongle_a_id": a_id, "dongle_b_id": b_id}))
                    .await?;
                let gid = g["id"].as_str().context("a group id")?.to_string();
                user.post(&format!("/groups/{gid}/activate"), json!({})).await?;
                for _ in 0..100 {
                    let (state, _) = group_state(&user, &gid).await?;
                    summary.saw_state(&state);
                    if state == relaying {
                        return Ok(gid);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bail!("the group did not become {relaying} within 10 s")
            })
            .await?;

        // Live traffic, both directions at once.
        let id_ab = CanId::standard(0x123).expect("an 11-bit id");
        let id_ba = CanId::standard(0x321).expect("an 11-bit id");
        // Frames enter through the dongles themselves (see `traffic`); taps only listen on the far buses.
        let (rx_a, rx_b) = (a.tap()?, b.tap()?);
        // A dongle looks for new members of its bus every REFRESH_INTERVAL: until it has seen a tap, the
        // frames it transmits would not reach it.
        tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
        let bar_ab = steps.bar("A -> B live", u64::from(options.frames));
        let bar_ba = steps.bar("B -> A live", u64::from(options.frames));
        let settle = Duration::from_secs(5);
        let progress_ab = |n| bar_ab.set_position(n);
        let progress_ba = |n| bar_ba.set_position(n);
        let (ab, ba) = tokio::join!(
            traffic::run(&a.sim, rx_b, traffic::Stream { id: id_ab, tag: 1, count: options.frames, rate: options.rate, settle }, &progress_ab),
            traffic::run(&b.sim, rx_a, traffic::Stream { id: id_ba, tag: 2, count: options.frames, rate: options.rate, settle }, &progress_ba),
        );
        bar_ab.finish();
        bar_ba.finish();
        eprintln!(
            "✔ live frames: A -> B {}/{}, B -> A {}/{}",
            ab.delivered, ab.sent, ba.delivered, ba.sent
        );
        summary.live_ab = ab;
        summary.live_ba = ba;

        // Side B's agent goes away; frames towards B are buffered, then replayed when it is back.
        steps.run("stop agent B", agent_b.stop()).await?;
        let rx_b = b.tap()?;
        tokio::time::sleep(dongle_sim::bus::REFRESH_INTERVAL * 2).await;
        let bar = steps.bar("A -> B while B is away", u64::from(options.frames));
        let progress = |n| bar.set_position(n);
        let buffered_phase = async {
            // Frames sent while B is away arrive only after it is back: allow for that in the settle time.
            traffic::run(&a.sim, rx_b, traffic::Stream { id: id_ab, tag: 3, count: options.frames, rate: options.rate, settle: Duration::from_secs(30) }, &progress).await
        };
        let restart = async {
            // Watch the group fall back to DEGRADED and its backlog grow, then bring agent B back.
            let mut peak = 0;
            let sending = Duration::from_secs_f64(f64::from(options.frames) / f64::from(options.rate.max(1)));
            let until = Instant::now() + sending + Duration::from_millis(500);
            while Instant::now() < until {
                if let Ok((state, backlog)) = group_state(&user, &group).await {
                    summary.saw_state(&state);
                    peak = peak.max(backlog);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            agent_b.start();
            peak
        };
        let (flow, peak) = tokio::join!(buffered_phase, restart);
        bar.finish();
        summary.buffered = flow;
        summary.backlog_peak = peak;
        summary.frame_store = running.server.server.state.relay.frame_store().kind().to_string();
        for _ in 0..100 {
            let (state, _) = group_state(&user, &group).await?;
            summary.saw_state(&state);
            if state == relaying {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "✔ buffered and replayed: {}/{} frames, backlog peaked at {}",
            summary.buffered.delivered, summary.buffered.sent, summary.backlog_peak
        );

        // An administrator measures the group's path: probes echoed between the two agents.
        let admin_email = "admin@demo.example";
        let admin_password = server_admin_password;
        let latency = steps
            .run("latency test of the group, as an administrator (1 000 probes/s for 3 s)", async {
                let admin = UserClient::login(&url, admin_email, &admin_password).await?;
                admin
                    .post(&format!("/admin/groups/{group}/latency-test"), json!({"rate": 1000, "seconds": 3}))
                    .await
            })
            .await?;
        summary.latency = Some(latency);
        anyhow::Ok(())
    }
    .await;
    running.agents = vec![agent_a, agent_b];
    running.dongles = vec![a, b];
    summary.elapsed = steps.elapsed();
    match flow {
        Ok(()) => Ok((summary, running)),
        Err(e) => {
            running.stop().await;
            Err(e)
        }
    }
}
