//! Administration (super_admin only; for anyone else these pages do not exist, as in the API): users
//! with disable and enable, the audit log with its filters, force-unpair.

use axum::response::Response;
use serde_json::Value;

use super::api::Ctx;
use super::html::{
    ApiForm, Nav, api_form, esc, input, pager, select, state_badge, t, table, time, url_encode,
};
use super::{Session, error_page, not_found, parse_id, query_pairs, signed_in};

fn tabs(current: &str) -> String {
    let items = [
        ("/admin/users", "Users"),
        ("/admin/audit", "Audit log"),
        ("/admin/dongles", "Dongles"),
    ];
    let links: String = items
        .iter()
        .map(|(href, label)| {
            let cur = if *href == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            format!("<li><a href=\"{href}\"{cur}>{label}</a></li>")
        })
        .collect();
    format!("<nav class=\"tabs\" aria-label=\"Administration\"><ul>{links}</ul></nav>")
}

/// The page's query pairs, and the same as an API query string (empty values left out).
fn query(ctx: &Ctx, keys: &[&str]) -> (Vec<(String, String)>, String) {
    let pairs: Vec<(String, String)> = ctx
        .uri
        .split_once('?')
        .map(|(_, q)| query_pairs(q))
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| keys.contains(&k.as_str()) && !v.trim().is_empty())
        .map(|(k, v)| (k, v.trim().to_string()))
        .collect();
    let api = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    (pairs, api)
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

fn opts(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(v, l)| (v.to_string(), l.to_string()))
        .collect()
}

/// `GET /admin/users`.
pub async fn users(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (pairs, api_query) = query(&ctx, &["email", "status", "role", "page"]);
    let reply = ctx.get(&format!("/admin/users?{api_query}")).await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let rows: Vec<String> = reply.json["items"]
        .as_array()
        .map(|items| items.iter().map(|u| user_row(&session, u)).collect())
        .unwrap_or_default();
    let filters = format!(
        "<form method=\"get\" action=\"/admin/users\" class=\"filters\" aria-label=\"Search users\">\
         {}{}{}<button type=\"submit\">Search</button></form>",
        input(
            "users-email",
            "email",
            "Email contains",
            "search",
            value(&pairs, "email"),
            "autocomplete=\"off\""
        ),
        select(
            "users-status",
            "status",
            "Status",
            &opts(&[("", "Any"), ("active", "Active"), ("disabled", "Disabled")]),
            value(&pairs, "status")
        ),
        select(
            "users-role",
            "role",
            "Role",
            &opts(&[
                ("", "Any"),
                ("user", "User"),
                ("super_admin", "Administrator")
            ]),
            value(&pairs, "role")
        ),
    );
    let mut page = session.page(&ctx, "Users", Nav::Admin);
    page.body = format!(
        "{}{filters}<section data-region=\"users\">{}{}</section>",
        tabs("/admin/users"),
        table(
            "Users",
            &[
                "Email",
                "Role",
                "Status",
                "Email confirmed",
                "Created",
                "Action"
            ],
            &rows,
            "No user matches."
        ),
        pager("/admin/users", &pairs, &reply.json),
    );
    page.render()
}

fn user_row(session: &Session, u: &Value) -> String {
    let id = u["id"].as_str().unwrap_or("");
    let email = u["email"].as_str().unwrap_or("");
    let status = u["status"].as_str().unwrap_or("");
    let (verb, label, notice, class, confirm) = if status == "disabled" {
        ("enable", "Enable", "enabled", "secondary", "")
    } else {
        (
            "disable",
            "Disable",
            "disabled",
            "danger",
            " data-confirm=\"Disable this user? Their sessions end and their agents' tokens are revoked.\"",
        )
    };
    let action = if email == session.me.email {
        "<span class=\"muted\">you</span>".to_string()
    } else {
        let path = format!("/admin/users/{id}/{verb}");
        let name = format!("{label} {email}");
        let next = "/admin/users";
        api_form(
            &session.csrf,
            ApiForm {
                path: &path,
                next,
                notice,
                ok: "refresh",
                class: "inline",
                label: &name,
                ..ApiForm::default()
            },
            &format!(
                "<button type=\"submit\" class=\"{class}\" aria-label=\"{}\"{confirm}>{label}</button>",
                esc(&name)
            ),
        )
    };
    format!(
        "<tr data-user-id=\"{}\" data-email=\"{}\"><td>{}</td><td>{}</td><td data-user-status>{}</td>\
         <td>{}</td><td>{}</td><td>{action}</td></tr>",
        esc(id),
        esc(email),
        esc(email),
        t(&u["role"]),
        state_badge(status),
        t(&u["email_verified"]),
        time(&u["created_at"]),
    )
}

/// `GET /admin/audit`.
pub async fn audit(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let keys = [
        "actor",
        "action",
        "target_type",
        "target_id",
        "since",
        "until",
        "page",
    ];
    let (pairs, _) = query(&ctx, &keys);
    // A date from the form's date-time inputs (local, no zone) is read as UTC.
    let api_pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| {
            let v = if (k == "since" || k == "until") && v.len() == 16 {
                format!("{v}:00Z")
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let api_query = api_pairs
        .iter()
        .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let reply = ctx.get(&format!("/admin/audit-logs?{api_query}")).await;
    let filters = format!(
        "<form method=\"get\" action=\"/admin/audit\" class=\"filters\" aria-label=\"Filter the audit log\">\
         {}{}{}{}{}{}<button type=\"submit\">Filter</button> <a href=\"/admin/audit\">Clear</a></form>",
        input(
            "audit-action",
            "action",
            "Action (exact, e.g. auth.login_failed)",
            "text",
            value(&pairs, "action"),
            "autocomplete=\"off\""
        ),
        input(
            "audit-actor",
            "actor",
            "Actor (user id)",
            "text",
            value(&pairs, "actor"),
            "autocomplete=\"off\""
        ),
        input(
            "audit-target-type",
            "target_type",
            "Target type (user, dongle, …)",
            "text",
            value(&pairs, "target_type"),
            "autocomplete=\"off\""
        ),
        input(
            "audit-target-id",
            "target_id",
            "Target id",
            "text",
            value(&pairs, "target_id"),
            "autocomplete=\"off\""
        ),
        input(
            "audit-since",
            "since",
            "From (UTC)",
            "datetime-local",
            value(&pairs, "since"),
            ""
        ),
        input(
            "audit-until",
            "until",
            "Until (UTC)",
            "datetime-local",
            value(&pairs, "until"),
            ""
        ),
    );
    let listing = if reply.ok() {
        let rows: Vec<String> = reply.json["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|e| {
                        let target = match (e["target_type"].as_str(), e["target_id"].as_str()) {
                            (Some(kind), Some(id)) => format!("{kind} {id}"),
                            (Some(kind), None) => kind.to_string(),
                            _ => "—".to_string(),
                        };
                        let details = match &e["details"] {
                            Value::Object(m) if m.is_empty() => String::new(),
                            Value::Null => String::new(),
                            other => other.to_string(),
                        };
                        format!(
                            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                             <td>{}</td><td class=\"details\">{}</td></tr>",
                            time(&e["created_at"]),
                            t(&e["action"]),
                            t(&e["actor_user_id"]),
                            esc(&target),
                            t(&e["ip"]),
                            esc(&details),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "{}{}",
            table(
                "Audit log",
                &["When", "Action", "Actor", "Target", "IP", "Details"],
                &rows,
                "No entry matches."
            ),
            pager("/admin/audit", &pairs, &reply.json)
        )
    } else if reply.status.is_client_error() && reply.code() == "VALIDATION_ERROR" {
        format!(
            "<p class=\"error\" role=\"alert\">{}</p>",
            esc(&reply.message())
        )
    } else {
        return error_page(&reply, Some(&session));
    };
    let mut page = session.page(&ctx, "Audit log", Nav::Admin);
    page.body = format!(
        "{}{filters}<section data-region=\"audit\">{listing}</section>",
        tabs("/admin/audit")
    );
    page.render()
}

/// `GET /admin/dongles`: every dongle with its owner, state, agent, last sighting and group,
/// filtered; force-unpair one from the list (which also releases a security hold), or by its id.
pub async fn dongles(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (pairs, api_query) = query(&ctx, &["state", "owner", "device", "held", "page"]);
    let reply = ctx.get(&format!("/admin/dongles?{api_query}")).await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let rows: Vec<String> = reply.json["items"]
        .as_array()
        .map(|items| items.iter().map(|d| dongle_row(&session, d)).collect())
        .unwrap_or_default();
    let filters = format!(
        "<form method=\"get\" action=\"/admin/dongles\" class=\"filters\" aria-label=\"Search dongles\">\
         {}{}{}{}<button type=\"submit\">Search</button></form>",
        select(
            "dongles-state",
            "state",
            "State",
            &opts(&[
                ("", "Any"),
                ("UNCLAIMED", "Unclaimed"),
                ("CLAIMED_ACTIVE", "Claimed"),
                ("RESET_DETECTED", "Reset detected"),
                ("SECURITY_HOLD", "Security hold"),
            ]),
            value(&pairs, "state")
        ),
        input(
            "dongles-owner",
            "owner",
            "Owner's email contains",
            "search",
            value(&pairs, "owner"),
            "autocomplete=\"off\""
        ),
        input(
            "dongles-device",
            "device",
            "Device id contains",
            "search",
            value(&pairs, "device"),
            "autocomplete=\"off\" spellcheck=\"false\""
        ),
        select(
            "dongles-held",
            "held",
            "Accounts held",
            &opts(&[("", "Any"), ("true", "Some held from pairing")]),
            value(&pairs, "held")
        ),
    );
    let listing = format!(
        "{filters}<section data-region=\"admin-dongles\">{}{}</section>",
        table(
            "Dongles",
            &[
                "Device id",
                "State",
                "Owner",
                "Agent",
                "Last seen",
                "Group",
                "Action"
            ],
            &rows,
            "No dongle matches."
        ),
        pager("/admin/dongles", &pairs, &reply.json),
    );
    let form = format!(
        "<h2>By its id</h2><form method=\"get\" action=\"/admin/dongles\" class=\"narrow\" id=\"force-unpair-pick\" \
         aria-label=\"Choose a dongle\">{}<button type=\"submit\">Next</button></form>",
        input(
            "force-dongle",
            "dongle",
            "Dongle id (the UUID from the audit log or the owner's page)",
            "text",
            "",
            "required pattern=\"[0-9a-fA-F-]{36}\" autocomplete=\"off\" spellcheck=\"false\""
        )
    );
    let chosen = ctx
        .uri
        .split_once('?')
        .map(|(_, q)| query_pairs(q))
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "dongle")
        .and_then(|(_, v)| uuid::Uuid::parse_str(v.trim()).ok());
    let confirm = match chosen {
        Some(id) => {
            let path = format!("/admin/dongles/{id}/force-unpair");
            api_form(
                &session.csrf,
                ApiForm {
                    path: &path,
                    next: "/admin/dongles",
                    notice: "force_unpaired",
                    ok: "redirect",
                    id: "force-unpair",
                    label: "Force-unpair",
                    ..ApiForm::default()
                },
                &format!(
                    "<p>Force-unpair dongle <code>{id}</code>: its owner, token and group membership \
                     are cleared, any security hold ends, and the dongle is told to forget its token \
                     when its agent is connected.</p>\
                     <button type=\"submit\" class=\"danger\">Force-unpair</button>"
                ),
            )
        }
        None => String::new(),
    };
    let mut page = session.page(&ctx, "Dongles", Nav::Admin);
    page.body = format!("{}{listing}{form}{confirm}", tabs("/admin/dongles"));
    page.render()
}

/// The accounts held from pairing a dongle (five wrong PINs), under its state.
fn held_accounts(holds: &[&Value]) -> String {
    if holds.is_empty() {
        return String::new();
    }
    let who: Vec<String> = holds
        .iter()
        .map(|h| format!("{} ({})", t(&h["email"]), time(&h["since"])))
        .collect();
    format!(
        "<br><small data-region=\"pairing-holds\">Held from pairing: {}</small>",
        who.join(", ")
    )
}

/// A button that posts `/admin/dongles/{id}/{op}` after a confirmation, and comes back to the list
/// with `notice`.
fn action_form(
    session: &Session,
    id: &str,
    device: &str,
    op: &str,
    notice: &'static str,
    label: &str,
    confirm: &str,
) -> String {
    let path = format!("/admin/dongles/{id}/{op}");
    let aria = format!("{label} {device}");
    api_form(
        &session.csrf,
        ApiForm {
            path: &path,
            next: "/admin/dongles",
            notice,
            ok: "redirect",
            class: "inline",
            label: &aria,
            ..ApiForm::default()
        },
        &format!(
            "<button type=\"submit\" class=\"danger\" aria-label=\"{}\" data-confirm=\"{}\">{label}</button>",
            esc(&aria),
            esc(confirm)
        ),
    )
}

/// One dongle of the administrators' list, with its actions: force-unpair a claimed dongle, release a
/// dongle on security hold (the same operation, which ends the hold), and release the accounts held
/// from pairing it when there are any; nothing for an unclaimed dongle without them.
fn dongle_row(session: &Session, d: &Value) -> String {
    let id = d["id"].as_str().unwrap_or("");
    let device = d["device_id"].as_str().unwrap_or("");
    let state = d["ownership_state"].as_str().unwrap_or("");
    let holds: Vec<&Value> = d["pairing_holds"]
        .as_array()
        .map(|h| h.iter().collect())
        .unwrap_or_default();
    let mut action = String::new();
    if state != "UNCLAIMED" {
        let (label, confirm) = if state == "SECURITY_HOLD" {
            (
                "Release hold",
                "Release this dongle's security hold? It becomes unclaimed, and its owner pairs it again.",
            )
        } else {
            (
                "Force-unpair",
                "Force-unpair this dongle? Its owner, token and group membership are cleared.",
            )
        };
        action += &action_form(
            session,
            id,
            device,
            "force-unpair",
            "force_unpaired",
            label,
            confirm,
        );
    }
    if !holds.is_empty() {
        action += &action_form(
            session,
            id,
            device,
            "release-holds",
            "holds_released",
            "Release held accounts",
            "Release the accounts held from pairing this dongle? They may pair it again; its owner keeps it.",
        );
    }
    let agent = match d["agent_name"].as_str() {
        Some(name) => format!(
            "{} {}",
            esc(name),
            if d["agent_online"] == true {
                "<span class=\"badge ok\">online</span>"
            } else {
                "<span class=\"badge off\">offline</span>"
            }
        ),
        None => "<span class=\"muted\">none</span>".to_string(),
    };
    format!(
        "<tr data-dongle-id=\"{}\" data-device-id=\"{}\"><td><code>{}</code></td><td>{}</td><td>{}</td>\
         <td>{agent}</td><td>{}</td><td>{}</td><td>{action}</td></tr>",
        esc(id),
        esc(device),
        esc(device),
        state_badge(state) + &held_accounts(&holds),
        t(&d["owner_email"]),
        time(&d["last_seen_at"]),
        group_cell(&d["group_id"]),
    )
}

/// A dongle's group in the admins' list: a link to the group's latency test.
fn group_cell(group_id: &Value) -> String {
    match group_id.as_str() {
        Some(id) => format!(
            "<a href=\"/admin/groups/{id}/latency\" title=\"Measure this group's latency\"><code>{id}</code></a>",
            id = esc(id)
        ),
        None => "<span class=\"muted\">none</span>".to_string(),
    }
}

/// `GET /admin/groups/{id}/latency`: runs the latency test of a relaying group
/// (`POST /admin/groups/{id}/latency-test`) and shows what it found.
pub async fn latency(ctx: Ctx, axum::extract::Path(raw): axum::extract::Path<String>) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // For anyone but a super_admin this page does not exist, as its API route does not.
    let Some(id) = parse_id(&raw).filter(|_| session.me.admin) else {
        return not_found(Some(&session));
    };
    let path = format!("/admin/groups/{id}/latency-test");
    let next = format!("/admin/groups/{id}/latency");
    let form = api_form(
        &session.csrf,
        ApiForm {
            path: &path,
            next: &next,
            ok: "latency-measured",
            show_result: true,
            id: "latency-test",
            label: "Run a latency test",
            class: "narrow",
            ..ApiForm::default()
        },
        &format!(
            "{}{}<button type=\"submit\">Run the test</button>",
            input(
                "latency-rate",
                "rate:int",
                "Probes a second (1 to 5 000)",
                "number",
                "1000",
                "required min=\"1\" max=\"5000\""
            ),
            input(
                "latency-seconds",
                "seconds:int",
                "For how many seconds (1 to 60)",
                "number",
                "5",
                "required min=\"1\" max=\"60\""
            ),
        ),
    );
    let mut page = session.page(&ctx, "Latency test", Nav::Admin);
    page.body = format!(
        "{}<p>Group <code>{id}</code>. Numbered probes go from side A's agent through the server to \
         side B's agent and back, as the group's frames travel, at the rate you choose; neither \
         dongle's bus sees them. The group must be relaying with both agents connected, and both \
         agents must be version 5 of the protocol or newer. Its own frames keep flowing meanwhile.</p>\
         {form}\
         <section aria-labelledby=\"latency-h\" data-latency-result hidden>\
         <h2 id=\"latency-h\" tabindex=\"-1\">Result</h2>\
         <dl class=\"facts\">\
         <dt>Sent</dt><dd data-latency=\"sent\"></dd>\
         <dt>Came back</dt><dd data-latency=\"received\"></dd>\
         <dt>Lost</dt><dd data-latency=\"lost\"></dd>\
         <dt>Duplicates</dt><dd data-latency=\"duplicates\"></dd>\
         <dt>Out of order</dt><dd data-latency=\"out_of_order\"></dd>\
         <dt>Round trip, min</dt><dd data-latency=\"rtt.min\"></dd>\
         <dt>Round trip, p50</dt><dd data-latency=\"rtt.p50\"></dd>\
         <dt>Round trip, p95</dt><dd data-latency=\"rtt.p95\"></dd>\
         <dt>Round trip, p99</dt><dd data-latency=\"rtt.p99\"></dd>\
         <dt>Round trip, max</dt><dd data-latency=\"rtt.max\"></dd>\
         </dl><p class=\"hint\">Round trips are measured on side A's clock; one way is about half. \
         Each run is in the audit log (<code>group.latency_test</code>).</p></section>",
        tabs("/admin/dongles"),
    );
    page.scripts = &["latency.js"];
    page.render()
}
