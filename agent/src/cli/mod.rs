//! The technician's commands, one module each. Each is a thin shell over the library.
pub mod list;
pub mod proto_decode;
