//! A software CAN dongle that behaves as the dongle firmware does.
