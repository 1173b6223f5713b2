//! The integration tests of `bridge-agent`, linked into one test binary: one link instead of one per
//! file keeps the test build fast and small. Each module is one area of behaviour. They drive simulated
//! dongles on pseudo-terminals, so they are Unix only; on Windows this binary is empty.

#![cfg(unix)]

mod common;

mod cli;
mod console_e2e;
mod dongle_manager;
mod faults_link;
mod foreign_builds;
mod group_losses;
mod group_restart;
mod group_unplug;
mod latency_e2e;
mod pairing_e2e;
mod qemu_e2e;
mod slcan;
mod socketcand;
mod uplink_e2e;
