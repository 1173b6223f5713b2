//! The latency benchmark of a relaying group, for admins (`POST /admin/groups/{id}/latency-test` and
//! the dashboard's group page): numbered probes go from side A's agent through the group's whole path
//! to side B's agent and back, at a chosen rate for a chosen time, and the report says how many were
//! sent, came back, were lost, repeated or reordered, and the round trips' quantiles
//! (`control_proto::probe` says how; the counting is `hops::tally`'s, as in the benchmark binaries).
//!
//! Side B's agent is armed first (it sends the run's probes back instead of putting them on its
//! dongle's bus), then side A's agent sends and counts, and its count is the report. Neither dongle's
//! bus sees a probe. No lock, transaction or connection is held while the agents work.

use std::time::Duration;

use control_proto::data::Side;
use control_proto::{ProbeRole, ProbeSummary, ReplyErrorCode, ReplyOk, RequestBody, probe};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::model::Mode;
use super::pipe::bus_frames_per_second;
use super::serving::sides_of;
use crate::agents::hub::{AgentHub, RequestError};
use crate::audit::{self, Entry, Target};
use crate::client::ClientInfo;

/// The longest run, in seconds.
pub const MAX_SECONDS: u32 = 60;
/// How long the sender waits for the last echoes once it stopped sending.
const SETTLE: Duration = Duration::from_secs(2);
/// How long an agent may take to answer, beyond the run itself.
const ANSWER: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyTest {
    /// Probes a second, 1 to 5 000.
    #[schema(minimum = 1, maximum = 5000)]
    pub rate: u32,
    /// How long to send, 1 to 60 seconds.
    #[schema(minimum = 1, maximum = 60)]
    pub seconds: u32,
}

/// Round trips in milliseconds (nearest-rank quantiles).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct RoundTripsMs {
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// What a run found.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LatencyReport {
    pub group_id: Uuid,
    pub rate: u32,
    pub seconds: u32,
    /// Probes side A's agent sent.
    pub sent: u32,
    /// Probes whose echo came back, each counted once.
    pub received: u32,
    /// Sent and never back.
    pub lost: u32,
    pub duplicates: u64,
    /// Echoes that came after one of a higher number.
    pub out_of_order: u64,
    /// From side A's agent to side B's agent and back, on side A's clock; absent when nothing came
    /// back. Half of it is about one way.
    pub round_trip_ms: Option<RoundTripsMs>,
}

/// Why a run could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("Group not found.")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error(
        "The group is {0}: a latency test needs it relaying with both agents connected (ACTIVE or CROSS_INSTANCE)."
    )]
    NotRelaying(&'static str),
    #[error("No agent serves side {} of the group now: connect it and try again.", .0.letter())]
    SideOffline(Side),
    #[error("Side {}'s agent is too old for latency tests: upgrade bridge-agent on that workstation.", .0.letter())]
    AgentTooOld(Side),
    #[error("Side {}'s agent did not take part: {}", .0.letter(), .1)]
    Agent(Side, String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl LatencyTest {
    fn check(self) -> Result<u32, LatencyError> {
        if !(1..=probe::MAX_RATE).contains(&self.rate) {
            return Err(LatencyError::Invalid(format!(
                "rate must be 1 to {} probes a second",
                probe::MAX_RATE
            )));
        }
        if !(1..=MAX_SECONDS).contains(&self.seconds) {
            return Err(LatencyError::Invalid(format!(
                "seconds must be 1 to {MAX_SECONDS}"
            )));
        }
        let count = self.rate.saturating_mul(self.seconds);
        if count > probe::MAX_COUNT {
            return Err(LatencyError::Invalid(format!(
                "rate times seconds must be at most {} probes",
                probe::MAX_COUNT
            )));
        }
        Ok(count)
    }
}

/// Runs a latency test through `group_id` for the admin `actor`, and audits it.
pub async fn run(
    pool: &PgPool,
    hub: &AgentHub,
    actor: Uuid,
    client: &ClientInfo,
    group_id: Uuid,
    test: LatencyTest,
) -> Result<LatencyReport, LatencyError> {
    let count = test.check()?;
    let sides = sides_of(pool, group_id)
        .await?
        .ok_or(LatencyError::NotFound)?;
    if !matches!(sides.mode, Mode::Active | Mode::CrossInstance) {
        return Err(LatencyError::NotRelaying(sides.mode.as_str()));
    }
    // Faster than the slower bus carries, probes would queue behind the relay's pacing towards it (and
    // take the group's own frames' place there), past the run's end.
    if let Some(most) = max_rate(sides.sides.iter().map(|s| s.bitrate))
        && test.rate > most
    {
        return Err(LatencyError::Invalid(format!(
            "rate must be at most {most} probes a second for this group: the slower side's bus carries no more"
        )));
    }
    let mut agents = Vec::with_capacity(2);
    for (side, info) in [(Side::A, &sides.sides[0]), (Side::B, &sides.sides[1])] {
        let agent = info
            .agents
            .first()
            .copied()
            .ok_or(LatencyError::SideOffline(side))?;
        let device_id: String = sqlx::query_scalar("SELECT device_id FROM dongles WHERE id = $1")
            .bind(info.dongle_id)
            .fetch_one(pool)
            .await?;
        let device_id = crate::db::stored_device_id(device_id)?;
        agents.push((side, agent, device_id));
    }
    let run_id = Uuid::new_v4();
    let request = |side: Side, device_id, role| RequestBody::LatencyProbe {
        run_id,
        device_id,
        group_id,
        side,
        role,
    };
    let (_, agent_b, device_b) = agents[1];
    let echo = ProbeRole::Echo {
        seconds: test.seconds + (SETTLE + ANSWER).as_secs() as u32,
    };
    match hub
        .request(agent_b, request(Side::B, device_b, echo), ANSWER)
        .await
    {
        Ok(ReplyOk::ProbeArmed) => {}
        Ok(_) => return Err(LatencyError::Agent(Side::B, "an unexpected answer".into())),
        Err(e) => return Err(agent_error(Side::B, e)),
    }
    let (_, agent_a, device_a) = agents[0];
    let send = ProbeRole::Send {
        count,
        rate: test.rate,
        settle_ms: SETTLE.as_millis() as u64,
    };
    let within = Duration::from_secs(u64::from(test.seconds)) + SETTLE + ANSWER;
    let summary = match hub
        .request(agent_a, request(Side::A, device_a, send), within)
        .await
    {
        Ok(ReplyOk::ProbeDone { summary }) => summary,
        Ok(_) => return Err(LatencyError::Agent(Side::A, "an unexpected answer".into())),
        Err(e) => return Err(agent_error(Side::A, e)),
    };
    let report = report(group_id, test, summary);
    let details = serde_json::to_value(&report).expect("a report serializes");
    audit::record(
        pool,
        Entry::new("group.latency_test", Some(actor), client)
            .target(Target {
                kind: "group",
                id: group_id.to_string(),
            })
            .details(details),
    )
    .await?;
    Ok(report)
}

/// The highest rate a group's buses carry, from the sides' configured bit rates (None when neither
/// has one).
fn max_rate(bitrates: impl IntoIterator<Item = Option<u32>>) -> Option<u32> {
    bitrates
        .into_iter()
        .flatten()
        .map(bus_frames_per_second)
        .min()
}

fn agent_error(side: Side, e: RequestError) -> LatencyError {
    match e {
        RequestError::Offline => LatencyError::SideOffline(side),
        RequestError::Failed(e) if e.code == ReplyErrorCode::Unsupported => {
            LatencyError::AgentTooOld(side)
        }
        RequestError::Failed(e) => LatencyError::Agent(side, e.message),
        RequestError::Timeout => LatencyError::Agent(side, "it did not answer in time".into()),
        RequestError::TooLarge { .. } => {
            LatencyError::Agent(side, "the request did not fit between instances".into())
        }
    }
}

fn report(group_id: Uuid, test: LatencyTest, s: ProbeSummary) -> LatencyReport {
    let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
    LatencyReport {
        group_id,
        rate: test.rate,
        seconds: test.seconds,
        sent: s.sent,
        received: s.received,
        lost: s.sent.saturating_sub(s.received),
        duplicates: s.duplicates,
        out_of_order: s.out_of_order,
        round_trip_ms: s.round_trip.map(|r| RoundTripsMs {
            min: ms(r.min_us),
            p50: ms(r.p50_us),
            p95: ms(r.p95_us),
            p99: ms(r.p99_us),
            max: ms(r.max_us),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_is_bounded_in_rate_time_and_count() {
        let t = |rate, seconds| LatencyTest { rate, seconds }.check();
        assert_eq!(t(1000, 10).unwrap(), 10_000);
        assert!(t(0, 10).is_err());
        assert!(t(5001, 1).is_err());
        assert!(t(100, 0).is_err());
        assert!(t(100, 61).is_err());
        assert_eq!(t(2000, 60).unwrap(), 120_000);
        assert!(t(5000, 60).is_err(), "300 000 probes are too many");
    }

    #[test]
    fn the_slower_bus_bounds_the_rate() {
        assert_eq!(max_rate([None, None]), None);
        let slow = bus_frames_per_second(125_000);
        assert_eq!(max_rate([Some(1_000_000), Some(125_000)]), Some(slow));
        assert_eq!(max_rate([None, Some(125_000)]), Some(slow));
        assert!(slow < 1000, "{slow}");
    }
}
