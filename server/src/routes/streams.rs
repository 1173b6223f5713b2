//! `/api/v1/streams/...`: the live console as server-sent events (SPEC 3.9). The events and the ring are
//! `console`'s; this module authorizes, resumes from `Last-Event-ID`, and writes the SSE wire format.
//!
//! Access is checked when a stream opens and again every `stream_recheck` (2 s) while it is open: the
//! session or agent token must still be valid and its user active, and the dongle (or both dongles of
//! the group) still the caller's. A stream whose caller lost access sends one `access_ended` event
//! saying why, and ends. Only a dongle's owner (or a super_admin) opens its console, so an unclaimed
//! dongle's stream has no watcher left when somebody pairs it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use futures::stream::{self, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::agents;
use crate::auth::Caller;
use crate::auth::session::{self, Lookup, SessionSecret};
use crate::console::{ConsoleEvent, Stored, StreamKey};
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ErrorCode, PathId};
use crate::state::AppState;
use crate::users::{Role, Status};

/// How often an idle stream sends a comment, so proxies keep it open.
const HEARTBEAT: Duration = Duration::from_secs(15);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(dongle_console))
        .routes(routes!(group_console))
}

/// A dongle's live console: presence, CAN frames (sampled above a rate), command status, logs.
///
/// Each event has an `id` that strictly increases; reconnect with `Last-Event-ID` to get what was
/// missed from the last 10 000 events or 60 s, or a `stream_reset` event when that is too old.
///
/// The dongle's frames appear whether or not it is in a group: while this stream is open, the agent
/// serving the dongle uploads them (sampled at the agent above 200 frames/s, with `sampled` saying 1 in
/// N). The events' `data` (v0.7 section 18.4, plus this server's own fields):
/// `can_frame` {`dongle_id`, `ts` (RFC 3339), `dongle_ts_us` (the dongle's clock, when its link gives
/// one), `direction` (`rx`/`tx`), `bus`, `id` (`"0x7E8"`), `can_id`, `is_extended`, `fd`, `dlc`,
/// `data_hex`, `sampled`}; `presence` {`dongle_id`, `online`, `agent_id`, `seen_at`};
/// `command_status` {`dongle_id`, `command_id`, `status`, `exit_code`}; `cli_telemetry` {`dongle_id`,
/// `source` (`uart`/`remote`), `command`, `output`, `exit_code`, `truncated`, `error`, `at`};
/// `bus_load` every 2 s {`dongle_id`, `frames_per_sec`, `load_percent` and `bitrate` once a CAN
/// configuration is applied}; `log` {`level`, `message`};
/// `stream_reset` and `access_ended` {`reason`}.
#[utoipa::path(get, path = "/streams/dongles/{id}/console", tag = "console",
    security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The dongle's id"),
           ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received")),
    responses(
        (status = 200, description = "An event stream (text/event-stream).", content_type = "text/event-stream", body = String),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "DONGLE_NOT_FOUND", body = ErrorBody),
    ))]
async fn dongle_console(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let access = Access::of(&state, &caller, StreamKey::Dongle(id));
    if !access.may_watch().await? {
        return Err(ApiError::of(ErrorCode::DongleNotFound));
    }
    Ok(sse(&state, access, &headers))
}

/// A group's live console: the frames of both sides, group state and backlog, presence.
///
/// `group_state` carries `detail` {`mode`, `offline_side` (`a`, `b`, `both` or null), `buffered_a_to_b`,
/// `buffered_b_to_a`, and this server's `state`, `buffer_pressure`, `backlog`}; the other events are
/// those of a dongle's console.
#[utoipa::path(get, path = "/streams/groups/{id}/console", tag = "console",
    security(("session" = []), ("agent_token" = [])),
    params(("id" = Uuid, Path, description = "The group's id"),
           ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received")),
    responses(
        (status = 200, description = "An event stream (text/event-stream).", content_type = "text/event-stream", body = String),
        (status = 401, description = "AUTH_REQUIRED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such group of the caller's", body = ErrorBody),
    ))]
async fn group_console(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let access = Access::of(&state, &caller, StreamKey::Group(id));
    if !access.may_watch().await? {
        return Err(ApiError::new(ErrorCode::NotFound, "No such group."));
    }
    Ok(sse(&state, access, &headers))
}

/// Who watches a stream, and what: enough to ask again, while the stream is open, whether they still
/// may.
#[derive(Clone)]
struct Access {
    state: AppState,
    who: Watcher,
    key: StreamKey,
}

#[derive(Clone)]
enum Watcher {
    Session(SessionSecret),
    Agent { agent_id: Uuid, user_id: Uuid },
}

impl Access {
    fn of(state: &AppState, caller: &Caller, key: StreamKey) -> Self {
        let who = match caller {
            Caller::User(user) => Watcher::Session(user.session_secret.clone()),
            Caller::Agent { agent_id, user_id } => Watcher::Agent {
                agent_id: *agent_id,
                user_id: *user_id,
            },
        };
        Self {
            state: state.clone(),
            who,
            key,
        }
    }

    /// Why the caller may no longer watch, or None while it may. A database that cannot answer now
    /// ends nothing: the next check asks again.
    async fn lost(&self) -> Option<&'static str> {
        match self.check().await {
            Ok(None) => None,
            Ok(Some(reason)) => Some(reason),
            Err(e) => {
                tracing::warn!(error = %e, "could not check a console stream's access");
                None
            }
        }
    }

    async fn may_watch(&self) -> Result<bool, sqlx::Error> {
        Ok(self.check().await?.is_none())
    }

    async fn check(&self) -> Result<Option<&'static str>, sqlx::Error> {
        let pool = &self.state.pool;
        let (user_id, admin) = match &self.who {
            Watcher::Session(secret) => {
                match session::lookup(pool, secret, self.state.config.session_idle).await? {
                    Lookup::Valid(user) if user.status == Status::Active => {
                        (user.user_id, user.role == Role::SuperAdmin)
                    }
                    Lookup::Valid(_) => return Ok(Some("the account is disabled")),
                    Lookup::Expired => return Ok(Some("the session has expired")),
                    Lookup::Unknown => return Ok(Some("the session has ended")),
                }
            }
            Watcher::Agent { agent_id, user_id } => {
                if !agents::still_authorised(pool, *agent_id).await? {
                    return Ok(Some("the agent token is revoked or expired"));
                }
                (*user_id, false)
            }
        };
        let allowed: bool = match self.key {
            StreamKey::Dongle(id) => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM dongles WHERE id = $1 AND (owner_user_id = $2 OR $3))",
                )
                .bind(id)
                .bind(user_id)
                .bind(admin)
                .fetch_one(pool)
                .await?
            }
            StreamKey::Group(id) => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM dongle_groups g \
                       JOIN dongles a ON a.id = g.dongle_a_id JOIN dongles b ON b.id = g.dongle_b_id \
                       WHERE g.id = $1 AND g.user_id = $2 \
                         AND a.owner_user_id = $2 AND b.owner_user_id = $2)",
                )
                .bind(id)
                .bind(user_id)
                .fetch_one(pool)
                .await?
            }
        };
        Ok((!allowed).then_some(match self.key {
            StreamKey::Dongle(_) => "the dongle is no longer the caller's",
            StreamKey::Group(_) => "the group is gone or no longer the caller's",
        }))
    }
}

fn to_event(stored: &Stored) -> Event {
    let data = serde_json::to_string(&stored.event).expect("console events serialize");
    Event::default()
        .id(stored.id.to_string())
        .event(stored.event.name())
        .data(data)
}

/// A `stream_reset` for this client only; it carries no id, so the client's Last-Event-ID stays the
/// last real event it saw until the live events give it a newer one.
fn reset(reason: &str) -> Event {
    let event = ConsoleEvent::StreamReset {
        reason: reason.to_string(),
    };
    Event::default()
        .event(event.name())
        .data(serde_json::to_string(&event).expect("console events serialize"))
}

/// The last event of a stream whose caller lost access.
fn access_ended(reason: &str) -> Event {
    let event = ConsoleEvent::AccessEnded {
        reason: reason.to_string(),
    };
    Event::default()
        .event(event.name())
        .data(serde_json::to_string(&event).expect("console events serialize"))
}

/// Where a live stream is: reading events, or done after its last one.
struct Live {
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<Stored>>,
    newest: u64,
    recheck: tokio::time::Interval,
    access: Access,
    ended: bool,
}

fn sse(
    state: &AppState,
    access: Access,
    headers: &HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let subscription = state.console.subscribe(access.key, last);
    let head = subscription
        .reset
        .then(|| reset("the events after Last-Event-ID are no longer kept; what follows is live"));
    let newest = subscription
        .missed
        .last()
        .map(|e| e.id)
        .or(last)
        .unwrap_or(0);
    let missed: Vec<Event> = subscription.missed.iter().map(|e| to_event(e)).collect();
    let every = state.config.stream_recheck;
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live = Live {
        rx: subscription.live,
        newest,
        recheck,
        access,
        ended: false,
    };
    let live = stream::unfold(live, |mut live| async move {
        if live.ended {
            return None;
        }
        loop {
            tokio::select! {
                received = live.rx.recv() => match received {
                    // Events already sent from the ring are skipped.
                    Ok(stored) if stored.id <= live.newest => continue,
                    Ok(stored) => {
                        live.newest = stored.id;
                        return Some((to_event(&stored), live));
                    }
                    Err(RecvError::Lagged(_)) => {
                        let notice =
                            reset("this client fell behind; resume with Last-Event-ID to catch up");
                        return Some((notice, live));
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = live.recheck.tick() => {
                    if let Some(reason) = live.access.lost().await {
                        live.ended = true;
                        return Some((access_ended(reason), live));
                    }
                }
            }
        }
    });
    let events = stream::iter(head.into_iter().chain(missed))
        .chain(live)
        .map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(HEARTBEAT))
}
