//! The agent's part in a latency benchmark through a group (`control_proto::probe`): the sending side
//! puts numbered probes into its side's stream and times their echoes; the receiving side sends the
//! run's probes back instead of putting them on its dongle's bus.
//!
//! [`Probes`] holds each run's part per group side: running (echoing, or counting the echoes), then
//! dropping its late probes for [`probe::ECHO_GRACE_SECS`]. Frames from the server on their way to a
//! dongle are looked at by [`Probes::split`] only when one of them has a probe's shape
//! ([`looks_like_probe`]: the probe's id and length) and the agent holds a run, so the relay's hot path
//! pays a comparison per frame, and no lock, for the benchmark.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::data::Side;
use control_proto::probe;
use control_proto::{ProbeRole, ProbeSummary, ReplyErrorCode, ReplyOk, ReplyResult, RoundTrips};
use firmware_proto::ext::batch::flags;
use firmware_proto::ids::{CanId, DeviceId};
use hops::tally::{Arrivals, quantile_sorted};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::Shared;
use super::reply::{error, ok};
use crate::frame::Frame;

/// The most runs running at once on one agent.
const MAX_RUNS: usize = 16;
/// The most ended runs whose late probes an agent still drops; past it the oldest are forgotten.
const MAX_DROPPING: usize = 1024;
/// The longest echo a server may ask for.
const MAX_ECHO: Duration = Duration::from_secs(3600);
/// The longest a sender waits for echoes after its last probe left, whatever the server asked.
const MAX_SETTLE: Duration = Duration::from_secs(30);
/// The longest a sender sends.
const MAX_SENDING: Duration = Duration::from_secs(3600);

/// A run's part on one side: the run's id, and the side's group and side. One agent serving both
/// sides of a group takes part twice in the same run.
type Part = (Uuid, Uuid, Side);

/// The runs on this agent, running or ended, by part.
#[derive(Default)]
pub(super) struct Probes {
    runs: Mutex<HashMap<Part, Run>>,
    /// How many runs there are, read without the lock on every slice of frames from the server.
    held: AtomicUsize,
}

struct Run {
    role: Role,
    /// When the role ends: a running run then drops its late probes for the grace period
    /// ([`probe::ECHO_GRACE_SECS`]), and a dropping one is forgotten.
    until: Instant,
}

#[derive(Clone)]
enum Role {
    /// Send the run's probes back into the side's stream.
    Echo,
    /// The run's sender: count the echoes.
    Measure(Arc<Measure>),
    /// The run ended here: drop its late probes rather than put them on the bus.
    Drop,
}

/// Why a run could not be armed.
#[derive(Debug, PartialEq, Eq)]
enum ArmError {
    /// Another run is going on for the side.
    Busy,
    /// The agent holds as many runs as it may.
    Full,
}

impl ArmError {
    fn reply(&self) -> ReplyResult {
        match self {
            Self::Busy => error(
                ReplyErrorCode::Refused,
                "a latency test of this group side is already running: wait for it to end",
            ),
            Self::Full => error(
                ReplyErrorCode::Refused,
                "too many latency tests on this agent: wait a few minutes",
            ),
        }
    }
}

/// A sender's count of its echoes.
struct Measure {
    base: Instant,
    state: Mutex<Counted>,
    arrived: Notify,
}

struct Counted {
    arrivals: Arrivals,
    received: u32,
    round_trips: Vec<Duration>,
    last_arrival: Option<Instant>,
}

/// The runs of one side, for a slice of frames from the server towards it.
pub(super) struct Split {
    runs: Vec<(Uuid, Role)>,
}

impl Probes {
    /// Moves runs whose role ended on: a running one to dropping, a dropping one out; and forgets the
    /// dropping ones that end soonest past [`MAX_DROPPING`].
    fn age(runs: &mut HashMap<Part, Run>, now: Instant) {
        runs.retain(|_, run| {
            if run.until > now {
                return true;
            }
            if matches!(run.role, Role::Drop) {
                return false;
            }
            run.role = Role::Drop;
            run.until = now + Duration::from_secs(probe::ECHO_GRACE_SECS);
            true
        });
        let dropping = runs
            .values()
            .filter(|r| matches!(r.role, Role::Drop))
            .count();
        if dropping > MAX_DROPPING {
            let mut ends: Vec<Instant> = runs
                .values()
                .filter(|r| matches!(r.role, Role::Drop))
                .map(|r| r.until)
                .collect();
            ends.sort_unstable();
            let cut = ends[dropping - MAX_DROPPING];
            runs.retain(|_, r| !matches!(r.role, Role::Drop) || r.until >= cut);
        }
    }

    /// Whether the agent holds any run (running or dropping), without the lock.
    pub(super) fn any(&self) -> bool {
        self.held.load(Ordering::Relaxed) > 0
    }

    /// The runs of a side, when it has any: what [`Split::take`] needs to handle their probes.
    pub(super) fn split(&self, group_id: Uuid, side: Side) -> Option<Split> {
        if !self.any() {
            return None;
        }
        let mut runs = self.runs.lock().unwrap();
        Self::age(&mut runs, Instant::now());
        self.held.store(runs.len(), Ordering::Relaxed);
        let of_side: Vec<(Uuid, Role)> = runs
            .iter()
            .filter(|((_, g, s), _)| *g == group_id && *s == side)
            .map(|((run_id, ..), run)| (*run_id, run.role.clone()))
            .collect();
        (!of_side.is_empty()).then_some(Split { runs: of_side })
    }

    /// Arms a run's part on a side. Refused while another run of the side is going on (its probes
    /// would otherwise be taken for nobody's and reach the bus), and when the agent holds too many.
    fn arm(&self, part: Part, run: Run) -> Result<(), ArmError> {
        let mut runs = self.runs.lock().unwrap();
        Self::age(&mut runs, Instant::now());
        let (run_id, group_id, side) = part;
        let busy = runs.iter().any(|((id, g, s), other)| {
            *id != run_id && *g == group_id && *s == side && !matches!(other.role, Role::Drop)
        });
        if busy {
            return Err(ArmError::Busy);
        }
        let running = runs
            .values()
            .filter(|r| !matches!(r.role, Role::Drop))
            .count();
        if running >= MAX_RUNS && !runs.contains_key(&part) {
            return Err(ArmError::Full);
        }
        runs.insert(part, run);
        self.held.store(runs.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Ends a run's part here: its late probes are dropped for the grace period.
    fn end(&self, part: Part) {
        let mut runs = self.runs.lock().unwrap();
        if let Some(run) = runs.get_mut(&part) {
            run.role = Role::Drop;
            run.until = Instant::now() + Duration::from_secs(probe::ECHO_GRACE_SECS);
        }
    }
}

impl Split {
    /// The run `frame` is a probe of, if any.
    fn run_of(&self, frame: &Frame) -> Option<&(Uuid, Role)> {
        self.runs
            .iter()
            .find(|(run_id, _)| probe::decode(*run_id, frame.data()).is_some())
    }

    /// Whether `frame` is a probe of one of the side's runs.
    pub(super) fn is_probe(&self, frame: &Frame) -> bool {
        self.run_of(frame).is_some()
    }

    /// Takes the runs' probes among `frames` (all of them probes): the echoes to send back, if any.
    pub(super) fn take(&self, frames: &[Frame]) -> Vec<Frame> {
        let now = Instant::now();
        let mut echoes = Vec::new();
        for frame in frames {
            let Some((run_id, role)) = self.run_of(frame) else {
                continue;
            };
            match role {
                Role::Echo => echoes.push(*frame),
                Role::Measure(measure) => {
                    let Some((seq, sent_us)) = probe::decode(*run_id, frame.data()) else {
                        continue;
                    };
                    let mut counted = measure.state.lock().unwrap();
                    if counted.arrivals.arrive(seq) {
                        counted.received += 1;
                        let sent = measure.base + Duration::from_micros(sent_us);
                        counted
                            .round_trips
                            .push(now.saturating_duration_since(sent));
                    }
                    counted.last_arrival = Some(now);
                    drop(counted);
                    measure.arrived.notify_one();
                }
                Role::Drop => {}
            }
        }
        echoes
    }
}

/// Whether `frame` has a probe's shape (its id and length): only then can it be one.
pub(super) fn looks_like_probe(frame: &Frame) -> bool {
    frame.id.is_extended() && frame.id.raw() == probe::CAN_ID && frame.data().len() == probe::LEN
}

/// Probe `seq` of `run_id`, sent `sent_us` after the run began.
fn probe_frame(run_id: Uuid, seq: u32, sent_us: u64) -> Frame {
    let id = CanId::extended(probe::CAN_ID).expect("a 29-bit id");
    Frame::with_flags(id, flags::FD, &probe::encode(run_id, seq, sent_us)).expect("a CAN FD length")
}

impl Shared {
    /// Answers a `latency_probe` request for side `side` of `group_id`, which this agent must serve
    /// with the dongle `device_id`.
    pub(super) async fn latency_probe(
        &self,
        run_id: Uuid,
        device_id: DeviceId,
        group_id: Uuid,
        side: Side,
        role: ProbeRole,
    ) -> ReplyResult {
        match self.data.inbound(group_id, side) {
            Some((served, _)) if served == device_id => {}
            _ => {
                return error(
                    ReplyErrorCode::Refused,
                    format!(
                        "this agent does not serve side {} of group {group_id} with {device_id} now",
                        side.letter()
                    ),
                );
            }
        }
        match role {
            ProbeRole::Echo { seconds } => {
                let until = Instant::now() + Duration::from_secs(u64::from(seconds)).min(MAX_ECHO);
                let run = Run {
                    role: Role::Echo,
                    until,
                };
                match self.probes.arm((run_id, group_id, side), run) {
                    Ok(()) => ok(ReplyOk::ProbeArmed),
                    Err(e) => e.reply(),
                }
            }
            ProbeRole::Send {
                count,
                rate,
                settle_ms,
            } => {
                let sending = f64::from(count) / f64::from(rate.max(1));
                if count == 0
                    || count > probe::MAX_COUNT
                    || rate == 0
                    || rate > probe::MAX_RATE
                    || sending > MAX_SENDING.as_secs_f64()
                {
                    return error(
                        ReplyErrorCode::Refused,
                        format!(
                            "a latency run sends 1 to {} probes at 1 to {} a second, for at most {} s",
                            probe::MAX_COUNT,
                            probe::MAX_RATE,
                            MAX_SENDING.as_secs()
                        ),
                    );
                }
                let settle = Duration::from_millis(settle_ms).min(MAX_SETTLE);
                match self
                    .send_probes(run_id, group_id, side, count, rate, settle)
                    .await
                {
                    Ok(summary) => ok(ReplyOk::ProbeDone { summary }),
                    Err(e) => e.reply(),
                }
            }
        }
    }

    /// Sends the probes at `rate` a second on a 1 ms tick, then waits for their echoes until all are
    /// back or none came for `settle`.
    async fn send_probes(
        &self,
        run_id: Uuid,
        group_id: Uuid,
        side: Side,
        count: u32,
        rate: u32,
        settle: Duration,
    ) -> Result<ProbeSummary, ArmError> {
        let base = Instant::now();
        let measure = Arc::new(Measure {
            base,
            state: Mutex::new(Counted {
                arrivals: Arrivals::new(count),
                received: 0,
                round_trips: Vec::with_capacity(count as usize),
                last_arrival: None,
            }),
            arrived: Notify::new(),
        });
        let sending = Duration::from_secs_f64(f64::from(count) / f64::from(rate));
        // The run's end is set when its wait ends (`Probes::end`); this bound only keeps a run whose
        // sender was cancelled from staying forever.
        let run = Run {
            role: Role::Measure(measure.clone()),
            until: base + sending + MAX_SETTLE + Duration::from_secs(60),
        };
        let part = (run_id, group_id, side);
        self.probes.arm(part, run)?;
        let mut sent = 0u32;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while sent < count {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.cancel.cancelled() => break,
            }
            let due = ((base.elapsed().as_secs_f64() * f64::from(rate)) as u64 + 1)
                .min(u64::from(count)) as u32;
            if due <= sent {
                continue;
            }
            let frames: Vec<Frame> = (sent..due)
                .map(|seq| probe_frame(run_id, seq, base.elapsed().as_micros() as u64))
                .collect();
            if !self.data.inject(group_id, side, &frames) {
                // The side left this agent (the group was deactivated): what was sent is counted.
                break;
            }
            sent = due;
        }
        let sent_done = Instant::now();
        loop {
            let (received, last) = {
                let counted = measure.state.lock().unwrap();
                (counted.received, counted.last_arrival)
            };
            if received >= sent {
                break;
            }
            let quiet_from = last.map_or(sent_done, |l| l.max(sent_done));
            let left = (quiet_from + settle).saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                () = measure.arrived.notified() => {}
                () = tokio::time::sleep(left) => {}
                () = self.cancel.cancelled() => break,
            }
        }
        self.probes.end(part);
        let (received, duplicates, out_of_order, mut round_trips) = {
            let mut counted = measure.state.lock().unwrap();
            (
                counted.received,
                counted.arrivals.duplicates,
                counted.arrivals.out_of_order,
                std::mem::take(&mut counted.round_trips),
            )
        };
        // Sorted once, outside the lock, for every quantile.
        round_trips.sort_unstable();
        let q = |q: f64| quantile_sorted(&round_trips, q).map_or(0, |d| d.as_micros() as u64);
        let round_trip = (!round_trips.is_empty()).then(|| RoundTrips {
            min_us: q(0.0),
            p50_us: q(0.5),
            p95_us: q(0.95),
            p99_us: q(0.99),
            max_us: q(1.0),
        });
        Ok(ProbeSummary {
            sent,
            received,
            duplicates,
            out_of_order,
            round_trip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(run_id: Uuid, seqs: std::ops::Range<u32>) -> Vec<Frame> {
        seqs.map(|s| probe_frame(run_id, s, 0)).collect()
    }

    fn echo(secs: u64) -> Run {
        Run {
            role: Role::Echo,
            until: Instant::now() + Duration::from_secs(secs),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_echoing_side_sends_its_runs_probes_back_and_nothing_else_is_a_probe() {
        let probes = Probes::default();
        let (group, run) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(probes.split(group, Side::B).is_none(), "nothing armed");
        probes.arm((run, group, Side::B), echo(10)).unwrap();
        let split = probes.split(group, Side::B).unwrap();
        let probes_of_run = frames(run, 0..3);
        assert!(probes_of_run.iter().all(|f| split.is_probe(f)));
        assert!(
            !split.is_probe(&frames(Uuid::new_v4(), 0..1)[0]),
            "another run"
        );
        let real = Frame::classic(CanId::standard(0x7df).unwrap(), &[2, 1, 0x0c]).unwrap();
        assert!(!split.is_probe(&real));
        assert_eq!(split.take(&probes_of_run), probes_of_run);
        assert!(probes.split(group, Side::A).is_none(), "the other side");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_runs_out_still_drops_its_late_probes_for_the_grace_period() {
        let probes = Probes::default();
        let (group, run) = (Uuid::new_v4(), Uuid::new_v4());
        probes.arm((run, group, Side::B), echo(10)).unwrap();
        tokio::time::advance(Duration::from_secs(11)).await;
        // Past its echo: a late probe is neither echoed nor left for the bus.
        let split = probes.split(group, Side::B).unwrap();
        assert!(split.is_probe(&frames(run, 5..6)[0]));
        assert!(split.take(&frames(run, 5..6)).is_empty());
        // Past the grace period too: forgotten.
        tokio::time::advance(Duration::from_secs(probe::ECHO_GRACE_SECS + 1)).await;
        assert!(probes.split(group, Side::B).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_run_on_a_busy_side_is_refused_and_an_ended_one_keeps_being_recognised() {
        let probes = Probes::default();
        let (group, first, second) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        probes.arm((first, group, Side::B), echo(10)).unwrap();
        assert_eq!(
            probes.arm((second, group, Side::B), echo(10)),
            Err(ArmError::Busy)
        );
        probes.arm((second, group, Side::A), echo(10)).unwrap();
        // One agent serving both sides of a group takes part twice in one run.
        let (both_sides, run) = (Uuid::new_v4(), Uuid::new_v4());
        probes.arm((run, both_sides, Side::A), echo(10)).unwrap();
        probes.arm((run, both_sides, Side::B), echo(10)).unwrap();
        assert!(probes.split(both_sides, Side::A).is_some());
        assert!(probes.split(both_sides, Side::B).is_some());
        // Once the first has ended, a new run may start, and the first's late probes are still taken.
        probes.end((first, group, Side::B));
        let third = Uuid::new_v4();
        probes.arm((third, group, Side::B), echo(10)).unwrap();
        let split = probes.split(group, Side::B).unwrap();
        assert!(split.take(&frames(first, 0..1)).is_empty(), "dropped");
        assert_eq!(split.take(&frames(third, 0..1)).len(), 1, "echoed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_holds_a_bounded_number_of_runs() {
        let probes = Probes::default();
        for _ in 0..MAX_RUNS {
            probes
                .arm((Uuid::new_v4(), Uuid::new_v4(), Side::A), echo(10))
                .unwrap();
        }
        assert_eq!(
            probes.arm((Uuid::new_v4(), Uuid::new_v4(), Side::A), echo(10)),
            Err(ArmError::Full)
        );
        // Ended runs still drop their late probes but leave room for new ones.
        tokio::time::advance(Duration::from_secs(11)).await;
        probes
            .arm((Uuid::new_v4(), Uuid::new_v4(), Side::A), echo(10))
            .unwrap();
        assert_eq!(probes.runs.lock().unwrap().len(), MAX_RUNS + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_measuring_side_counts_each_echo_once_and_drops_late_ones_after_its_end() {
        let probes = Probes::default();
        let (group, run) = (Uuid::new_v4(), Uuid::new_v4());
        let measure = Arc::new(Measure {
            base: Instant::now(),
            state: Mutex::new(Counted {
                arrivals: Arrivals::new(4),
                received: 0,
                round_trips: Vec::new(),
                last_arrival: None,
            }),
            arrived: Notify::new(),
        });
        let armed = Run {
            role: Role::Measure(measure.clone()),
            until: Instant::now() + Duration::from_secs(10),
        };
        probes.arm((run, group, Side::A), armed).unwrap();
        tokio::time::advance(Duration::from_millis(3)).await;
        let split = probes.split(group, Side::A).unwrap();
        assert!(
            split.take(&frames(run, 0..2)).is_empty(),
            "no echo of an echo"
        );
        split.take(&frames(run, 1..2));
        {
            let counted = measure.state.lock().unwrap();
            assert_eq!(counted.received, 2);
            assert_eq!(counted.arrivals.duplicates, 1);
            assert_eq!(counted.round_trips, vec![Duration::from_millis(3); 2]);
        }
        probes.end((run, group, Side::A));
        let late = probes.split(group, Side::A).unwrap();
        assert!(late.is_probe(&frames(run, 3..4)[0]), "still recognised");
        assert!(late.take(&frames(run, 3..4)).is_empty());
        assert_eq!(measure.state.lock().unwrap().received, 2, "not counted");
    }
}
