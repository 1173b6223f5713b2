//! `bench-console`: how soon a dongle's live console shows its bus when it opens. A dongle in no
//! group has its frames uploaded by its agent only while someone watches its console (issue 19), so
//! opening the console starts the upload: the server sends the agent a `watch`, the agent streams
//! MONITOR messages, the server publishes them. This measures, on a bus carrying `--rate` frames/s,
//! the time from sending the console's request to its first `can_frame`, over `--trials` openings
//! (each after the previous console closed and the agent stopped uploading).
//!
//! The system is `bridge-demo`'s (embedded PostgreSQL, the server in this process, agents as tasks,
//! simulated dongles); its one group is deactivated, so both dongles are lone dongles.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bridge_bench::flow::{ms, quantile};
use bridge_bench::system::Rig;
use bridge_server::groups::relay::RelaySettings;
use clap::Parser;
use firmware_proto::ids::CanId;
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench-console",
    about = "Time from opening a lone dongle's live console to its first frame, on a busy bus"
)]
struct Args {
    /// Frames per second on the dongle's bus.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// How many times the console is opened.
    #[arg(long, default_value_t = 10)]
    trials: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    bridge_bench::run_in_temp_dir("bench-console", |dir| async move {
        let rig = Rig::start(&dir, 1, RelaySettings::default()).await?;
        let outcome = measure(&rig, &args).await;
        rig.stop().await;
        outcome
    })
}

async fn measure(rig: &Rig, args: &Args) -> anyhow::Result<()> {
    let group = &rig.groups[0];
    rig.user
        .post(&format!("/groups/{}/deactivate", group.group_id), json!({}))
        .await?;
    let dongles = rig.user.get("/dongles").await?;
    let dongle_id = dongles["items"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|d| d["device_id"] == group.a.device_id.as_str())
        })
        .and_then(|d| d["id"].as_str())
        .context("dongle A in the list")?
        .to_string();

    // The bus: `rate` frames a second, in 10 ms slices, for as long as the measurement lasts.
    let sim = &group.a.sim;
    let per_slice = (args.rate / 100).max(1) as usize;
    let traffic = async move {
        let id = CanId::standard(0x7e8).expect("an 11-bit id");
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut n: u32 = 0;
        loop {
            tick.tick().await;
            let frames: Vec<_> = (0..per_slice)
                .map(|_| {
                    n = n.wrapping_add(1);
                    dongle_sim::frame::Frame::classic(id, &n.to_be_bytes()).expect("4 bytes")
                })
                .collect();
            sim.inject_bus_frames(&frames);
        }
    };

    let path = format!("/streams/dongles/{dongle_id}/console");
    let trials = async {
        let mut times = Vec::with_capacity(args.trials);
        for trial in 0..args.trials {
            let started = Instant::now();
            let mut stream = rig.user.stream(&path).await?;
            let mut text = String::new();
            let first = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    let Some(chunk) = stream.chunk().await? else {
                        bail!("the console ended");
                    };
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    if text.contains("event: can_frame") {
                        return anyhow::Ok(started.elapsed());
                    }
                }
            })
            .await
            .with_context(|| format!("trial {trial}: no frame within 10 s"))??;
            times.push(first);
            drop(stream);
            // The console closed: the agent is told to stop at the server's next round (2 s) at the
            // latest; the next trial starts from a quiet upload.
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        anyhow::Ok(times)
    };
    let mut times = tokio::select! {
        times = trials => times?,
        () = traffic => unreachable!("the traffic runs until the trials end"),
    };
    times.sort();
    println!(
        "console open to first frame, {} frames/s on the bus, {} openings: p50 {} ms, max {} ms, min {} ms",
        args.rate,
        times.len(),
        ms(quantile(&times, 0.5)),
        ms(*times.last().context("a trial")?),
        ms(times[0]),
    );
    Ok(())
}
