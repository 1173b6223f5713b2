//! The integration tests of `dongle-sim`, linked into one test binary: one link instead of one per
//! file keeps the test build fast and small. Each module is one area of behaviour.

mod common;

mod auth_config_cli;
mod bus_traffic;
mod discovery_pairing;
mod extensions;
mod faults_lifecycle;
