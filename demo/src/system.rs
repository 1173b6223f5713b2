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

/// The server and its database.
pub struct ServerPart {
    pub server: RunningServer,
    pub postgres: EmbeddedPostgres,
}

impl ServerPart {
    /// Starts a PostgreSQL cluster in `dir` and the server on it, on 127.0.0.1 with a free port.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let postgres = EmbeddedPostgres::start(dir.join("postgres"))
            .await
            .context("could not start the embedded PostgreSQL")?;
        let pool = bridge_server::db::connect(&postgres.url(), 20).await?;
        bridge_server::db::migrate(&pool).await?;
        let config = ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            // The demo's dongle tokens need a key; a random one lives as long as the demo.
            ..ServerConfig::default()
        };
        let server = app::spawn(config, pool)
            .await
            .context("could not start the server")?;
        Ok(Self { server, postgres })
    }

    pub fn url(&self) -> &str {
        &self.server.base_url
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
        let _ = self.server.shutdown().await;
        let _ = self.postgres.stop().await;
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
