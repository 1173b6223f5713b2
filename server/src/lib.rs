//! The remote CAN bridge server: accounts, agents, dongles and pairing, CAN configuration, commands,
//! frames sent by hand, groups and the relay of their frames, the live console.
//!
//! # Layout
//!
//! - [`state`]: [`state::AppState`], what every handler can reach.
//! - [`app`]: the router with its layers, and [`app::spawn`] / [`app::serve`], which
//!   run a server in this process with graceful shutdown.
//! - [`config`]: command-line flags (clap) and the plain [`config::ServerConfig`] the server runs on.
//! - [`db`]: the pool, the embedded migrations, and [`db::Database`] (`DATABASE_URL` or the embedded
//!   cluster).
//! - [`embedded_pg`]: a private PostgreSQL cluster in a data folder.
//! - [`listen`]: a LISTEN connection that stays open, for the instances' mailbox and the relay's wake-ups.
//! - [`error_code`]: the closed list of the API's error codes, which domain errors name.
//! - [`client`]: who is on the other end of a request (address, user agent).
//! - [`paging`]: a page of a list (`page`, `per_page`) and where it sits in the whole.
//! - [`http`]: the error type and shape of every non-2xx answer, the request id, extractors.
//! - [`auth`]: passwords, sessions, CSRF, mailed tokens, and the [`auth::Caller`] extractor.
//! - [`users`]: the typed email, roles, statuses and the `users` queries.
//! - [`rate_limit`]: fixed-window counters kept in PostgreSQL.
//! - [`audit`]: [`audit::record`], the one way to write the audit log.
//! - [`agents`]: agent registration, bearer tokens, presence, device reports; [`agents::hub`], the
//!   registry of connected agents (request/response with timeouts) across instances;
//!   [`agents::cluster`], how instances on one database reach each other's agents (LISTEN/NOTIFY and
//!   a polled mailbox); [`agents::ws`], the control WebSocket `/ws/agent` speaking `control_proto`;
//!   [`groups::data_ws`], the data WebSocket `/ws/data` speaking `control_proto::data`, lives with the relay.
//! - [`dongles`]: what a user sees of dongles, the pairing state machine, unpair and force-unpair.
//! - [`can_config`]: a dongle's CAN configuration: checks, applying it through the agent, and the
//!   dongle's acknowledgement with its effective values.
//! - [`commands`]: allow-listed commands: queueing, results, and the database-driven dispatcher and
//!   sweeper ([`commands::dispatch`]).
//! - [`can_send`]: one CAN frame sent by hand, checked and rate-limited per dongle.
//! - [`host_commands`]: network diagnostics on the workstation of the agent serving a dongle.
//! - [`cli_telemetry`]: each dongle's history of commands, typed on its UART console or sent through
//!   the API, capped per dongle and shown on its console.
//! - [`console`]: the live console's streams: ids, the resume ring, sampling (SSE in `routes::streams`).
//! - [`monitor`]: a dongle's own traffic on its console: agents asked to stream watched dongles
//!   ([`monitor::watch`]), and their MONITOR messages published ([`monitor::MonitorIngest`]).
//! - [`groups`]: groups of two dongles and the relay of their frames: the API's operations, one pipe per
//!   relaying group (forwarding, the durable buffer, replay, the state), the data connections, and the
//!   events the console is fed from ([`groups::relay::Relay::subscribe`]).
//! - [`dongle_lease`]: per-dongle leases for requests that wait on an agent, so that no transaction or
//!   lock is held across the round trip.
//! - [`dongle_tokens`]: dongle tokens at rest (AES-256-GCM, versioned keys, row-bound AAD) and key
//!   rotation.
//! - [`email`]: the outbox, its worker, templates and SMTP.
//! - [`routes`]: handlers, laid out like the URL tree (`health`, `auth`, `admin`, `agents`, `dongles`,
//!   `can`, `commands`, `ws`), and the mapping of the domain's errors to the API's.
//! - [`openapi`]: the frame of the OpenAPI document the handlers fill in.
//! - [`telemetry`]: logging, Prometheus metrics, the rustls crypto provider.
//! - [`web`]: the technicians' dashboard: HTML pages under `/` built on the API, assets compiled in.

pub mod agents;
pub mod app;
pub mod audit;
pub mod auth;
pub mod can_config;
pub mod can_send;
pub mod cli_telemetry;
pub mod client;
pub mod commands;
pub mod config;
pub mod console;
pub mod db;
pub mod dongle_lease;
pub mod dongle_tokens;
pub mod dongles;
pub mod email;
pub mod embedded_pg;
pub mod error_code;
pub mod groups;
pub mod host_commands;
pub mod http;
pub mod listen;
pub mod monitor;
pub mod openapi;
pub mod paging;
pub mod rate_limit;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod users;
pub mod web;
