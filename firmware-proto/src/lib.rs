//! The wire protocol between bridge hosts and CAN dongle firmware.
#![no_std]
#![forbid(unsafe_code)]
