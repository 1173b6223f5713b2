//! The agent's part in a latency benchmark through a group (`control_proto::probe`): the sending side
//! puts numbered probes into its side's stream and times their echoes; the receiving side sends the
//! run's probes back instead of putting them on its dongle's bus.
//!
//! [`Probes`] holds the runs in progress per group side. The frames from the server on their way to a
//! dongle pass [`Probes::split`] first, but only while some run is armed (one atomic load otherwise),
//! so the relay's hot path pays nothing for the benchmark it does not run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_proto::data::Side;
use control_proto::probe;
use control_proto::{ProbeRole, ProbeSummary, ReplyErrorCode, ReplyOk, ReplyResult, RoundTrips};
use firmware_proto::ext::batch::flags;
use firmware_proto::ids::{CanId, DeviceId};
use hops::tally::{Arrivals, quantile};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::Shared;
use super::reply::{error, ok};
use crate::frame::Frame;

/// The most runs armed at once on one agent.
const MAX_RUNS: usize = 64;
/// The longest echo a server may ask for.
const MAX_ECHO: Duration = Duration::from_secs(3600);
/// The longest a sender waits for echoes after its last probe left, whatever the server asked.
const MAX_SETTLE: Duration = Duration::from_secs(30);

/// The runs in progress, per group side.
#[derive(Default)]
pub(super) struct Probes {
    runs: Mutex<HashMap<(Uuid, Side), Run>>,
    /// How many runs there are, read without the lock on every slice of frames from the server.
    armed: AtomicUsize,
}

struct Run {
    run_id: Uuid,
    role: Role,
    /// After this the run is forgotten (and its late probes would reach the bus as ordinary frames).
    until: Instant,
}

#[derive(Clone)]
enum Role {
    /// Send the run's probes back into the side's stream.
    Echo,
    /// The run's sender: count the echoes.
    Measure(Arc<Measure>),
    /// The run ended here: drop its late probes.
    Drop,
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

/// What became of a slice of frames from the server for a side with a run.
pub(super) struct Split {
    /// The run's id, to tell the probes.
    pub run_id: Uuid,
    /// What to do with its probes.
    role: Role,
}

impl Probes {
    /// The run of a side, when there is one: what [`Self::take`] needs to handle its probes.
    pub(super) fn split(&self, group_id: Uuid, side: Side) -> Option<Split> {
        if self.armed.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut runs = self.runs.lock().unwrap();
        let now = Instant::now();
        let before = runs.len();
        runs.retain(|_, run| run.until > now);
        if runs.len() != before {
            self.armed.store(runs.len(), Ordering::Relaxed);
        }
        let run = runs.get(&(group_id, side))?;
        Some(Split {
            run_id: run.run_id,
            role: run.role.clone(),
        })
    }

    /// Arms a run for a side, replacing the side's previous one. False when too many are armed.
    fn arm(&self, group_id: Uuid, side: Side, run: Run) -> bool {
        let mut runs = self.runs.lock().unwrap();
        let now = Instant::now();
        runs.retain(|_, run| run.until > now);
        if runs.len() >= MAX_RUNS && !runs.contains_key(&(group_id, side)) {
            return false;
        }
        runs.insert((group_id, side), run);
        self.armed.store(runs.len(), Ordering::Relaxed);
        true
    }

    /// Ends a side's run as `run_id`'s sender: its late echoes are dropped for the grace period.
    fn end(&self, group_id: Uuid, side: Side, run_id: Uuid) {
        let mut runs = self.runs.lock().unwrap();
        if let Some(run) = runs.get_mut(&(group_id, side))
            && run.run_id == run_id
        {
            run.role = Role::Drop;
            run.until = Instant::now() + Duration::from_secs(probe::ECHO_GRACE_SECS);
        }
    }
}

impl Split {
    /// Whether `frame` is one of the run's probes.
    pub(super) fn is_probe(&self, frame: &Frame) -> bool {
        probe::decode(self.run_id, frame.data()).is_some()
    }

    /// Takes the run's probes among `frames` (all of them probes): the echoes to send back, if any.
    pub(super) fn take(&self, frames: &[Frame]) -> Vec<Frame> {
        match &self.role {
            Role::Echo => frames.to_vec(),
            Role::Measure(measure) => {
                let now = Instant::now();
                let mut counted = measure.state.lock().unwrap();
                for frame in frames {
                    let Some((seq, sent_us)) = probe::decode(self.run_id, frame.data()) else {
                        continue;
                    };
                    if counted.arrivals.arrive(seq) {
                        counted.received += 1;
                        let sent = measure.base + Duration::from_micros(sent_us);
                        counted
                            .round_trips
                            .push(now.saturating_duration_since(sent));
                    }
                    counted.last_arrival = Some(now);
                }
                drop(counted);
                measure.arrived.notify_one();
                Vec::new()
            }
            Role::Drop => Vec::new(),
        }
    }
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
                    run_id,
                    role: Role::Echo,
                    until,
                };
                if !self.probes.arm(group_id, side, run) {
                    return error(
                        ReplyErrorCode::Refused,
                        "too many latency runs on this agent",
                    );
                }
                ok(ReplyOk::ProbeArmed)
            }
            ProbeRole::Send {
                count,
                rate,
                settle_ms,
            } => {
                if count == 0 || count > probe::MAX_COUNT || rate == 0 || rate > probe::MAX_RATE {
                    return error(
                        ReplyErrorCode::Refused,
                        format!(
                            "a latency run sends 1 to {} probes at 1 to {} a second",
                            probe::MAX_COUNT,
                            probe::MAX_RATE
                        ),
                    );
                }
                let settle = Duration::from_millis(settle_ms).min(MAX_SETTLE);
                let summary = self
                    .send_probes(run_id, group_id, side, count, rate, settle)
                    .await;
                match summary {
                    Some(summary) => ok(ReplyOk::ProbeDone { summary }),
                    None => error(
                        ReplyErrorCode::Refused,
                        "too many latency runs on this agent",
                    ),
                }
            }
        }
    }

    /// Sends the probes at `rate` a second on a 1 ms tick, then waits for their echoes until all are
    /// back or none came for `settle`. None when the run could not be armed.
    async fn send_probes(
        &self,
        run_id: Uuid,
        group_id: Uuid,
        side: Side,
        count: u32,
        rate: u32,
        settle: Duration,
    ) -> Option<ProbeSummary> {
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
        let run = Run {
            run_id,
            role: Role::Measure(measure.clone()),
            until: base + sending + settle + Duration::from_secs(5),
        };
        if !self.probes.arm(group_id, side, run) {
            return None;
        }
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
        self.probes.end(group_id, side, run_id);
        let counted = measure.state.lock().unwrap();
        let q = |q: f64| quantile(&counted.round_trips, q).map_or(0, |d| d.as_micros() as u64);
        let round_trip = (!counted.round_trips.is_empty()).then(|| RoundTrips {
            min_us: q(0.0),
            p50_us: q(0.5),
            p95_us: q(0.95),
            p99_us: q(0.99),
            max_us: q(1.0),
        });
        Some(ProbeSummary {
            sent,
            received: counted.received,
            duplicates: counted.arrivals.duplicates,
            out_of_order: counted.arrivals.out_of_order,
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

    #[tokio::test(start_paused = true)]
    async fn an_echoing_side_sends_its_runs_probes_back_and_nothing_else_is_a_probe() {
        let probes = Probes::default();
        let (group, run) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(probes.split(group, Side::B).is_none(), "nothing armed");
        let armed = Run {
            run_id: run,
            role: Role::Echo,
            until: Instant::now() + Duration::from_secs(10),
        };
        assert!(probes.arm(group, Side::B, armed));
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
        // The run ends: the side's frames go to the bus again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(probes.split(group, Side::B).is_none());
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
            run_id: run,
            role: Role::Measure(measure.clone()),
            until: Instant::now() + Duration::from_secs(10),
        };
        assert!(probes.arm(group, Side::A, armed));
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
        probes.end(group, Side::A, run);
        let late = probes.split(group, Side::A).unwrap();
        assert!(late.is_probe(&frames(run, 3..4)[0]), "still recognised");
        assert!(late.take(&frames(run, 3..4)).is_empty());
        assert_eq!(measure.state.lock().unwrap().received, 2, "not counted");
    }
}
