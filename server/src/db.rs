//! The database: connecting, and the migrations embedded in the binary.
//!
//! Only the server knows SQL. Every migration under `migrations/` is compiled into the binary, so a
//! deployed `bridge-server migrate` needs nothing beside itself.

use std::collections::BTreeSet;

use anyhow::Context;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

/// The migrations of `migrations/`, reversible (`.up.sql` / `.down.sql`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a pool on `url`, failing with a message that says where it tried (without the password).
///
/// One connection is made up front so that a wrong address or password fails at once with the real
/// cause, instead of after the pool's acquire timeout.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let where_ = || format!("could not connect to PostgreSQL at {}", redact_url(url));
    let options: PgConnectOptions = url.parse().with_context(where_)?;
    let options = with_timeouts(options, Timeouts::default());
    let probe = options.connect().await.with_context(where_)?;
    sqlx::Connection::close(probe).await.ok();
    Ok(pool_with(options, max_connections))
}

/// A lazily connecting pool on `options` (which [`with_timeouts`] should have bounded).
pub fn pool_with(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect_lazy_with(options)
}

/// How long one statement may run, and how long it may wait for a lock, on every connection of the
/// server's pool: whatever a request or a misbehaving peer does, no connection is held for ever and
/// nobody waits for ever on another's lock. Both end the statement with an error that the API answers
/// 503 SERVICE_UNAVAILABLE with Retry-After (`http::error`), never a 500.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub statement: std::time::Duration,
    pub lock: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            statement: std::time::Duration::from_secs(30),
            lock: std::time::Duration::from_secs(10),
        }
    }
}

/// The connection options with the timeouts set for every session they open.
pub fn with_timeouts(options: PgConnectOptions, timeouts: Timeouts) -> PgConnectOptions {
    options.options([
        (
            "statement_timeout",
            format!("{}ms", timeouts.statement.as_millis().max(1)),
        ),
        (
            "lock_timeout",
            format!("{}ms", timeouts.lock.as_millis().max(1)),
        ),
    ])
}

/// A device id read from `dongles.device_id`, whose CHECK constraint holds it to 16 lower-case hex
/// digits: anything else fails as a decoding error, as a column of the wrong type would. Row structs
/// say `#[sqlx(try_from = "String")]` instead.
pub fn stored_device_id(text: String) -> Result<control_proto::DeviceId, sqlx::Error> {
    control_proto::DeviceId::try_from(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// `text` as a text column can hold it: NUL characters, which PostgreSQL text cannot hold, stripped,
/// and cut to at most `cap` bytes on a character boundary. Returns the text and whether it was cut.
pub fn storable_text(text: &str, cap: usize) -> (String, bool) {
    let mut text = text.replace('\0', "");
    if text.len() <= cap {
        return (text, false);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// A LIKE pattern that matches `text` literally anywhere, lower-cased and trimmed: LIKE's wildcards
/// and its escape character in it are escaped, so a search for `%` finds a `%`.
pub fn like_contains(text: &str) -> String {
    let escaped = text
        .trim()
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// One migration that `migrate` applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i64,
    pub description: String,
}

/// Applies every embedded migration not yet applied and returns those it applied, oldest first.
/// Running it again is a no-op that returns an empty list.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<Vec<AppliedMigration>> {
    // The pool's connections end any statement after 30 s and any lock wait after 10 s, which is right
    // for requests but not for a migration: rewriting a large table, or waiting while another instance
    // migrates or a running server's transactions finish, may take longer, and a migration cut short
    // leaves the upgrade to be retried by hand. This one connection lifts both limits for its session,
    // and is closed afterwards rather than returned to the pool with them lifted.
    let mut conn = pool
        .acquire()
        .await
        .context("could not get a database connection to migrate with")?
        .detach();
    for lift in ["SET statement_timeout = 0", "SET lock_timeout = 0"] {
        sqlx::query(lift)
            .execute(&mut conn)
            .await
            .context("could not lift the timeouts for the migrations")?;
    }
    let before = applied_versions_on(&mut conn).await?;
    MIGRATOR
        .run(&mut conn)
        .await
        .context("applying the database migrations failed")?;
    sqlx::Connection::close(conn).await.ok();
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !before.contains(&m.version))
        .map(|m| AppliedMigration {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect())
}

/// The versions recorded as applied; empty when no migration has ever run.
pub async fn applied_versions(pool: &PgPool) -> anyhow::Result<BTreeSet<i64>> {
    let mut conn = pool
        .acquire()
        .await
        .context("could not read the migration table")?;
    applied_versions_on(&mut conn).await
}

async fn applied_versions_on(conn: &mut PgConnection) -> anyhow::Result<BTreeSet<i64>> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(&mut *conn)
        .await
        .context("could not read the migration table")?;
    if exists.is_none() {
        return Ok(BTreeSet::new());
    }
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut *conn)
            .await
            .context("could not read the migration table")?;
    Ok(versions.into_iter().collect())
}

/// True when every embedded migration has been applied (what `/readyz` needs).
pub async fn is_up_to_date(pool: &PgPool) -> anyhow::Result<bool> {
    let applied = applied_versions(pool).await?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .all(|m| applied.contains(&m.version)))
}

/// The database a command runs on, and the embedded cluster behind it when there is one (stopped when
/// this value is dropped, or by [`Database::close`]).
pub struct Database {
    pub pool: PgPool,
    pub embedded: Option<crate::embedded_pg::EmbeddedPostgres>,
}

impl Database {
    /// Opens `DATABASE_URL` when given, else starts the embedded cluster in the data folder. With
    /// `migrate`, applies the embedded migrations.
    pub async fn open(args: &crate::config::DatabaseArgs, migrate: bool) -> anyhow::Result<Self> {
        let (pool, embedded) = match &args.database_url {
            Some(url) => (connect(url, 20).await?, None),
            None => {
                let pg = crate::embedded_pg::EmbeddedPostgres::start(&args.data_dir)
                    .await
                    .context("could not start the embedded PostgreSQL")?;
                (connect(&pg.url(), 20).await?, Some(pg))
            }
        };
        if migrate {
            let applied = self::migrate(&pool).await?;
            for m in &applied {
                tracing::info!(version = m.version, description = %m.description, "migration applied");
            }
        }
        Ok(Self { pool, embedded })
    }

    /// Closes the pool, then stops the embedded cluster if there is one.
    pub async fn close(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if let Some(pg) = self.embedded {
            pg.stop()
                .await
                .context("could not stop the embedded PostgreSQL")?;
        }
        Ok(())
    }
}

/// A database URL with its password replaced, fit for logs and error messages.
pub fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db -> postgres://user:***@host/db
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<database url>".to_string();
    };
    let Some((userinfo, hostpart)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{hostpart}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stored_text_has_no_nul_and_is_cut_on_a_character_boundary() {
        use super::storable_text;
        assert_eq!(storable_text("abc", 3), ("abc".to_string(), false));
        assert_eq!(storable_text("abcd", 3), ("abc".to_string(), true));
        // "é" is two bytes: a cut in its middle steps back before it.
        assert_eq!(storable_text("aé", 2), ("a".to_string(), true));
        assert_eq!(storable_text("a\0b", 10), ("ab".to_string(), false));
    }

    #[test]
    fn like_patterns_match_their_text_literally() {
        assert_eq!(super::like_contains(" Ab "), "%ab%");
        assert_eq!(super::like_contains("50%_off\\"), "%50\\%\\_off\\\\%");
    }

    use super::redact_url;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("postgres://me:s3cret@127.0.0.1:5432/db"),
            "postgres://me:***@127.0.0.1:5432/db"
        );
        assert_eq!(
            redact_url("postgres://me@localhost/db"),
            "postgres://me@localhost/db"
        );
        assert_eq!(redact_url("not a url"), "<database url>");
    }
}
