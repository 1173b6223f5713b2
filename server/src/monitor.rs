//! A dongle's own traffic on its console, grouped or not (SPEC 3.9): which agents are asked to stream
//! it, and what the server does with what they stream.
//!
//! An agent uploads a dongle's frames only when it has a reason to: the dongle is the side of a group
//! (the relay's stream, which the console shows through `groups::console`), or somebody watches the
//! dongle's console. For the second, [`watch`] looks every [`WATCH_REFRESH_SECS`] (and at once when a
//! console opens) at the dongle streams of this instance's console that have a subscriber, finds the
//! agent serving each dongle, and sends that agent a `watch` for them, which lasts [`WATCH_SECS`]
//! unless repeated; when the last subscriber of a dongle leaves, its agent is told to stop at once. The
//! agent streams the dongle's frames as MONITOR messages on `/ws/data` (sampled at the agent above its
//! rate, with exact counts), and [`MonitorIngest`] publishes them on the dongle's stream, after checking
//! that the agent may speak for that dongle.
//!
//! [`bus_load`] publishes, every [`BUS_LOAD_PERIOD`] on each watched dongle's console, how busy its
//! bus is (the `console::bus_load` meter, fed by the relay, by MONITOR counts and by frames sent by
//! hand), with the share of the bus at the dongle's configured bitrate.
//!
//! With several instances, the instance whose client watches a dongle asks its agent (through the hub,
//! wherever the agent is connected); the frames reach the console of the instance holding the agent's
//! data connection, which sends them on to the watching instance (`console::peers`), with its counts
//! of the bus.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use control_proto::data::Monitor;
use control_proto::{ServerMessage, WATCH_REFRESH_SECS, WATCH_SECS, Watch};
use firmware_proto::ids::DeviceId;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agents::AgentIdentity;
use crate::agents::hub::AgentHub;
use crate::console::{Console, ConsoleEvent, StreamKey, bus_load};
use crate::dongles::owned::{serving_agent, spoken_for_by};

/// Asks the agents serving the dongles watched on this instance's console for their traffic, until
/// `shutdown`.
pub async fn watch(
    pool: PgPool,
    hub: Arc<AgentHub>,
    console: Arc<Console>,
    shutdown: CancellationToken,
) {
    let refresh = Duration::from_secs(u64::from(WATCH_REFRESH_SECS));
    // What the last round asked of each agent, so that a dongle nobody watches any more is stopped at
    // once instead of when its watch runs out.
    let mut asked: HashMap<Uuid, HashSet<DeviceId>> = HashMap::new();
    loop {
        let now = watched_by_agent(&pool, &hub, &console.watched_dongles()).await;
        match now {
            Ok(now) => {
                for (agent_id, device_ids) in &now {
                    send(
                        &hub,
                        *agent_id,
                        device_ids.iter().cloned().collect(),
                        WATCH_SECS,
                    )
                    .await;
                }
                for (agent_id, before) in &asked {
                    let stopped: Vec<DeviceId> = before
                        .iter()
                        .filter(|d| !now.get(agent_id).is_some_and(|n| n.contains(*d)))
                        .cloned()
                        .collect();
                    if !stopped.is_empty() {
                        send(&hub, *agent_id, stopped, 0).await;
                    }
                }
                asked = now;
            }
            // The next round tries again; meanwhile the agents' watches run on until they expire.
            Err(e) => tracing::warn!(error = %e, "could not look up the agents of watched dongles"),
        }
        tokio::select! {
            () = tokio::time::sleep(refresh) => {}
            () = console.dongle_watched.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn send(hub: &AgentHub, agent_id: Uuid, device_ids: Vec<DeviceId>, seconds: u32) {
    let watch = ServerMessage::Watch(Watch {
        device_ids,
        seconds,
    });
    // An agent that went offline gets the watch of the next round from whichever instance then sees
    // the console open; nothing is lost but a moment of a view.
    if let Err(e) = hub.send(agent_id, watch).await {
        tracing::debug!(%agent_id, error = ?e, "could not send a watch");
    }
}

/// The device ids of the watched dongles, by the agent serving each (dongles nobody serves now, or
/// that are not claimed, are left out).
async fn watched_by_agent(
    pool: &PgPool,
    hub: &AgentHub,
    dongles: &[Uuid],
) -> Result<HashMap<Uuid, HashSet<DeviceId>>, sqlx::Error> {
    let mut by_agent: HashMap<Uuid, HashSet<DeviceId>> = HashMap::new();
    if dongles.is_empty() {
        return Ok(by_agent);
    }
    let rows: Vec<(Uuid, String, Uuid)> = sqlx::query_as(
        "SELECT id, device_id, owner_user_id FROM dongles \
         WHERE id = ANY($1) AND ownership_state = 'CLAIMED_ACTIVE' AND owner_user_id IS NOT NULL",
    )
    .bind(dongles)
    .fetch_all(pool)
    .await?;
    for (dongle_id, device_id, owner) in rows {
        if let Some(agent_id) = serving_agent(pool, hub, dongle_id, owner, None).await? {
            let device_id = crate::db::stored_device_id(device_id)?;
            by_agent.entry(agent_id).or_default().insert(device_id);
        }
    }
    Ok(by_agent)
}

/// How often a watched dongle's console gets its `bus_load` event.
pub const BUS_LOAD_PERIOD: Duration = Duration::from_secs(2);

/// Publishes how busy each watched dongle's bus is, every [`BUS_LOAD_PERIOD`], until `shutdown`.
pub async fn bus_load(pool: PgPool, console: Arc<Console>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(BUS_LOAD_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        let rates = console.bus_meter.take(now - last);
        last = now;
        let watched = console.watched_dongles();
        if watched.is_empty() {
            continue;
        }
        let bitrates: HashMap<Uuid, i64> = match sqlx::query_as::<_, (Uuid, i64)>(
            "SELECT dongle_id, coalesce(effective_bitrate, bitrate::bigint) FROM can_configs \
             WHERE dongle_id = ANY($1) AND applied_at IS NOT NULL",
        )
        .bind(&watched)
        .fetch_all(&pool)
        .await
        {
            Ok(rows) => rows.into_iter().collect(),
            // The figure without its share of the bus, rather than none.
            Err(e) => {
                tracing::debug!(error = %e, "could not read the bitrates of watched dongles");
                HashMap::new()
            }
        };
        for dongle_id in watched {
            let rate = rates.get(&dongle_id).copied().unwrap_or(bus_load::Rate {
                frames_per_sec: 0.0,
                bits_per_sec: 0.0,
            });
            let bitrate = bitrates
                .get(&dongle_id)
                .and_then(|b| u32::try_from(*b).ok())
                .filter(|b| *b > 0);
            console.publish(
                StreamKey::Dongle(dongle_id),
                ConsoleEvent::BusLoad {
                    dongle_id,
                    frames_per_sec: (rate.frames_per_sec * 10.0).round() / 10.0,
                    load_percent: bitrate.map(|b| (rate.load_percent(b) * 10.0).round() / 10.0),
                    bitrate,
                },
            );
        }
    }
}

/// How long a data connection trusts its finding that the agent may stream a dongle's traffic.
const RECHECK: Duration = Duration::from_secs(5);
/// The most dongles one data connection remembers findings for.
const MAX_REMEMBERED: usize = 1024;

/// One data connection's MONITOR messages, published on the dongles' consoles.
pub struct MonitorIngest {
    agent: AgentIdentity,
    /// Dongles this agent may speak for, found by a query, and when.
    allowed: HashMap<DeviceId, (Uuid, Instant)>,
}

impl MonitorIngest {
    pub fn new(agent: AgentIdentity) -> Self {
        Self {
            agent,
            allowed: HashMap::new(),
        }
    }

    /// Publishes the frames of `monitor` on its dongle's console. False (and nothing published) when
    /// the agent may not speak for that dongle: it is not its user's claimed dongle, or this agent does
    /// not see it now.
    pub async fn publish(
        &mut self,
        pool: &PgPool,
        console: &Console,
        monitor: Monitor<'_>,
    ) -> Result<bool, sqlx::Error> {
        let Some(dongle_id) = self.dongle(pool, monitor.device_id).await? else {
            return Ok(false);
        };
        let sent = monitor.batch.len() as u64;
        metrics::counter!("console_monitor_frames_seen_total").increment(monitor.seen);
        metrics::counter!("console_monitor_frames_total").increment(sent);
        // One frame shown for every `sampled` the dongle saw, as the console marks its own sampling.
        let sampled = (sent > 0 && monitor.seen > sent)
            .then(|| u32::try_from(monitor.seen.div_ceil(sent)).unwrap_or(u32::MAX));
        // Every frame the dongle saw counts on its bus, each as long as the sample's frames on average.
        let sample_bits: u64 = monitor
            .batch
            .iter()
            .map(|r| bus_load::frame_bits(r.id.is_extended(), r.data.len()))
            .sum();
        let bits = sample_bits
            .saturating_mul(monitor.seen)
            .checked_div(sent)
            .unwrap_or(0);
        console.bus_meter.add(dongle_id, monitor.seen, bits);
        let ts = crate::console::timestamp(chrono::Utc::now());
        console.publish_frames(StreamKey::Dongle(dongle_id), monitor.batch.iter(), |r| {
            ConsoleEvent::can_frame(
                dongle_id,
                monitor.direction.name(),
                &ts,
                (&r).into(),
                sampled,
            )
        });
        Ok(true)
    }

    /// The dongle `device_id` if this agent may stream its traffic: its user's claimed dongle that the
    /// agent sees now (or its own local endpoint).
    async fn dongle(
        &mut self,
        pool: &PgPool,
        device_id: DeviceId,
    ) -> Result<Option<Uuid>, sqlx::Error> {
        if let Some((dongle_id, at)) = self.allowed.get(&device_id)
            && at.elapsed() < RECHECK
        {
            return Ok(Some(*dongle_id));
        }
        let found = spoken_for_by(pool, self.agent, device_id).await?;
        match found {
            Some(dongle_id) => {
                if self.allowed.len() >= MAX_REMEMBERED {
                    self.allowed.clear();
                }
                self.allowed.insert(device_id, (dongle_id, Instant::now()));
            }
            None => {
                self.allowed.remove(&device_id);
            }
        }
        Ok(found)
    }
}
