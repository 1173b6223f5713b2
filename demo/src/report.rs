//! The demo's closing summary.

use std::fmt::Write;
use std::time::Duration;

use crate::traffic::Flow;

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// One line per dongle: the effective CAN timing it reported.
    pub configs: Vec<String>,
    pub command_output: String,
    pub live_ab: Flow,
    pub live_ba: Flow,
    /// A -> B while B's agent was away, then replayed.
    pub buffered: Flow,
    pub backlog_peak: u64,
    /// Where the relay kept the backlog: `postgres` or `jetstream`.
    pub frame_store: String,
    /// Group states in the order first seen.
    pub states: Vec<String>,
    /// The administrator's latency test of the group (`POST /admin/groups/{id}/latency-test`).
    pub latency: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn saw_state(&mut self, state: &str) {
        if !self.states.iter().any(|s| s == state) {
            self.states.push(state.to_string());
        }
    }

    /// Frames (and latency probes) lost, repeated or reordered over every phase.
    pub fn faults(&self) -> u64 {
        let probes = self.latency.as_ref().map_or(0, |l| {
            ["lost", "duplicates", "out_of_order"]
                .iter()
                .map(|k| l[k].as_u64().unwrap_or(0))
                .sum()
        });
        [&self.live_ab, &self.live_ba, &self.buffered]
            .iter()
            .map(|f| f.lost() + f.duplicates + f.out_of_order)
            .sum::<u64>()
            + probes
    }

    /// The demo worked: every frame arrived once and in order.
    pub fn ok(&self) -> bool {
        self.faults() == 0 && self.live_ab.sent > 0 && self.buffered.sent > 0
    }

    pub fn render(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let mut out = String::new();
        let _ = writeln!(out, "\nSummary");
        for line in &self.configs {
            let _ = writeln!(out, "  CAN config  {line}");
        }
        let _ = writeln!(
            out,
            "  command     version -> {}",
            self.command_output.replace('\n', " | ")
        );
        let _ = writeln!(
            out,
            "\n  {:<26} {:>8} {:>10} {:>6} {:>9} {:>10} {:>10}",
            "phase", "sent", "delivered", "lost", "replayed", "p50", "p99"
        );
        for (name, flow, replayed) in [
            ("live A -> B", &self.live_ab, 0),
            ("live B -> A", &self.live_ba, 0),
            (
                "A -> B while B away",
                &self.buffered,
                self.buffered.delivered,
            ),
        ] {
            let _ = writeln!(
                out,
                "  {:<26} {:>8} {:>10} {:>6} {:>9} {:>10} {:>10}",
                name,
                flow.sent,
                flow.delivered,
                flow.lost(),
                replayed,
                ms(flow.quantile(0.5)),
                ms(flow.quantile(0.99)),
            );
        }
        let _ = writeln!(
            out,
            "\n  backlog peak {} frames (buffered in {}); duplicates {}; out of order {}",
            self.backlog_peak,
            match self.frame_store.as_str() {
                "jetstream" => "NATS JetStream",
                _ => "PostgreSQL",
            },
            self.live_ab.duplicates + self.live_ba.duplicates + self.buffered.duplicates,
            self.live_ab.out_of_order + self.live_ba.out_of_order + self.buffered.out_of_order
        );
        let _ = writeln!(out, "  group states seen: {}", self.states.join(" -> "));
        if let Some(l) = &self.latency {
            let rtt = &l["round_trip_ms"];
            let _ = writeln!(
                out,
                "  latency test ({} probes/s for {} s, A -> B -> A): {}/{} back, round trip p50 {} ms, p99 {} ms",
                l["rate"], l["seconds"], l["received"], l["sent"], rtt["p50"], rtt["p99"]
            );
        }
        let _ = writeln!(
            out,
            "  {} in {:.1} s",
            if self.ok() {
                "PASS: no frame lost"
            } else {
                "FAIL: frames lost, repeated or reordered"
            },
            self.elapsed.as_secs_f64()
        );
        out
    }
}
