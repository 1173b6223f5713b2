//! The authorization matrix: every operation of the OpenAPI document, called by every kind of caller,
//! answers what a table says it must. The table is keyed by the document's own (method, path) pairs, so
//! a new route without a row (or a row for a route that is gone) fails the test before anything is
//! called.
//!
//! The callers are: nobody; user A, who owns every resource named in the paths; user B; a user whose
//! email address is not confirmed yet (as user B, but refused 403 EMAIL_NOT_VERIFIED where hardware is
//! acted on: registering an agent, pairing); a super_admin;
//! A's agent and B's agent (bearer tokens); a revoked agent token; the old session of a user who was
//! disabled; an expired session; and A's own session without its CSRF token. The rules (SPEC 3.1-3.3,
//! 3.10): missing or invalid authentication answers 401, someone else's resource answers 404 exactly as
//! a resource that does not exist, admin routes are a 404 to everyone but a super_admin, people-only
//! routes are a 401 to agents and agent-only routes a 401 to people, and a cookie-authenticated unsafe
//! request without the CSRF token is a 403.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::agent::{self, TestAgent};
use common::{PASSWORD, TestApp, spawn_app_with};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use bridge_server::db::MIGRATOR;
use bridge_server::rate_limit::Limit;
use bridge_server::users::Role;

/// The kinds of caller, in the order each row calls them. The callers whose call may succeed come last
/// (the super_admin, then A's agent, then A), so that a destructive success cannot hide what the others
/// would have got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    RevokedAgent,
    DisabledSession,
    ExpiredSession,
    UserB,
    /// A signed-in user whose email address is not confirmed.
    Unverified,
    AgentB,
    SuperAdmin,
    /// A's session, without the X-CSRF-Token header.
    UserANoCsrf,
    AgentA,
    UserA,
}

const CALLERS: [Who; 11] = [
    Who::Anonymous,
    Who::RevokedAgent,
    Who::DisabledSession,
    Who::ExpiredSession,
    Who::UserB,
    Who::Unverified,
    Who::AgentB,
    Who::SuperAdmin,
    Who::UserANoCsrf,
    Who::AgentA,
    Who::UserA,
];

/// What a caller who is not A gets for A's resource.
#[derive(Debug, Clone, Copy)]
enum Other {
    /// 404, exactly as for an id that does not exist.
    NotFound,
    /// The route names no resource: the caller gets this status for their own (empty) data.
    Own(u16),
}

/// Who may call a route.
#[derive(Debug, Clone, Copy)]
enum Access {
    /// Anyone, with or without credentials, gets this status.
    Public(u16),
    /// People only (session cookie): A gets `owner`.
    Session { owner: u16, other: Other },
    /// People and their agents: A and A's agent get `owner`.
    SessionOrAgent { owner: u16, other: Other },
    /// Agents only (bearer token): any valid agent token gets this status.
    Agent(u16),
    /// A super_admin only; everyone else who is logged in is told the route does not exist.
    Admin(u16),
    /// Logout: answers 204 to anyone, and ends the caller's session when there is one; only a live
    /// session without its CSRF token is refused.
    Logout,
}

/// One row of the table.
struct Row {
    method: Method,
    /// The path as the OpenAPI document spells it.
    doc_path: &'static str,
    /// The concrete path, with `{name}` placeholders for the fixture's ids (see [`Fixture::fill`]).
    path: &'static str,
    /// Another path for A's agent, where A's own call would otherwise find the resource gone.
    agent_path: Option<&'static str>,
    body: Option<Value>,
    access: Access,
    /// Answers that differ from the access rule, with the reason in a comment where they are made.
    overrides: Vec<(Who, u16, &'static str)>,
}

fn row(method: Method, doc_path: &'static str, path: &'static str, access: Access) -> Row {
    Row {
        method,
        doc_path,
        path,
        agent_path: None,
        body: None,
        access,
        overrides: Vec::new(),
    }
}

impl Row {
    fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    fn agent_path(mut self, path: &'static str) -> Self {
        self.agent_path = Some(path);
        self
    }

    fn except(mut self, who: Who, status: u16, code: &'static str) -> Self {
        self.overrides.push((who, status, code));
        self
    }

    /// The status and error code (empty for a success) that `who` must get.
    fn expected(&self, who: Who) -> (u16, &'static str) {
        if let Some((_, status, code)) = self.overrides.iter().find(|(w, ..)| *w == who) {
            return (*status, code);
        }
        let unsafe_method = !matches!(self.method, Method::GET | Method::HEAD);
        let unauthenticated = (401, "AUTH_REQUIRED");
        let not_found = (404, "NOT_FOUND");
        let ok = |status: u16| (status, "");
        let other = |other: Other| match other {
            Other::NotFound => not_found,
            Other::Own(status) => ok(status),
        };
        match self.access {
            Access::Public(status) => ok(status),
            Access::Logout => match who {
                Who::UserANoCsrf => (403, "CSRF_INVALID"),
                _ => ok(204),
            },
            access => match who {
                Who::Anonymous | Who::RevokedAgent | Who::DisabledSession => unauthenticated,
                Who::ExpiredSession => (401, "AUTH_SESSION_EXPIRED"),
                // The session is checked for its CSRF token before anything else is decided about it.
                Who::UserANoCsrf if unsafe_method => (403, "CSRF_INVALID"),
                Who::UserANoCsrf => self.expected(Who::UserA),
                // Until confirmed, an account is any other user (rows that act on hardware say 403).
                Who::Unverified => self.expected(Who::UserB),
                Who::UserB | Who::SuperAdmin => match access {
                    Access::Session { other: o, .. } | Access::SessionOrAgent { other: o, .. } => {
                        other(o)
                    }
                    Access::Agent(_) => unauthenticated,
                    Access::Admin(status) if who == Who::SuperAdmin => ok(status),
                    Access::Admin(_) => not_found,
                    Access::Public(_) | Access::Logout => unreachable!(),
                },
                Who::UserA => match access {
                    Access::Session { owner, .. } | Access::SessionOrAgent { owner, .. } => {
                        ok(owner)
                    }
                    Access::Agent(_) => unauthenticated,
                    Access::Admin(_) => not_found,
                    Access::Public(_) | Access::Logout => unreachable!(),
                },
                Who::AgentA | Who::AgentB => match access {
                    Access::SessionOrAgent { owner, .. } if who == Who::AgentA => ok(owner),
                    Access::SessionOrAgent { other: o, .. } => other(o),
                    Access::Agent(status) => ok(status),
                    Access::Session { .. } | Access::Admin(_) => unauthenticated,
                    Access::Public(_) | Access::Logout => unreachable!(),
                },
            },
        }
    }
}

/// The table, in the order the rows are called. Rows whose success changes what later rows find
/// (unpairing, deleting, revoking, disabling, taking over the agent's control connection, logging
/// out) come after the rows that need it, and use resources of their own where they can.
fn table() -> Vec<Row> {
    use Access::*;
    use Other::*;
    let get = Method::GET;
    let post = Method::POST;
    let put = Method::PUT;
    let delete = Method::DELETE;
    vec![
        row(get.clone(), "/healthz", "/healthz", Public(200)),
        row(get.clone(), "/readyz", "/readyz", Public(200)),
        row(get.clone(), "/metrics", "/metrics", Public(200)),
        // Signup answers the same for a new and a known address, so every caller gets 202.
        row(
            post.clone(),
            "/api/v1/auth/signup",
            "/api/v1/auth/signup",
            Public(202),
        )
        .body(json!({"email": "newcomer@example.com", "password": PASSWORD})),
        // A wrong password: a success would start a new session and end the one the caller presented.
        row(
            post.clone(),
            "/api/v1/auth/login",
            "/api/v1/auth/login",
            Public(401),
        )
        .body(json!({"email": "victim@example.com", "password": "not the password"})),
        row(
            post.clone(),
            "/api/v1/auth/verify-email",
            "/api/v1/auth/verify-email",
            Public(400),
        )
        .body(json!({"token": "0".repeat(64)})),
        row(
            post.clone(),
            "/api/v1/auth/password-reset/request",
            "/api/v1/auth/password-reset/request",
            Public(202),
        )
        .body(json!({"email": "nobody@example.com"})),
        row(
            post.clone(),
            "/api/v1/auth/password-reset/confirm",
            "/api/v1/auth/password-reset/confirm",
            Public(400),
        )
        .body(json!({"token": "0".repeat(64), "password": PASSWORD})),
        row(
            get.clone(),
            "/api/v1/auth/me",
            "/api/v1/auth/me",
            Session {
                owner: 200,
                other: Own(200),
            },
        ),
        row(
            get.clone(),
            "/api/v1/auth/csrf",
            "/api/v1/auth/csrf",
            Session {
                owner: 200,
                other: Own(200),
            },
        ),
        row(
            get.clone(),
            "/api/v1/auth/sessions",
            "/api/v1/auth/sessions",
            Session {
                owner: 200,
                other: Own(200),
            },
        ),
        // A ends a spare session of theirs, not the one the matrix calls with.
        row(
            delete.clone(),
            "/api/v1/auth/sessions/{id}",
            "/api/v1/auth/sessions/{spare_session}",
            Session {
                owner: 204,
                other: NotFound,
            },
        ),
        row(
            get.clone(),
            "/api/v1/agents",
            "/api/v1/agents",
            Session {
                owner: 200,
                other: Own(200),
            },
        ),
        row(
            post.clone(),
            "/api/v1/agents/register",
            "/api/v1/agents/register",
            Session {
                owner: 201,
                other: Own(201),
            },
        )
        .body(json!({"agent_name": "matrix"}))
        .except(Who::Unverified, 403, "EMAIL_NOT_VERIFIED"),
        // A revokes a spare agent, not the one the matrix calls with.
        row(
            delete.clone(),
            "/api/v1/agents/{id}/tokens",
            "/api/v1/agents/{spare_agent}/tokens",
            Session {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            post.clone(),
            "/api/v1/agents/heartbeat",
            "/api/v1/agents/heartbeat",
            Agent(200),
        )
        .body(json!({})),
        row(
            get.clone(),
            "/api/v1/dongles",
            "/api/v1/dongles",
            SessionOrAgent {
                owner: 200,
                other: Own(200),
            },
        ),
        row(
            get.clone(),
            "/api/v1/dongles/{id}",
            "/api/v1/dongles/{dongle}",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            get.clone(),
            "/api/v1/dongles/{id}/can-config",
            "/api/v1/dongles/{dongle}/can-config",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            put.clone(),
            "/api/v1/dongles/{id}/can-config",
            "/api/v1/dongles/{dongle}/can-config",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({"bitrate": 250000, "sample_point_permille": 800, "mode": "listen_only"})),
        row(
            post.clone(),
            "/api/v1/dongles/{id}/can/send",
            "/api/v1/dongles/{dongle}/can/send",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({"can_id": 0x7DF, "is_extended": false, "data_hex": "02010D0000000000"})),
        row(
            post.clone(),
            "/api/v1/dongles/{id}/commands",
            "/api/v1/dongles/{dongle}/commands",
            SessionOrAgent {
                owner: 202,
                other: NotFound,
            },
        )
        .body(json!({"command": "version"})),
        row(
            get.clone(),
            "/api/v1/dongles/{id}/commands",
            "/api/v1/dongles/{dongle}/commands",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            get.clone(),
            "/api/v1/dongles/{id}/commands/{command_id}",
            "/api/v1/dongles/{dongle}/commands/{command}",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            post.clone(),
            "/api/v1/dongles/{id}/host-commands",
            "/api/v1/dongles/{dongle}/host-commands",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({"command": "interfaces"})),
        row(
            get.clone(),
            "/api/v1/dongles/{id}/cli-telemetry",
            "/api/v1/dongles/{dongle}/cli-telemetry",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        // A dongle's console is its owner's and the administrators' (issue 24): a super_admin watches
        // it too.
        row(
            get.clone(),
            "/api/v1/streams/dongles/{id}/console",
            "/api/v1/streams/dongles/{dongle}/console",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .except(Who::SuperAdmin, 200, ""),
        row(
            get.clone(),
            "/api/v1/groups",
            "/api/v1/groups",
            SessionOrAgent {
                owner: 200,
                other: Own(200),
            },
        ),
        row(
            get.clone(),
            "/api/v1/groups/{id}",
            "/api/v1/groups/{group}",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        row(
            post.clone(),
            "/api/v1/groups/{id}/deactivate",
            "/api/v1/groups/{group}/deactivate",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({})),
        row(
            post.clone(),
            "/api/v1/groups/{id}/activate",
            "/api/v1/groups/{group}/activate",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({})),
        // The fixture's group has no data connection, so it does not relay: the admin gets past
        // authorization to the check that it relays (409), everyone else is told there is no such route.
        row(
            post.clone(),
            "/api/v1/admin/groups/{id}/latency-test",
            "/api/v1/admin/groups/{group}/latency-test",
            Admin(409),
        )
        .body(json!({"rate": 100, "seconds": 1})),
        row(
            get.clone(),
            "/api/v1/streams/groups/{id}/console",
            "/api/v1/streams/groups/{group}/console",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        ),
        // B naming A's dongles in a body is told they do not exist. A's agent makes the group first, so
        // A's own request for the same two dongles is a conflict.
        row(
            post.clone(),
            "/api/v1/groups",
            "/api/v1/groups",
            SessionOrAgent {
                owner: 201,
                other: NotFound,
            },
        )
        .body(json!({"dongle_a_id": "{dongle_e}", "dongle_b_id": "{dongle_f}"}))
        .except(Who::UserB, 404, "DONGLE_NOT_FOUND")
        .except(Who::AgentB, 404, "DONGLE_NOT_FOUND")
        .except(Who::SuperAdmin, 404, "DONGLE_NOT_FOUND")
        .except(Who::UserA, 409, "CONFLICT"),
        // A's agent deletes the group it made above; A deletes the first group.
        row(
            delete.clone(),
            "/api/v1/groups/{id}",
            "/api/v1/groups/{group}",
            SessionOrAgent {
                owner: 204,
                other: NotFound,
            },
        )
        .agent_path("/api/v1/groups/{group2}"),
        // The dongle is already A's: starting and submitting are idempotent successes for A, and a 404
        // for anyone whose agents do not see it.
        row(
            post.clone(),
            "/api/v1/dongles/{id}/pairing-mode",
            "/api/v1/dongles/{dongle}/pairing-mode",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({"action": "start"}))
        .except(Who::Unverified, 403, "EMAIL_NOT_VERIFIED"),
        row(
            post.clone(),
            "/api/v1/dongles/{id}/pairing-submit",
            "/api/v1/dongles/{dongle}/pairing-submit",
            SessionOrAgent {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({"pairing_session_id": Uuid::nil(), "pin": "000000"}))
        .except(Who::Unverified, 403, "EMAIL_NOT_VERIFIED"),
        row(
            post.clone(),
            "/api/v1/dongles/{id}/unpair",
            "/api/v1/dongles/{dongle_unpair}/unpair",
            Session {
                owner: 200,
                other: NotFound,
            },
        )
        .body(json!({})),
        row(
            post.clone(),
            "/api/v1/admin/dongles/{id}/force-unpair",
            "/api/v1/admin/dongles/{dongle_force}/force-unpair",
            Admin(200),
        )
        .body(json!({})),
        row(
            post.clone(),
            "/api/v1/admin/dongles/{id}/release-holds",
            "/api/v1/admin/dongles/{dongle}/release-holds",
            Admin(200),
        )
        .body(json!({})),
        row(
            get.clone(),
            "/api/v1/admin/users",
            "/api/v1/admin/users",
            Admin(200),
        ),
        row(
            get.clone(),
            "/api/v1/admin/dongles",
            "/api/v1/admin/dongles",
            Admin(200),
        ),
        row(
            get.clone(),
            "/api/v1/admin/audit-logs",
            "/api/v1/admin/audit-logs",
            Admin(200),
        ),
        row(
            post.clone(),
            "/api/v1/admin/users/{id}/disable",
            "/api/v1/admin/users/{victim}/disable",
            Admin(200),
        )
        .body(json!({})),
        row(
            post.clone(),
            "/api/v1/admin/users/{id}/enable",
            "/api/v1/admin/users/{victim}/enable",
            Admin(200),
        )
        .body(json!({})),
        // A report is the agent's full snapshot: every agent reports what A's agent serves, so that
        // A's agent keeps serving it. It comes after the dongle rows, since B's agent then sees A's
        // dongles (which, claimed by A, still gives B nothing).
        row(
            post.clone(),
            "/api/v1/agents/devices/report",
            "/api/v1/agents/devices/report",
            Agent(200),
        )
        .body(json!({"dongles": "{snapshot}"})),
        // WebSocket upgrades (101). A's agent opening /ws/agent takes over the test agent's control
        // connection (the newest wins), so these come after everything that needs it.
        row(get.clone(), "/ws/data", "/ws/data", Agent(101)),
        row(get.clone(), "/ws/agent", "/ws/agent", Agent(101)),
        // An agent logging itself out revokes its own tokens: at the end, since A's and B's agents
        // are of no use to any row after it (but before A's session logs out).
        row(
            post.clone(),
            "/api/v1/agents/logout",
            "/api/v1/agents/logout",
            Agent(200),
        ),
        row(post, "/api/v1/auth/logout", "/api/v1/auth/logout", Logout).body(json!({})),
    ]
}

/// A session: the cookie's value and its CSRF token.
#[derive(Clone)]
struct Session {
    cookie: String,
    csrf: String,
}

/// Logs in with a client of its own and returns the new session.
async fn login(app: &TestApp, email: &str) -> Session {
    let res = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/login", app.base))
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "login of {email}");
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| c.strip_prefix("bridge_session="))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    let body: Value = res.json().await.unwrap();
    Session {
        cookie,
        csrf: body["csrf_token"].as_str().unwrap().to_string(),
    }
}

/// Every id the rows name, all of them A's unless said otherwise.
struct Fixture {
    dongle: Uuid,
    dongle_e: Uuid,
    dongle_f: Uuid,
    dongle_unpair: Uuid,
    dongle_force: Uuid,
    group: Uuid,
    command: Uuid,
    spare_agent: Uuid,
    spare_session: Uuid,
    /// A user who is neither A nor B, for the admin's actions.
    victim: Uuid,
    /// The device report A's agent sends (its full snapshot).
    snapshot: Value,
}

impl Fixture {
    async fn fill(&self, app: &TestApp, text: &str) -> String {
        let mut out = text.to_string();
        for (name, id) in [
            ("{dongle}", self.dongle),
            ("{dongle_e}", self.dongle_e),
            ("{dongle_f}", self.dongle_f),
            ("{dongle_unpair}", self.dongle_unpair),
            ("{dongle_force}", self.dongle_force),
            ("{group}", self.group),
            ("{command}", self.command),
            ("{spare_agent}", self.spare_agent),
            ("{spare_session}", self.spare_session),
            ("{victim}", self.victim),
        ] {
            out = out.replace(name, &id.to_string());
        }
        if out.contains("{group2}") {
            // The group the POST /groups row made.
            let second: Uuid = sqlx::query_scalar("SELECT id FROM dongle_groups WHERE id <> $1")
                .bind(self.group)
                .fetch_one(&app.pool)
                .await
                .expect("the second group exists");
            out = out.replace("{group2}", &second.to_string());
        }
        out
    }

    async fn body(&self, app: &TestApp, body: &Value) -> Value {
        if body["dongles"] == "{snapshot}" {
            return json!({"dongles": self.snapshot});
        }
        serde_json::from_str(&self.fill(app, &body.to_string()).await).unwrap()
    }
}

/// The credentials each kind of caller presents.
struct Callers {
    a: Session,
    b: Session,
    unverified: Session,
    admin: Session,
    disabled: Session,
    expired: Session,
    expired_user: Uuid,
    agent_a: String,
    agent_b: String,
    revoked: String,
}

impl Callers {
    /// (cookie, CSRF token, bearer token) of `who`.
    fn credentials(&self, who: Who) -> (Option<&str>, Option<&str>, Option<&str>) {
        fn session(s: &Session) -> (Option<&str>, Option<&str>, Option<&str>) {
            (Some(s.cookie.as_str()), Some(s.csrf.as_str()), None)
        }
        match who {
            Who::Anonymous => (None, None, None),
            Who::UserA => session(&self.a),
            Who::UserANoCsrf => (Some(self.a.cookie.as_str()), None, None),
            Who::UserB => session(&self.b),
            Who::Unverified => session(&self.unverified),
            Who::SuperAdmin => session(&self.admin),
            Who::DisabledSession => session(&self.disabled),
            Who::ExpiredSession => session(&self.expired),
            Who::AgentA => (None, None, Some(self.agent_a.as_str())),
            Who::AgentB => (None, None, Some(self.agent_b.as_str())),
            Who::RevokedAgent => (None, None, Some(self.revoked.as_str())),
        }
    }
}

/// What came back: status, error code and message (when the body is an error), and the body.
#[derive(Debug)]
struct Got {
    status: u16,
    code: String,
    message: String,
    text: String,
}

/// Calls `path` as `who`. WebSocket routes get a real upgrade request; an event stream's body is not
/// read, since it never ends.
async fn call(
    app: &TestApp,
    http: &reqwest::Client,
    callers: &Callers,
    who: Who,
    method: &Method,
    path: &str,
    body: Option<&Value>,
) -> Got {
    let (cookie, csrf, bearer) = callers.credentials(who);
    if path.starts_with("/ws/") {
        let url = format!("{}{path}", app.base.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().unwrap();
        let headers = request.headers_mut();
        if let Some(cookie) = cookie {
            headers.insert(
                "Cookie",
                format!("bridge_session={cookie}").parse().unwrap(),
            );
        }
        if let Some(token) = bearer {
            headers.insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        return match tokio_tungstenite::connect_async(request).await {
            Ok((mut ws, res)) => {
                let _ = ws.close(None).await;
                Got {
                    status: res.status().as_u16(),
                    code: String::new(),
                    message: String::new(),
                    text: String::new(),
                }
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                let text =
                    String::from_utf8_lossy(res.body().as_deref().unwrap_or_default()).to_string();
                let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Got {
                    status: res.status().as_u16(),
                    code: json["code"].as_str().unwrap_or_default().to_string(),
                    message: json["message"].as_str().unwrap_or_default().to_string(),
                    text,
                }
            }
            Err(e) => panic!("{who:?} {path}: WebSocket error {e}"),
        };
    }
    let mut req = http.request(method.clone(), format!("{}{path}", app.base));
    if let Some(cookie) = cookie {
        req = req.header("Cookie", format!("bridge_session={cookie}"));
    }
    if let Some(csrf) = csrf {
        req = req.header("X-CSRF-Token", csrf);
    }
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let streaming = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = if streaming {
        String::new()
    } else {
        res.text().await.unwrap()
    };
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Got {
        status,
        code: json["code"].as_str().unwrap_or_default().to_string(),
        message: json["message"].as_str().unwrap_or_default().to_string(),
        text,
    }
}

/// Puts the expired user's session back, expired, since the first use of an expired session ends it.
async fn re_expire(app: &TestApp, callers: &Callers) {
    sqlx::query("INSERT INTO sessions SELECT * FROM matrix_expired_session ON CONFLICT DO NOTHING")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second' WHERE user_id = $1")
        .bind(callers.expired_user)
        .execute(&app.pool)
        .await
        .unwrap();
}

/// The documented operations: (method, path).
fn documented() -> BTreeSet<(String, String)> {
    let doc = serde_json::to_value(bridge_server::routes::openapi()).unwrap();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method.to_uppercase().parse::<Method>().is_ok() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

#[test]
fn every_documented_operation_has_exactly_one_row() {
    let rows: Vec<(String, String)> = table()
        .iter()
        .map(|r| (r.method.to_string(), r.doc_path.to_string()))
        .collect();
    let unique: BTreeSet<_> = rows.iter().cloned().collect();
    assert_eq!(unique.len(), rows.len(), "a route has two rows");
    let documented = documented();
    let missing: Vec<_> = documented.difference(&unique).collect();
    let stale: Vec<_> = unique.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "documented routes without a row in the authorization matrix: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "rows for routes the document does not have: {stale:?}"
    );
}

/// Six dongles of A, all served by A's one connected agent: `dongle` and `dongle_b` make the first
/// group, `e` and `f` are left for the group the matrix creates, and two are for unpair and force-unpair.
const DEVICES: [&str; 6] = [
    "00000000000000a1",
    "00000000000000a2",
    "00000000000000a3",
    "00000000000000a4",
    "00000000000000a5",
    "00000000000000a6",
];

#[sqlx::test(migrator = "MIGRATOR")]
async fn every_route_answers_every_caller_as_the_table_says(pool: PgPool) {
    // The rate limits have tests of their own; here they would only turn repeated calls into 429s.
    let app = spawn_app_with(pool, |c| {
        let many = Limit::new(10_000, Duration::from_secs(60));
        let limits = &mut c.rate_limits;
        limits.login_per_ip = many;
        limits.login_per_account = many;
        limits.signup_per_ip = many;
        limits.reset_request_per_ip = many;
        limits.reset_request_per_account = many;
        limits.reset_confirm_per_ip = many;
        limits.can_send_per_dongle = many;
        limits.agent_requests_per_user = many;
    })
    .await;

    // A, with an agent serving six paired dongles, a group, and a command.
    let (a_client, _) = app.logged_in("alice@example.com", Role::User).await;
    let (_, agent_a) = agent::register(&a_client).await;
    let test_agent = TestAgent::connect(&app.base, &agent_a).await;
    test_agent.report(&app.pool, &DEVICES).await;
    let mut dongles = Vec::new();
    for device in DEVICES {
        dongles.push(common::data::pair(&app, &a_client, device).await);
    }
    let group = common::data::active_group(&a_client, dongles[0], dongles[1]).await;
    let queued = common::read(
        a_client
            .post_json(
                &format!("/dongles/{}/commands", dongles[0]),
                json!({"command": "uptime"}),
            )
            .await,
    )
    .await;
    assert_eq!(queued.status, StatusCode::ACCEPTED, "{}", queued.text);
    let command: Uuid = queued.json["command_id"].as_str().unwrap().parse().unwrap();
    let (spare_agent, _) = agent::register(&a_client).await;
    let (revoked_agent, revoked) = agent::register(&a_client).await;
    let revoke = a_client
        .delete(&format!("/agents/{revoked_agent}/tokens"))
        .await;
    assert_eq!(revoke.status(), StatusCode::OK);
    let a = login(&app, "alice@example.com").await;
    let _spare = login(&app, "alice@example.com").await;
    let spare_session: Uuid = sqlx::query_scalar(
        "SELECT s.public_id FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE u.email = 'alice@example.com' ORDER BY s.created_at DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // B with an agent of their own, a super_admin, and a user for the admin's actions.
    let b_id = app.create_user("bob@example.com", Role::User).await;
    let b = login(&app, "bob@example.com").await;
    let (_, agent_b) = agent::register(&common::TestClient {
        base: app.base.clone(),
        http: session_client(&b),
        csrf: Some(b.csrf.clone()),
    })
    .await;
    app.create_user("admin@example.com", Role::SuperAdmin).await;
    let admin = login(&app, "admin@example.com").await;
    let victim = app.create_user("victim@example.com", Role::User).await;
    let unverified_id = app.create_user("unverified@example.com", Role::User).await;
    sqlx::query("UPDATE users SET email_verified_at = NULL WHERE id = $1")
        .bind(unverified_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let unverified = login(&app, "unverified@example.com").await;

    // A disabled user's session is deleted when an admin disables them (admin.rs tests that); here the
    // row is kept, so that the second line of defence, the user's status, is what refuses it.
    let disabled_id = app.create_user("disabled@example.com", Role::User).await;
    let disabled = login(&app, "disabled@example.com").await;
    sqlx::query("UPDATE users SET status = 'disabled' WHERE id = $1")
        .bind(disabled_id)
        .execute(&app.pool)
        .await
        .unwrap();

    // An expired session: its row is saved, and put back expired before each use.
    let expired_user = app.create_user("expired@example.com", Role::User).await;
    let expired = login(&app, "expired@example.com").await;
    sqlx::query("CREATE TABLE matrix_expired_session AS SELECT * FROM sessions WHERE user_id = $1")
        .bind(expired_user)
        .execute(&app.pool)
        .await
        .unwrap();

    let snapshot = serde_json::to_value(
        DEVICES
            .iter()
            .map(|d| agent::usb_dongle(d))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let fixture = Fixture {
        dongle: dongles[0],
        dongle_e: dongles[2],
        dongle_f: dongles[3],
        dongle_unpair: dongles[4],
        dongle_force: dongles[5],
        group,
        command,
        spare_agent,
        spare_session,
        victim,
        snapshot,
    };
    let callers = Callers {
        a,
        b,
        unverified,
        admin,
        disabled,
        expired,
        expired_user,
        agent_a,
        agent_b,
        revoked,
    };
    let _ = b_id;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let mut calls = 0;
    for row in table() {
        for who in CALLERS {
            if who == Who::ExpiredSession {
                re_expire(&app, &callers).await;
            }
            let template = match (who, row.agent_path) {
                (Who::AgentA, Some(path)) => path,
                _ => row.path,
            };
            let path = fixture.fill(&app, template).await;
            let body = match &row.body {
                Some(body) => Some(fixture.body(&app, body).await),
                None => None,
            };
            let got = call(
                &app,
                &http,
                &callers,
                who,
                &row.method,
                &path,
                body.as_ref(),
            )
            .await;
            calls += 1;
            let (status, code) = row.expected(who);
            let what = format!("{} {path} as {who:?}", row.method);
            // A 404 names what was not found (NOT_FOUND, DONGLE_NOT_FOUND); which one is the route's.
            let code_fits = code.is_empty()
                || got.code == code
                || (code == "NOT_FOUND" && got.code.ends_with("_NOT_FOUND"));
            if got.status != status || !code_fits {
                failures.push(format!(
                    "{what}: expected {status} {code}, got {} {}",
                    got.status, got.text
                ));
                continue;
            }
            if got.status >= 400 && !path.starts_with("/ws/") {
                assert!(
                    !got.message.is_empty(),
                    "{what}: not the standard error shape: {}",
                    got.text
                );
            }
            // Someone else's resource answers exactly as one that does not exist: the same call with
            // made-up ids gets the same code and message.
            if got.status == 404 && template.contains('{') {
                let mut unknown = template.to_string();
                while let Some(start) = unknown.find('{') {
                    let end = start + unknown[start..].find('}').unwrap();
                    unknown.replace_range(start..=end, &Uuid::new_v4().to_string());
                }
                let twin = call(
                    &app,
                    &http,
                    &callers,
                    who,
                    &row.method,
                    &unknown,
                    body.as_ref(),
                )
                .await;
                if (twin.status, &twin.code, &twin.message) != (got.status, &got.code, &got.message)
                {
                    failures.push(format!(
                        "{what}: someone else's resource answered {} but an unknown one {}",
                        got.text, twin.text
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {calls} calls answered differently from the table:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing B or an agent did made them an owner of A's dongles (the rows above include B's agent
    // reporting all of them).
    let foreign: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dongles d JOIN users u ON u.id = d.owner_user_id \
         WHERE u.email <> 'alice@example.com'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(foreign, 0, "a dongle changed hands");
    test_agent.close();
}

/// A reqwest client that presents `session` on every request.
fn session_client(session: &Session) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "Cookie",
        format!("bridge_session={}", session.cookie)
            .parse()
            .unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}
