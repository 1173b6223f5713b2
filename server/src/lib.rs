//! The remote CAN bridge server.
pub mod db;
