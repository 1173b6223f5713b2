//! Results: one line per scenario as it ends, a closing count, and JUnit XML for CI systems.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// How one scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed {
        message: String,
        log: String,
    },
    /// Not run, with the reason (a hardware run without a rig, an extension the target lacks).
    Skipped {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct Case {
    pub target: String,
    pub scenario: String,
    pub duration: Duration,
    pub outcome: Outcome,
}

/// Every result of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub cases: Vec<Case>,
}

impl Report {
    /// Records a finished scenario and prints its line.
    pub fn record(&mut self, target: &str, scenario: &str, duration: Duration, outcome: Outcome) {
        let status = match &outcome {
            Outcome::Passed => "ok".to_string(),
            Outcome::Failed { message, .. } => format!("FAILED: {message}"),
            Outcome::Skipped { reason } => format!("ignored, {reason}"),
        };
        println!(
            "test {target}::{scenario} ... {status} ({:.2} s)",
            duration.as_secs_f64()
        );
        if let Outcome::Failed { log, .. } = &outcome
            && !log.is_empty()
        {
            println!("---- dongle log of {target}::{scenario} ----\n{log}\n----");
        }
        self.cases.push(Case {
            target: target.to_string(),
            scenario: scenario.to_string(),
            duration,
            outcome,
        });
    }

    /// Records a scenario that was not run, and why.
    pub fn skip(&mut self, target: &str, scenario: &str, reason: &str) {
        self.record(
            target,
            scenario,
            Duration::ZERO,
            Outcome::Skipped {
                reason: reason.to_string(),
            },
        );
    }

    pub fn count(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for c in &self.cases {
            match c.outcome {
                Outcome::Passed => counts.0 += 1,
                Outcome::Failed { .. } => counts.1 += 1,
                Outcome::Skipped { .. } => counts.2 += 1,
            }
        }
        counts
    }

    /// The closing line, in the plain form CI systems read: `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        let (passed, failed, skipped) = self.count();
        format!("hil-tests: {passed} passed, {failed} failed, {skipped} skipped")
    }

    /// The run as JUnit XML: one test suite per target.
    pub fn junit(&self) -> String {
        let mut targets: Vec<&str> = self.cases.iter().map(|c| c.target.as_str()).collect();
        targets.dedup();
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"hil-tests\">\n",
        );
        for target in targets {
            let cases: Vec<&Case> = self.cases.iter().filter(|c| c.target == target).collect();
            let failures = cases
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Failed { .. }))
                .count();
            let skipped = cases
                .iter()
                .filter(|c| matches!(c.outcome, Outcome::Skipped { .. }))
                .count();
            let time: f64 = cases.iter().map(|c| c.duration.as_secs_f64()).sum();
            let _ = writeln!(
                xml,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
                escape(target),
                cases.len()
            );
            for c in cases {
                let _ = write!(
                    xml,
                    "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                    escape(&c.target),
                    escape(&c.scenario),
                    c.duration.as_secs_f64()
                );
                match &c.outcome {
                    Outcome::Passed => xml.push_str("/>\n"),
                    Outcome::Failed { message, log } => {
                        let _ = writeln!(
                            xml,
                            ">\n      <failure message=\"{}\"/>\n      <system-out>{}</system-out>\n    </testcase>",
                            escape(message),
                            escape(log)
                        );
                    }
                    Outcome::Skipped { reason } => {
                        let _ = writeln!(
                            xml,
                            ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                            escape(reason)
                        );
                    }
                }
            }
            xml.push_str("  </testsuite>\n");
        }
        xml.push_str("</testsuites>\n");
        xml
    }

    pub fn write_junit(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.junit())
    }
}

/// Escapes text for an XML attribute or element.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 cannot carry most control characters at all.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_and_escapes() {
        let mut r = Report::default();
        r.record("sim", "a", Duration::from_millis(10), Outcome::Passed);
        r.record(
            "sim",
            "b",
            Duration::ZERO,
            Outcome::Failed {
                message: "x < y & \"z\"".into(),
                log: "PIN 123456\u{1}".into(),
            },
        );
        r.skip("hw", "a", "no rig");
        assert_eq!(r.count(), (1, 1, 1));
        assert_eq!(r.summary(), "hil-tests: 1 passed, 1 failed, 1 skipped");
        let xml = r.junit();
        assert!(
            xml.contains("<testsuite name=\"sim\" tests=\"2\" failures=\"1\" skipped=\"0\""),
            "{xml}"
        );
        assert!(
            xml.contains("message=\"x &lt; y &amp; &quot;z&quot;\""),
            "{xml}"
        );
        assert!(xml.contains("PIN 123456?"), "{xml}");
        assert!(xml.contains("<skipped message=\"no rig\"/>"), "{xml}");
    }
}
