//! The technician's commands, one module each. Each is a thin shell over the library.
pub mod endpoint;
pub mod list;
pub mod login;
pub mod logout;
pub mod pair;
pub mod proto_decode;
pub mod run;
pub mod status;
