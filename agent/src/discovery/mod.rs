//! Finding dongles: which serial ports and which LAN interfaces to look at, and one scan of both.
pub mod lan_interfaces;
pub mod scan;
pub mod usb_ports;
