//! Every scenario against every target: the simulator always (plain REMP v1 and with every extension,
//! on a pseudo-terminal and on UDP), the reference firmware under QEMU (plain and with every extension)
//! where QEMU and the firmware build are there, real hardware when a rig is configured.
//!
//! A run prints a line per scenario, a closing `N passed, N failed, N skipped`, and writes JUnit XML to
//! `$HIL_JUNIT` (default: `hil-junit.xml` in cargo's target temporary folder). Without a rig the
//! hardware runs are reported as ignored with the reason; with a rig configured but its probe or port
//! missing, they fail, so that a rig that lost its board goes red.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use dongle_sim::Extensions;
use hil_tests::probe_target::{HardwareConfig, ProbeTarget};
use hil_tests::qemu_target::QemuTarget;
use hil_tests::report::{Outcome, Report};
use hil_tests::scenarios::{SCENARIOS, run_all};
use hil_tests::sim_target::{SimLink, SimTarget};
use qemu_dongle::QemuConfig;

fn main() -> ExitCode {
    // `cargo test -- --list` and filters are for libtest harnesses; this suite runs whole.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(run());
    println!("{}", report.summary());
    let junit = std::env::var_os("HIL_JUNIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hil-junit.xml"));
    match report.write_junit(&junit) {
        Ok(()) => println!("JUnit XML: {}", junit.display()),
        Err(e) => eprintln!("could not write JUnit XML to {}: {e}", junit.display()),
    }
    if report.count().1 == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run() -> Report {
    let mut report = Report::default();
    for (link, extensions) in [
        (SimLink::Serial, Extensions::NONE),
        (SimLink::Udp, Extensions::NONE),
        (SimLink::Serial, Extensions::ALL),
        (SimLink::Udp, Extensions::ALL),
    ] {
        match SimTarget::start(link, extensions).await {
            Ok(mut target) => {
                run_all(&mut target, &mut report).await;
                target.shutdown().await;
            }
            Err(e) => report.record(
                &format!("sim-{link:?}"),
                "start",
                Duration::ZERO,
                Outcome::Failed {
                    message: format!("{e:#}"),
                    log: String::new(),
                },
            ),
        }
    }

    for extensions in [Extensions::NONE, Extensions::ALL] {
        let name = if extensions == Extensions::NONE {
            "qemu-plain"
        } else {
            "qemu-ext"
        };
        match QemuConfig::find() {
            Err(reason) => {
                for scenario in SCENARIOS {
                    report.skip(name, scenario, &reason.to_string());
                }
            }
            Ok(config) => match QemuTarget::start(&config, extensions).await {
                Ok(mut target) => {
                    run_all(&mut target, &mut report).await;
                    target.shutdown().await;
                }
                Err(e) => report.record(
                    name,
                    "start",
                    Duration::ZERO,
                    Outcome::Failed {
                        message: format!("{e:#}"),
                        log: String::new(),
                    },
                ),
            },
        }
    }

    match HardwareConfig::from_env() {
        Ok(None) => {
            for scenario in SCENARIOS {
                report.skip(
                    "hardware",
                    scenario,
                    "no HIL rig configured (set HIL_CHIP, HIL_FIRMWARE_ELF and HIL_SERIAL_NUMBER or HIL_UDP; see docs/HIL.md)",
                );
            }
        }
        Ok(Some(config)) => match ProbeTarget::start(config).await {
            Ok(mut target) => run_all(&mut target, &mut report).await,
            Err(e) => report.record(
                "hardware",
                "start",
                Duration::ZERO,
                Outcome::Failed {
                    message: format!("{e:#}"),
                    log: String::new(),
                },
            ),
        },
        Err(e) => report.record(
            "hardware",
            "configuration",
            Duration::ZERO,
            Outcome::Failed {
                message: format!("{e:#}"),
                log: String::new(),
            },
        ),
    }
    report
}
