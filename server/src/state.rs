//! What every handler can reach: the pool, the configuration, and the instance's shared services (the
//! agents' hub, the relay, the console, the keys). It sits below every service and route; [`crate::app`]
//! builds it and the router on top.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::agents::cluster::NatsMailbox;
use crate::agents::hub::AgentHub;
use crate::config::ServerConfig;
use crate::console::Console;
use crate::dongle_tokens::KeyRing;
use crate::groups::relay::Relay;
use crate::groups::store::FrameStore;
use crate::telemetry;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub config: Arc<ServerConfig>,
    /// The URL mail links point at (`--public-url`, or the address the server listens on).
    pub public_url: Arc<str>,
    /// Wakes this process's mail worker when a handler queues mail.
    pub mail_wake: Arc<Notify>,
    /// Wakes this process's command dispatcher when a command is queued or an agent connects.
    pub command_wake: Arc<Notify>,
    pub metrics: PrometheusHandle,
    /// The agents' control connections, on this instance and (through the database) on the others.
    pub hub: Arc<AgentHub>,
    /// The dongle-token master keys (from the configuration).
    pub keys: Arc<KeyRing>,
    /// The live console's streams (SPEC 3.9).
    pub console: Arc<Console>,
    /// The relay of groups' frames: data connections, pipes, and the events the console is fed from.
    pub relay: Arc<Relay>,
}

impl AppState {
    /// The state with the relay's frames kept in PostgreSQL.
    pub fn new(pool: PgPool, config: ServerConfig, public_url: String) -> Self {
        Self::with_frames(pool, config, public_url, FrameStore::Postgres)
    }

    /// The state with the relay's frames kept in `frames`.
    pub fn with_frames(
        pool: PgPool,
        config: ServerConfig,
        public_url: String,
        frames: FrameStore,
    ) -> Self {
        let keys = Arc::new(config.dongle_keys.clone());
        // With the relay on NATS, the instances' messages to each other go there first too.
        let mailbox = match &frames {
            FrameStore::JetStream(js) => Some(NatsMailbox {
                client: js.client(),
                prefix: format!("{}-mailbox", js.stream_name()),
            }),
            FrameStore::Postgres => None,
        };
        let hub = Arc::new(AgentHub::clustered(
            pool.clone(),
            config.cluster.clone(),
            keys.clone(),
            mailbox,
        ));
        let relay = Arc::new(Relay::new(
            pool.clone(),
            config.relay.clone(),
            frames,
            hub.clone(),
        ));
        Self {
            hub,
            relay,
            pool,
            keys,
            console: Arc::new(Console::new(config.console_frame_rate)),
            config: Arc::new(config),
            public_url: public_url.into(),
            mail_wake: Arc::new(Notify::new()),
            command_wake: Arc::new(Notify::new()),
            metrics: telemetry::prometheus(),
        }
    }
}

impl AppState {
    /// The parts of the server that the operations on a dongle use.
    pub fn dongle_services(&self) -> crate::dongles::Services<'_> {
        crate::dongles::Services {
            pool: &self.pool,
            hub: &self.hub,
            keys: &self.keys,
            relay: &self.relay,
            console: &self.console,
            agent_request_timeout: self.config.agent_request_timeout,
            dongle_request_timeout: self.config.dongle_request_timeout,
            pairing_window: self.config.pairing_window,
            rate_limits: &self.config.rate_limits,
            command_output_cap: self.config.command_output_cap,
        }
    }

    /// The parts of the server that the commands' API and dispatcher use.
    pub fn command_services(&self) -> crate::commands::CommandServices {
        crate::commands::CommandServices {
            pool: self.pool.clone(),
            hub: self.hub.clone(),
            console: self.console.clone(),
            command_wake: self.command_wake.clone(),
            rate_limits: self.config.rate_limits.clone(),
            dev_mode: self.config.dev_mode,
            command_output_cap: self.config.command_output_cap,
            dongle_request_timeout: self.config.dongle_request_timeout,
            command_poll_interval: self.config.command_poll_interval,
            command_grace: self.config.command_grace,
        }
    }
}
