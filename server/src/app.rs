//! The application: shared state, the router with its layers, and a running server with graceful
//! shutdown, started in-process by `serve`, by the tests and by the demo alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn;
use axum::response::IntoResponse;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsConfig;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::ServerConfig;
use crate::console::Console;
use crate::email::smtp::{MailError, SmtpMailer};
use crate::email::worker::{self, WorkerSettings};
use crate::groups::jetstream::JetStreamBuffer;
use crate::groups::store::FrameStore;
use crate::http::{ApiError, error, request_id};
pub use crate::state::AppState;
use crate::{agents, auth, commands, email, groups, rate_limit, routes, telemetry, web};

/// Forgets console streams nobody watches, twice a minute.
async fn sweep_console(console: Arc<Console>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tick.tick() => console.sweep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// The whole HTTP surface with its layers, outermost first: request id, error shape, panic guard,
/// metrics, body limit, then the routes (and a 404/405 in our shape for anything else). The dashboard's
/// pages (`web`) have the same layers but the error shape: they answer HTML, errors included.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit;
    let pages = web::router()
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn(telemetry::track))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("a handler panicked").into_response()
        }));
    routes::router()
        .fallback(error::fallback)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn(telemetry::track))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("a handler panicked").into_response()
        }))
        .layer(from_fn(error::normalize_errors))
        .merge(pages)
        .layer(from_fn(request_id::layer))
        .with_state(state)
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not load the TLS certificate or key (PEM expected): {0}")]
    Tls(std::io::Error),
    #[error("could not set up outgoing mail: {0}")]
    Mail(#[from] MailError),
    #[error(transparent)]
    Nats(#[from] crate::groups::jetstream::ConnectError),
}

/// A server running in this process.
pub struct RunningServer {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// `http://addr` or `https://addr`.
    pub base_url: String,
    pub state: AppState,
    shutdown: CancellationToken,
    handle: axum_server::Handle<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

/// How long open requests may take to finish after shutdown begins.
const GRACE: Duration = Duration::from_secs(10);

impl RunningServer {
    /// A token that, when cancelled, starts the same shutdown as [`RunningServer::shutdown`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting connections, lets open requests finish (up to 10 s), stops the background
    /// tasks, and waits for all of them.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Stops everything at once with no cleanup, as a crash would: the instance's rows stay in the
    /// database until the other instances find its beat stale. For tests of what survivors do.
    pub fn abort(self) {
        for task in &self.tasks {
            task.abort();
        }
        self.handle.shutdown();
        self.server.abort();
    }

    /// Waits until the shutdown token is cancelled (by anyone), then shuts down.
    pub async fn wait(self) -> std::io::Result<()> {
        self.shutdown.cancelled().await;
        self.handle.graceful_shutdown(Some(GRACE));
        for task in self.tasks {
            let _ = task.await;
        }
        match self.server.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Starts the server on `config.bind` (port 0 picks a free port) with its background tasks: the mail
/// worker when SMTP is configured, housekeeping, and the command dispatcher. The database must already
/// be migrated.
pub async fn spawn(config: ServerConfig, pool: PgPool) -> Result<RunningServer, StartError> {
    telemetry::install_crypto_provider();
    let bind = config.bind;
    let listener = std::net::TcpListener::bind(bind)
        .map_err(|source| StartError::Bind { addr: bind, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind { addr: bind, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr: bind, source })?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let base_url = format!("{scheme}://{addr}");
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| base_url.clone());
    let tls = match &config.tls {
        Some(files) => Some(
            RustlsConfig::from_pem_file(&files.cert, &files.key)
                .await
                .map_err(StartError::Tls)?,
        ),
        None => None,
    };

    if !config.trusted_proxies.is_empty() && config.public_url.is_none() {
        tracing::info!(
            "behind a trusted proxy, session cookies are Secure (the proxy is taken to speak HTTPS); \
             if it serves plain HTTP, set --public-url http://... or browsers will drop the cookie"
        );
    }
    let frames = match &config.nats {
        Some(nats) => {
            let buffer = JetStreamBuffer::connect(nats, &config.relay).await?;
            tracing::info!(
                stream = buffer.stream_name(),
                replicas = nats.replicas,
                "the relay buffers frames on NATS JetStream"
            );
            FrameStore::JetStream(Arc::new(buffer))
        }
        None => FrameStore::Postgres,
    };
    let state = AppState::with_frames(pool, config, public_url, frames);
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(smtp) = &state.config.smtp {
        // lettre's pooled transport spawns tasks, so it is built here, inside the runtime.
        let mailer = SmtpMailer::new(smtp)?;
        let settings = WorkerSettings {
            poll_interval: state.config.mail_poll_interval,
            max_attempts: state.config.mail_max_attempts,
            retry_base: state.config.mail_retry_base,
        };
        tasks.push(tokio::spawn(worker::run(
            state.pool.clone(),
            mailer,
            settings,
            state.mail_wake.clone(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(housekeeping(
        state.pool.clone(),
        (state.config.verification_ttl, state.config.reset_ttl),
        shutdown.clone(),
    )));
    // Commands: the dispatcher and sweeper (SPEC 3.7), driven by the database.
    tasks.push(tokio::spawn(commands::dispatch::run(
        state.command_services(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(sweep_console(
        state.console.clone(),
        shutdown.clone(),
    )));
    // Agents whose group sides moved to or from them get their new lists.
    tasks.push(tokio::spawn({
        let relay = state.relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.send_moved_lists(shutdown).await }
    }));
    // The agents serving dongles whose console is open are asked for their traffic.
    tasks.push(tokio::spawn(crate::monitor::watch(
        state.pool.clone(),
        state.hub.clone(),
        state.console.clone(),
        shutdown.clone(),
    )));
    // How busy the watched dongles' buses are, on their consoles.
    tasks.push(tokio::spawn(crate::monitor::bus_load(
        state.pool.clone(),
        state.console.clone(),
        shutdown.clone(),
    )));
    // The relay's frames and group states on the console.
    tasks.push(tokio::spawn(groups::console::feed(
        state.relay.clone(),
        state.console.clone(),
        shutdown.clone(),
    )));
    // Frames another instance buffers for a side served here are read at once, not at the next poll.
    tasks.push(tokio::spawn(groups::wake::run(
        state.pool.clone(),
        state.relay.clone(),
        shutdown.clone(),
    )));
    // The relay writes what it holds to the buffer and closes the data connections at shutdown.
    tasks.push(tokio::spawn({
        let relay = state.relay.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            relay.shutdown().await;
        }
    }));
    // The instance joins the cluster (its first beat) before it accepts any agent.
    tasks.push(agents::cluster_tasks::start(state.hub.clone(), shutdown.clone()).await);
    // Console events travel to the other instances whose clients watch their streams (by NOTIFY, so
    // only where the instances may LISTEN).
    if let Some(cluster) = state.hub.cluster()
        && cluster.settings.listen
    {
        let settings = crate::console::peers::PeerSettings {
            pool: state.pool.clone(),
            keys: state.keys.clone(),
            instance_id: cluster.instance_id,
            stale_after: cluster.settings.stale_after,
        };
        tasks.push(tokio::spawn(crate::console::peers::run(
            settings,
            state.console.clone(),
            shutdown.clone(),
        )));
    }

    // Every accepted connection turns Nagle's algorithm off. Control and data messages are small and
    // each must go out at once: with Nagle on, a message written while the previous small one is not
    // yet acknowledged waits for that acknowledgement, which the agent's kernel delays by up to 40 ms
    // (a command's request to its agent took 40 ms that way).
    let make_service = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    // hyper enforces its header read timeout only when it has a timer; without one a client could hold
    // a connection open for ever by sending its headers a byte at a time.
    let header_read_timeout = state.config.header_read_timeout;
    let server = match tls {
        Some(tls) => {
            let mut server = axum_server::from_tcp_rustls(listener, tls)
                .map_err(|source| StartError::Bind { addr, source })?
                .map(|tls| tls.acceptor(NoDelayAcceptor))
                .handle(handle.clone());
            server
                .http_builder()
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            tokio::spawn(server.serve(make_service))
        }
        None => {
            // Over TLS the handshake has a timeout of its own; in plain HTTP nothing would time out a
            // connection that never sends its first byte, so `http::first_byte` does.
            let mut server = axum_server::from_tcp(listener)
                .map_err(|source| StartError::Bind { addr, source })?
                .acceptor(crate::http::first_byte::FirstByteAcceptor(
                    header_read_timeout,
                    NoDelayAcceptor,
                ))
                .handle(handle.clone());
            server
                .http_builder()
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            tokio::spawn(server.serve(make_service))
        }
    };
    tracing::info!(%addr, tls = scheme == "https", "listening");
    Ok(RunningServer {
        addr,
        base_url,
        state,
        shutdown,
        handle,
        tasks,
        server,
    })
}

/// Runs the server until `signal` resolves (Ctrl-C or SIGTERM in `serve`), then shuts down gracefully.
pub async fn serve(
    config: ServerConfig,
    pool: PgPool,
    signal: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let server = spawn(config, pool).await?;
    signal.await;
    tracing::info!("shutting down");
    if let Err(e) = server.shutdown().await {
        tracing::warn!(error = %e, "the server stopped with an error");
    }
    Ok(())
}

/// Deletes expired sessions and stale rate-limit counters, and gives up unsent mail whose link expired,
/// every few minutes. Several instances may do this at once; each step is idempotent.
async fn housekeeping(
    pool: PgPool,
    (verification_ttl, reset_ttl): (Duration, Duration),
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(300));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = auth::session::purge_expired(&pool).await {
            tracing::warn!(error = %e, "could not purge expired sessions");
        }
        if let Err(e) = rate_limit::purge_stale(&pool).await {
            tracing::warn!(error = %e, "could not purge rate-limit counters");
        }
        match agents::forget_stale_dongles(&pool, agents::STALE_DONGLE_RETENTION).await {
            Ok(agents::Forgotten {
                dongles: 0,
                sightings: 0,
            }) => {}
            Ok(f) => tracing::info!(
                dongles = f.dongles,
                sightings = f.sightings,
                "forgot dongles nobody owns and sightings nobody has seen for the retention period"
            ),
            Err(e) => tracing::warn!(error = %e, "could not forget stale dongles"),
        }
        match email::outbox::give_up_expired(&pool, verification_ttl, reset_ttl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(mails = n, "gave up unsent mail whose link expired"),
            Err(e) => tracing::warn!(error = %e, "could not scrub expired mail"),
        }
    }
}
