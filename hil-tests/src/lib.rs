//! Scenarios run against a dongle target: the simulator, or real hardware through probe-rs.
