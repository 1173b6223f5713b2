//! The integration tests of `bridge-server`, linked into one test binary: one link instead of one per
//! file keeps the test build fast and small. Each module is one area of behaviour.

mod common;
mod web_support;

mod admin;
mod agents;
mod api_errors;
mod auth_lifecycle;
mod authz_matrix;
mod can_config;
mod cli;
mod cli_telemetry;
mod commands;
mod console;
mod dongle_tokens;
mod email;
mod embedded_pg;
mod faults_database;
mod faults_input;
mod frame_store;
mod groups;
mod hardening;
mod host_commands;
mod keys_cli;
mod layers;
mod listen;
mod migrate_cli;
mod multi_instance;
mod openapi;
mod pairing;
mod password_reset;
mod rate_limits;
mod relay;
mod relay_nats;
mod schema;
mod send_frame;
mod tls;
mod trust_boundaries;
mod web_auth;
mod web_dongles;
mod web_groups;
