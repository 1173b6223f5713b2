//! Scenarios run against a dongle target: the simulator, or a real dongle through probe-rs.
//!
//! The scenarios are written once, over [`target::Target`], and drive the dongle through the agent
//! library's [`bridge_agent::session::DongleSession`], so the suite tests the very host code users run.
//! The simulator and the reference firmware under QEMU run on every CI run; a rig with a probe runs the
//! same scenarios against a flashed dongle, so that the simulator and the firmware cannot drift apart
//! unnoticed.
//!
//! # Layout
//! - [`target`]: what a scenario may ask of a dongle (connect, read the PIN it shows, unplug, reset).
//! - [`sim_target`]: the simulator as a target.
//! - [`qemu_target`]: the reference firmware (`firmware/`) on QEMU's emulated STM32F405.
//! - [`probe_target`]: a real dongle: probe-rs flashes and resets it, RTT carries its log.
//! - [`scenarios`]: the scenarios.
//! - [`report`]: results as test lines, a closing count, and JUnit XML.
pub mod probe_target;
pub mod qemu_target;
pub mod report;
pub mod scenarios;
pub mod sim_target;
pub mod target;
