//! The demo's server part and how it starts and stops: the server on an embedded PostgreSQL, and the
//! demo's user in its database. The other parts (simulated dongles, agents, the user's API client) are
//! `bridge-rig`'s, shared with the benchmarks and the dashboard's browser tests.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use bridge_server::app::{self, RunningServer};
use bridge_server::config::ServerConfig;
use bridge_server::embedded_pg::EmbeddedPostgres;
use bridge_server::users::{self, Email, Role};

/// The server and its database, and any further instances of the server on that database.
pub struct ServerPart {
    pub server: RunningServer,
    /// Instances 2 and on, each with a pool of its own, as separate processes behind a load balancer.
    pub others: Vec<RunningServer>,
    pub postgres: EmbeddedPostgres,
    /// The NATS server the relay buffers on, when started with it.
    pub nats: Option<bridge_rig::nats::NatsNode>,
}

impl ServerPart {
    /// Starts a PostgreSQL cluster in `dir` and `instances` server instances on it (at least one), on
    /// 127.0.0.1 with free ports; with `nats`, also a nats-server with JetStream in `dir`, on which the
    /// instances keep the relay's buffer (`serve --nats-url`).
    pub async fn start(dir: &Path, instances: usize, nats: bool) -> anyhow::Result<Self> {
        let postgres = EmbeddedPostgres::start(dir.join("postgres"))
            .await
            .context("could not start the embedded PostgreSQL")?;
        let nats = if nats {
            let dir = dir.to_path_buf();
            Some(
                tokio::task::spawn_blocking(move || bridge_rig::nats::start(&dir))
                    .await
                    .context("the nats-server start-up task failed")??,
            )
        } else {
            None
        };
        let nats_settings = nats
            .as_ref()
            .map(|node| bridge_server::groups::jetstream::NatsSettings::new(node.url()));
        let pool = bridge_server::db::connect(&postgres.url(), 20).await?;
        bridge_server::db::migrate(&pool).await?;
        let config = ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            nats: nats_settings.clone(),
            // The demo's dongle tokens need a key; a random one lives as long as the demo.
            ..ServerConfig::default()
        };
        let server = app::spawn(config, pool)
            .await
            .context("could not start the server")?;
        let mut others = Vec::new();
        for n in 2..=instances {
            let pool = bridge_server::db::connect(&postgres.url(), 20).await?;
            let config = ServerConfig {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                // Instances share the keys, which also seal what they hand each other.
                dongle_keys: server.state.keys.as_ref().clone(),
                nats: nats_settings.clone(),
                ..ServerConfig::default()
            };
            others.push(
                app::spawn(config, pool)
                    .await
                    .with_context(|| format!("could not start server instance {n}"))?,
            );
        }
        Ok(Self {
            server,
            others,
            postgres,
            nats,
        })
    }

    pub fn url(&self) -> &str {
        &self.server.base_url
    }

    /// The URL of the last instance (the first when there is one).
    pub fn last_url(&self) -> &str {
        self.others.last().map_or(self.url(), |o| &o.base_url)
    }

    /// Makes a verified user with a random password; answers the password.
    pub async fn create_user(&self, email: &str) -> anyhow::Result<String> {
        create_user(&self.server.state.pool, email, Role::User).await
    }

    /// A super_admin, who may run a group's latency test.
    pub async fn create_admin(&self, email: &str) -> anyhow::Result<String> {
        create_user(&self.server.state.pool, email, Role::SuperAdmin).await
    }

    pub async fn stop(self) {
        for other in self.others {
            let _ = other.shutdown().await;
        }
        let _ = self.server.shutdown().await;
        let _ = self.postgres.stop().await;
        drop(self.nats);
    }
}

/// Makes a verified user of `role` with a random password in the server's database; answers the
/// password.
pub async fn create_user(pool: &sqlx::PgPool, email: &str, role: Role) -> anyhow::Result<String> {
    let password: String = {
        use rand::RngExt;
        let mut rng = rand::rng();
        (0..20)
            .map(|_| {
                let alphabet = b"abcdefghjkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789";
                char::from(alphabet[rng.random_range(0..alphabet.len())])
            })
            .collect()
    };
    let hash = bridge_server::auth::password::hash(&password, Default::default())?;
    let user = users::insert(pool, &Email::parse(email)?, &hash, role)
        .await?
        .context("the demo user exists already")?;
    users::mark_email_verified(pool, user.id).await?;
    Ok(password)
}
