//! The bridge agent: finds CAN dongles on USB serial and on the LAN, speaks firmware-proto to them,
//! and bridges them to the server.
