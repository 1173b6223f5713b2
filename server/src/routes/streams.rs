//! `/api/v1/streams/...`: the live console as server-sent events (SPEC 3.9). The events and the ring are
//! `console`'s; this module authorizes, resumes from `Last-Event-ID`, and writes the SSE wire format.

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

use crate::app::AppState;
use crate::auth::Caller;
use crate::console::{ConsoleEvent, Stored, StreamKey};
use crate::dongles;
use crate::http::error::ErrorBody;
use crate::http::{ApiError, ErrorCode, PathId};

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
    dongles::find(&state.pool, caller.user_id(), id)
        .await?
        .ok_or_else(|| ApiError::of(ErrorCode::DongleNotFound))?;
    Ok(sse(&state, StreamKey::Dongle(id), &headers))
}

/// A group's live console: the frames of both sides, group state and backlog, presence.
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
    let owned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM dongle_groups WHERE id = $1 AND user_id = $2)",
    )
    .bind(id)
    .bind(caller.user_id())
    .fetch_one(&state.pool)
    .await?;
    if !owned {
        return Err(ApiError::new(ErrorCode::NotFound, "No such group."));
    }
    Ok(sse(&state, StreamKey::Group(id), &headers))
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

fn sse(
    state: &AppState,
    key: StreamKey,
    headers: &HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let subscription = state.console.subscribe(key, last);
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
    let live = stream::unfold((subscription.live, newest), |(mut rx, newest)| async move {
        loop {
            match rx.recv().await {
                // Events already sent from the ring are skipped.
                Ok(stored) if stored.id <= newest => continue,
                Ok(stored) => return Some((to_event(&stored), (rx, stored.id))),
                Err(RecvError::Lagged(_)) => {
                    let notice =
                        reset("this client fell behind; resume with Last-Event-ID to catch up");
                    return Some((notice, (rx, newest)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let events = stream::iter(head.into_iter().chain(missed))
        .chain(live)
        .map(Ok::<_, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(HEARTBEAT))
}
