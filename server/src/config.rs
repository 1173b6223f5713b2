//! Configuration: the command-line flags (clap, each also read from the environment) and the plain
//! [`ServerConfig`] the library runs on, which tests build directly.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::password::PasswordCost;
use crate::dongle_tokens::KeyRing;
use crate::rate_limit::{Limit, RateLimits};

/// Where the database is: `DATABASE_URL`, or a private PostgreSQL cluster in the data folder.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The PostgreSQL database to use. Without it the server runs its own cluster in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// The folder of the embedded PostgreSQL cluster (used only without DATABASE_URL).
    #[arg(long, env = "BRIDGE_DATA_DIR", default_value = "./bridge-data")]
    pub data_dir: PathBuf,
}

/// `bridge-server serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Do not apply the embedded migrations on start (the database must already be up to date).
    #[arg(long)]
    pub no_migrate: bool,

    /// The address to listen on.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// The URL users reach this server at, for links in mail (default: derived from --bind). An https
    /// URL makes the session cookies Secure, as when the server speaks TLS itself.
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,

    /// TLS certificate chain (PEM). With --tls-key, the server speaks HTTPS and cookies are Secure.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A reverse proxy whose X-Forwarded-For is believed (repeat for several). Such a proxy is taken to
    /// terminate TLS: cookies are Secure unless --public-url is an http:// URL.
    #[arg(long = "trusted-proxy", env = "TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpAddr>,

    /// SMTP server for outgoing mail, e.g. smtp://host:25 or smtps://user:pass@host:465. Without it,
    /// mail stays queued and `bridge-server outbox` shows it.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,

    /// The sender address of outgoing mail.
    #[arg(
        long,
        env = "SMTP_FROM",
        default_value = "CAN Bridge <no-reply@localhost>"
    )]
    pub smtp_from: String,

    /// Minutes of inactivity after which a session ends.
    #[arg(long, env = "SESSION_IDLE_MINUTES", default_value_t = 30)]
    pub session_idle_minutes: u64,

    /// Hours after login at which a session ends however active it is.
    #[arg(long, env = "SESSION_ABSOLUTE_HOURS", default_value_t = 12)]
    pub session_absolute_hours: u64,

    /// Days an agent token lives without use: every day the agent is in use renews it, and one unused
    /// for this long must log in again. 0 keeps tokens until they are revoked.
    #[arg(long, env = "AGENT_TOKEN_TTL_DAYS", default_value_t = 90)]
    pub agent_token_ttl_days: u64,

    /// Development mode: dangerous dongle commands (factory-reset) may be run. Never in production.
    #[arg(long, env = "BRIDGE_DEV", value_parser = clap::builder::FalseyValueParser::new())]
    pub dev: bool,

    /// Frames the relay buffers per group direction while a side is offline; older ones are trimmed.
    #[arg(long, env = "RELAY_BUFFER_MAX_FRAMES", default_value_t = 200_000)]
    pub relay_buffer_max_frames: u64,

    /// Seconds a buffered frame is kept for an offline side.
    #[arg(long, env = "RELAY_BUFFER_MAX_AGE_SECS", default_value_t = 600)]
    pub relay_buffer_max_age_secs: u64,

    /// Frames per second at which a backlog is replayed to a side that comes back; never faster than
    /// that side's CAN bus carries at its configured bit rate.
    #[arg(long, env = "RELAY_REPLAY_RATE", default_value_t = 5_000)]
    pub relay_replay_rate: u32,

    /// Keep the relay's buffered frames in NATS JetStream instead of PostgreSQL: for several instances
    /// whose relay outgrows one database's write rate. `nats://host:4222` (several servers of a cluster
    /// comma-separated). JetStream must be enabled on the server (`nats-server -js`). See
    /// docs/QUICKSTART.md, "Several instances".
    #[arg(
        long,
        env = "BRIDGE_NATS_URL",
        hide_env_values = true,
        help_heading = "NATS JetStream"
    )]
    pub nats_url: Option<String>,

    /// A NATS credentials file (`.creds`: a user JWT and its NKey seed).
    #[arg(
        long,
        env = "BRIDGE_NATS_CREDS",
        requires = "nats_url",
        help_heading = "NATS JetStream"
    )]
    pub nats_creds: Option<PathBuf>,

    /// A CA certificate (PEM) to verify the NATS servers' TLS certificates with; turns TLS on.
    #[arg(
        long,
        env = "BRIDGE_NATS_TLS_CA",
        requires = "nats_url",
        help_heading = "NATS JetStream"
    )]
    pub nats_tls_ca: Option<PathBuf>,

    /// A client certificate (PEM) for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "BRIDGE_NATS_TLS_CERT", requires_all = ["nats_url", "nats_tls_key"], help_heading = "NATS JetStream")]
    pub nats_tls_cert: Option<PathBuf>,

    /// The key (PEM) of --nats-tls-cert.
    #[arg(long, env = "BRIDGE_NATS_TLS_KEY", requires_all = ["nats_url", "nats_tls_cert"], help_heading = "NATS JetStream")]
    pub nats_tls_key: Option<PathBuf>,

    /// Copies the JetStream stream keeps: 1 on one NATS server, 3 on a three-node cluster.
    #[arg(long, env = "BRIDGE_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), help_heading = "NATS JetStream")]
    pub nats_replicas: u8,

    /// The JetStream stream's name (also its subjects' first token).
    #[arg(
        long,
        env = "BRIDGE_NATS_STREAM",
        default_value = "RELAY",
        help_heading = "NATS JetStream"
    )]
    pub nats_stream: String,
}

/// PEM files of the server's certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Outgoing mail.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// A lettre SMTP URL; it may hold a password, so it is never logged.
    pub url: String,
    pub from: String,
}

/// Everything the running server needs besides its database pool.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub public_url: Option<String>,
    pub tls: Option<TlsFiles>,
    pub trusted_proxies: Vec<IpAddr>,
    pub session_idle: Duration,
    pub session_absolute: Duration,
    pub verification_ttl: Duration,
    pub reset_ttl: Duration,
    pub rate_limits: RateLimits,
    pub smtp: Option<SmtpConfig>,
    /// How often the mail worker looks for due mail when nothing wakes it.
    pub mail_poll_interval: Duration,
    /// Delivery attempts before a message is marked failed.
    pub mail_max_attempts: i32,
    /// The first retry delay; each further one doubles, up to an hour.
    pub mail_retry_base: Duration,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long a client may take to send a request's line and headers; a slower one (a slowloris
    /// client trickling bytes to hold a connection open) is disconnected.
    pub header_read_timeout: Duration,
    /// Argon2id cost of new password hashes. Production always uses the OWASP default.
    pub password_cost: PasswordCost,
    /// The dongle-token master keys; new tokens are sealed with the ring's write version.
    pub dongle_keys: KeyRing,
    /// How long a new agent token lives; None: until revoked.
    pub agent_token_ttl: Option<Duration>,
    /// How long a pairing window stays open (SPEC 3.4: 120 s).
    pub pairing_window: Duration,
    /// How long the server waits for an agent to answer a control request.
    pub agent_request_timeout: Duration,
    /// How many control messages per second the server reads from one agent; past that it reads the
    /// next ones later (the agent's socket fills and it waits), so a runaway agent costs its own
    /// throughput and nobody else's.
    pub agent_messages_per_sec: u32,
    /// How the instances sharing the database find each other alive and hand each other agent
    /// messages (heartbeat, staleness window, mailbox poll).
    pub cluster: crate::agents::cluster::ClusterSettings,
    /// How long the server waits for a dongle's answer through its agent: a CAN configuration, a frame
    /// to send, the agent's acceptance of a command.
    pub dongle_request_timeout: Duration,
    /// Development mode: the REMP CLI's dangerous-command flag may be set (SPEC 3.7).
    pub dev_mode: bool,
    /// The most command output the server stores, in bytes; longer output is cut and flagged.
    pub command_output_cap: usize,
    /// How long past a command's own timeout the server waits for its result before marking it timeout.
    pub command_grace: Duration,
    /// How often the command dispatcher and sweeper look at the database when nothing wakes them.
    pub command_poll_interval: Duration,
    /// CAN frames per second a console stream shows before it samples (SPEC 3.9).
    pub console_frame_rate: u32,
    /// How often an open console stream checks that its caller may still watch it.
    pub stream_recheck: Duration,
    /// The relay of groups' frames: retention, replay rate, batching (SPEC 3.8 defaults).
    pub relay: crate::groups::settings::RelaySettings,
    /// NATS JetStream for the relay's buffer (`--nats-url`); None: PostgreSQL.
    pub nats: Option<crate::groups::jetstream::NatsSettings>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            tls: None,
            trusted_proxies: Vec::new(),
            session_idle: Duration::from_secs(30 * 60),
            session_absolute: Duration::from_secs(12 * 3600),
            verification_ttl: Duration::from_secs(24 * 3600),
            reset_ttl: Duration::from_secs(3600),
            rate_limits: RateLimits::default(),
            smtp: None,
            mail_poll_interval: Duration::from_secs(5),
            mail_max_attempts: 8,
            mail_retry_base: Duration::from_secs(30),
            body_limit: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            password_cost: PasswordCost::default(),
            dongle_keys: KeyRing::default(),
            agent_token_ttl: Some(Duration::from_secs(90 * 86_400)),
            pairing_window: Duration::from_secs(120),
            agent_request_timeout: Duration::from_secs(10),
            agent_messages_per_sec: 100,
            cluster: Default::default(),
            dongle_request_timeout: Duration::from_secs(5),
            dev_mode: false,
            command_output_cap: 64 * 1024,
            command_grace: Duration::from_secs(10),
            command_poll_interval: Duration::from_secs(1),
            console_frame_rate: 200,
            stream_recheck: Duration::from_secs(2),
            relay: Default::default(),
            nats: None,
        }
    }
}

impl ServerConfig {
    /// The configuration `serve` runs with.
    pub fn from_args(args: &ServeArgs) -> Self {
        Self {
            bind: args.bind,
            public_url: args.public_url.clone(),
            tls: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            trusted_proxies: args.trusted_proxies.clone(),
            session_idle: Duration::from_secs(args.session_idle_minutes.max(1) * 60),
            session_absolute: Duration::from_secs(args.session_absolute_hours.max(1) * 3600),
            agent_token_ttl: (args.agent_token_ttl_days > 0)
                .then(|| Duration::from_secs(args.agent_token_ttl_days * 86_400)),
            smtp: args.smtp_url.as_ref().map(|url| SmtpConfig {
                url: url.clone(),
                from: args.smtp_from.clone(),
            }),
            dev_mode: args.dev,
            relay: crate::groups::settings::RelaySettings {
                buffer_max_frames: args.relay_buffer_max_frames.max(1),
                buffer_max_age: Duration::from_secs(args.relay_buffer_max_age_secs.max(1)),
                replay_rate: args.relay_replay_rate.max(1),
                ..Default::default()
            },
            nats: args
                .nats_url
                .as_ref()
                .map(|url| crate::groups::jetstream::NatsSettings {
                    url: url.clone(),
                    credentials: args.nats_creds.clone(),
                    tls_ca: args.nats_tls_ca.clone(),
                    tls_client: args.nats_tls_cert.clone().zip(args.nats_tls_key.clone()),
                    replicas: usize::from(args.nats_replicas),
                    stream: args.nats_stream.clone(),
                }),
            ..Self::default()
        }
    }

    /// Cookies are Secure when browsers reach the server over TLS: it speaks TLS itself, its public URL
    /// is https, or it sits behind a trusted proxy (which terminates TLS) and no public URL says
    /// otherwise. Over plain http a Secure cookie would never come back, so an http public URL wins.
    pub fn secure_cookies(&self) -> bool {
        let public_scheme = self
            .public_url
            .as_deref()
            .and_then(|url| url.split_once("://"))
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        match public_scheme.as_deref() {
            Some("https") => true,
            Some(_) => self.tls.is_some(),
            None => self.tls.is_some() || !self.trusted_proxies.is_empty(),
        }
    }
}

/// The default limits of SPEC 3.2; reset-confirm has its own, separate counter (SPEC 3.11); frames sent by
/// hand are limited per dongle (SPEC 3.8b).
impl Default for RateLimits {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        Self {
            login_per_ip: Limit::new(10, minutes(10)),
            login_per_account: Limit::new(10, minutes(10)),
            signup_per_ip: Limit::new(5, minutes(60)),
            reset_request_per_ip: Limit::new(3, minutes(60)),
            reset_request_per_account: Limit::new(3, minutes(60)),
            reset_confirm_per_ip: Limit::new(10, minutes(60)),
            can_send_per_dongle: Limit::new(20, Duration::from_secs(10)),
            agent_requests_per_user: Limit::new(300, minutes(1)),
            new_dongle_ids_per_user: Limit::new(1_000, minutes(60)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn development_mode_is_off_unless_asked_for() {
        // The test process may not set BRIDGE_DEV; only the flag is looked at here.
        if std::env::var_os("BRIDGE_DEV").is_some() {
            return;
        }
        let off = Cli::try_parse_from(["bridge-server"]).unwrap();
        assert!(!ServerConfig::from_args(&off.serve).dev_mode);
        assert!(!ServerConfig::default().dev_mode);
        let on = Cli::try_parse_from(["bridge-server", "--dev"]).unwrap();
        assert!(ServerConfig::from_args(&on.serve).dev_mode);
    }

    #[test]
    fn cookies_are_secure_behind_a_tls_terminating_proxy_or_an_https_public_url() {
        let with = |public_url: Option<&str>, proxy: bool| ServerConfig {
            public_url: public_url.map(str::to_string),
            trusted_proxies: if proxy {
                vec!["10.0.0.1".parse().unwrap()]
            } else {
                Vec::new()
            },
            ..ServerConfig::default()
        };
        assert!(!with(None, false).secure_cookies(), "plain http, no proxy");
        assert!(with(Some("https://bridge.example.com"), false).secure_cookies());
        assert!(with(Some("HTTPS://bridge.example.com"), true).secure_cookies());
        assert!(
            with(None, true).secure_cookies(),
            "a trusted proxy terminates TLS"
        );
        assert!(
            !with(Some("http://10.1.2.3:8080"), true).secure_cookies(),
            "an http public URL says the proxy does not"
        );
    }
}
