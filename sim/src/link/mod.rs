//! The transports between the dongle and its host: a pseudo-terminal ([`pty`]) standing in for
//! USB serial, and UDP ([`udp`]). Only these modules do I/O on the host link; each one owns
//! its link, feeds received packets to the dongle and sends what the dongle queues for the
//! host, applying the configured faults on the way out.

pub mod pty;
pub mod udp;
