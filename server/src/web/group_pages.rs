//! Groups: the list with the form that makes one from two dongles, and a group's page with its state,
//! which side is offline, the backlog and replay progress, a backlog chart and the group's live
//! console.

use axum::extract::Path;
use axum::response::Response;
use serde_json::Value;

use super::api::Ctx;
use super::dongle_pages::console_markup;
use super::html::{ApiForm, Nav, api_form, esc, presence, select, state_badge, t, table, time};
use super::{error_page, not_found, parse_id, signed_in};

/// The group's state word (`ACTIVE`, `INACTIVE`, `DEGRADED`, `CROSS_INSTANCE`).
pub fn state_of(g: &Value) -> String {
    g["state"].as_str().unwrap_or("?").to_string()
}

/// A count per direction (`a_to_b` or `b_to_a`) of `what` (`backlog`, `frames_relayed`, ...).
pub fn count(g: &Value, what: &str, direction: &str) -> i64 {
    g[what][direction].as_i64().unwrap_or(0)
}

/// Frames waiting in one direction.
pub fn backlog(g: &Value, direction: &str) -> i64 {
    count(g, "backlog", direction)
}

/// One side of a group: `dongle_a` or `dongle_b` (`id`, `device_id`, `online`, `data_connected`).
fn side<'a>(g: &'a Value, side: &str) -> &'a Value {
    &g[format!("dongle_{side}").as_str()]
}

fn short(id: &str) -> &str {
    &id[..8.min(id.len())]
}

/// `GET /groups`.
pub async fn list(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (groups, dongles) = tokio::join!(ctx.get("/groups"), ctx.get("/dongles"));
    if !groups.ok() {
        return error_page(&groups, Some(&session));
    }
    let rows: Vec<String> = groups.json["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|g| {
                    let id = t(&g["id"]);
                    let device = |s: &str| t(&side(g, s)["device_id"]);
                    format!(
                        "<tr data-group-id=\"{id}\"><td><a href=\"/groups/{id}\">{}</a></td>\
                         <td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                         <td>{}</td></tr>",
                        esc(short(g["id"].as_str().unwrap_or(""))),
                        device("a"),
                        device("b"),
                        state_badge(&state_of(g)),
                        backlog(g, "a_to_b") + backlog(g, "b_to_a"),
                        time(&g["created_at"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // Dongles that can go in a new group: the caller's own, in no group yet.
    let free: Vec<(String, String)> = dongles.json["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|d| d["owned"] == true && d["group_id"].is_null())
                .map(|d| (text_of(&d["id"]), text_of(&d["device_id"])))
                .collect()
        })
        .unwrap_or_default();
    let create = if free.len() >= 2 {
        api_form(
            &session.csrf,
            ApiForm {
                path: "/groups",
                next: "/groups/{id}",
                notice: "group_created",
                ok: "redirect",
                id: "group-create",
                label: "Create a group",
                ..ApiForm::default()
            },
            &format!(
                "<div class=\"grid\">{}{}</div><button type=\"submit\">Create the group</button>",
                select(
                    "group-a",
                    "dongle_a_id",
                    "Side A (e.g. the vehicle)",
                    &free,
                    &free[0].0
                ),
                select(
                    "group-b",
                    "dongle_b_id",
                    "Side B (e.g. the bench)",
                    &free,
                    &free[1].0
                ),
            ),
        )
    } else {
        "<p class=\"empty\">A group needs two of your paired dongles that are in no group yet.</p>"
            .to_string()
    };
    let mut page = session.page(&ctx, "Groups", Nav::Groups);
    page.body = format!(
        "<p>A group relays the CAN frames received on one dongle to the other, both ways, across the \
         internet. When one side is offline the server keeps the frames for it and replays them in \
         order when it is back.</p>\
         <section aria-labelledby=\"groups-h\" data-region=\"groups\"><h2 id=\"groups-h\">Your groups</h2>{}</section>\
         <section aria-labelledby=\"create-h\"><h2 id=\"create-h\">New group</h2>{create}</section>",
        table(
            "Groups",
            &["Group", "Side A", "Side B", "State", "Backlog", "Created"],
            &rows,
            "No group yet."
        )
    );
    page.render()
}

fn text_of(v: &Value) -> String {
    super::html::text(v)
}

/// `GET /groups/{id}`.
pub async fn detail(ctx: Ctx, Path(raw): Path<String>) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(id) = parse_id(&raw) else {
        return not_found(Some(&session));
    };
    let group = ctx.get(&format!("/groups/{id}")).await;
    if !group.ok() {
        return error_page(&group, Some(&session));
    }
    let g = group.json;
    let state = state_of(&g);
    let mut page = session.page(
        &ctx,
        format!("Group {}", short(&id.to_string())),
        Nav::Groups,
    );
    let sides: Vec<String> = [("a", "A", "b_to_a"), ("b", "B", "a_to_b")]
        .iter()
        .map(|(which, label, towards)| {
            let d = side(&g, which);
            format!(
                "<tr data-side=\"{which}\" data-dongle-id=\"{}\"><th scope=\"row\">{label}</th>\
                 <td><a href=\"/dongles/{0}\"><code>{}</code></a></td><td>{}</td><td data-connected=\"{which}\">{}</td>\
                 <td data-waiting=\"{which}\">{}</td></tr>",
                t(&d["id"]),
                t(&d["device_id"]),
                presence(d["online"] == true),
                if d["data_connected"] == true { "connected" } else { "not connected" },
                backlog(&g, towards),
            )
        })
        .collect();
    let action = |verb: &str, label: &str, notice: &str, class: &str, confirm: &str| {
        let path = format!("/groups/{id}/{verb}");
        let next = format!("/groups/{id}");
        api_form(
            &session.csrf,
            ApiForm {
                path: &path,
                next: &next,
                notice,
                ok: "refresh",
                id: &format!("group-{verb}"),
                class: "inline",
                label,
                ..ApiForm::default()
            },
            &format!(
                "<button type=\"submit\" class=\"{class}\"{confirm}>{label}</button>",
                confirm = if confirm.is_empty() {
                    String::new()
                } else {
                    format!(" data-confirm=\"{}\"", esc(confirm))
                }
            ),
        )
    };
    let delete_path = format!("/groups/{id}");
    let delete = api_form(
        &session.csrf,
        ApiForm {
            method: "DELETE",
            path: &delete_path,
            next: "/groups",
            notice: "deleted",
            ok: "redirect",
            id: "group-delete",
            class: "inline",
            label: "Delete the group",
            ..ApiForm::default()
        },
        "<button type=\"submit\" class=\"danger\" data-confirm=\"Delete this group? Frames still \
         waiting for a side are dropped.\">Delete</button>",
    );
    let counters: String = [
        ("Relayed", "frames_relayed"),
        ("Trimmed by retention", "frames_trimmed"),
    ]
    .iter()
    .map(|(label, key)| {
        format!(
            "<dt>{label} A → B</dt><dd data-count=\"{key}.a_to_b\">{}</dd>\
             <dt>{label} B → A</dt><dd data-count=\"{key}.b_to_a\">{}</dd>",
            count(&g, key, "a_to_b"),
            count(&g, key, "b_to_a")
        )
    })
    .collect::<String>()
        + &["a", "b"]
            .iter()
            .map(|side| {
                format!(
                    "<dt>Lost at side {upper}</dt><dd data-lost=\"{side}\">{}</dd>",
                    g["agent_drops"][side].as_i64().unwrap_or(0),
                    upper = side.to_uppercase()
                )
            })
            .collect::<String>();
    let pressure = if g["buffer_pressure"] == true {
        "<p class=\"notice warn\" data-pressure role=\"status\">Buffer pressure: retention was reached and \
         the oldest kept frames were dropped (each trim is audited).</p>"
    } else {
        "<p class=\"notice warn\" data-pressure role=\"status\" hidden></p>"
    };
    page.body = format!(
        "<section aria-labelledby=\"state-h\" data-region=\"group-state\" data-group=\"{id}\">\
         <h2 id=\"state-h\">State</h2>\
         <dl class=\"facts\"><dt>State</dt><dd data-group-state>{}</dd>\
         <dt>Backlog A → B</dt><dd data-backlog=\"a_to_b\">{}</dd>\
         <dt>Backlog B → A</dt><dd data-backlog=\"b_to_a\">{}</dd>{counters}</dl>\
         <p data-group-explain class=\"muted\">{}</p>{pressure}\
         {}\
         <div class=\"actions\">{}{}{delete}</div></section>\
         <section aria-labelledby=\"backlog-h\"><h2 id=\"backlog-h\">Backlog and replay</h2>\
         <p class=\"hint\">Frames kept by the server for an offline side: they grow while a side is \
         away and shrink as they replay (5 000 frames/s by default).</p>\
         <div class=\"chart\"><canvas data-backlog-chart width=\"640\" height=\"160\" role=\"img\" \
         aria-label=\"Frames waiting, per direction, over the last minutes\"></canvas>\
         <p class=\"chart-caption\" data-replay role=\"status\">Backlog chart and replay progress need JavaScript.</p></div>\
         </section>\
         <section aria-labelledby=\"console-h\"><h2 id=\"console-h\">Live console</h2>{}</section>",
        state_badge(&state),
        backlog(&g, "a_to_b"),
        backlog(&g, "b_to_a"),
        esc(&explanation(&g, &state)),
        table(
            "Sides",
            &[
                "Side",
                "Dongle",
                "Presence",
                "Data plane",
                "Frames waiting for it"
            ],
            &sides,
            ""
        ),
        action("activate", "Activate", "activated", "", ""),
        action("deactivate", "Deactivate", "deactivated", "secondary", ""),
        console_markup(
            &format!("/api/v1/streams/groups/{id}/console"),
            "this group",
            "Frames per second through the group over the last minute"
        ),
    );
    page.scripts = &["console.js", "group.js"];
    page.render()
}

/// What the group's state means, naming the side that is away when one is.
fn explanation(g: &Value, state: &str) -> String {
    let away: Vec<&str> = [("a", "A"), ("b", "B")]
        .iter()
        .filter(|(which, _)| {
            let d = side(g, which);
            d["online"] != true || d["data_connected"] != true
        })
        .map(|(_, label)| *label)
        .collect();
    if state == "DEGRADED" && !away.is_empty() {
        format!(
            "Side {} is offline ({} not connected): the server keeps the frames for it (10 minutes \
             or 200 000 frames per direction) and replays them in order when it is back.",
            away.join(" and "),
            if away.len() > 1 {
                "their agents are"
            } else {
                "its agent is"
            },
        )
    } else {
        explain(state).to_string()
    }
}

/// What a group state means.
pub fn explain(state: &str) -> &'static str {
    match state {
        "ACTIVE" => "Both sides are online: frames go from each side to the other as they come.",
        "INACTIVE" => "Not relaying: activate the group to start.",
        "CROSS_INSTANCE" => {
            "Both sides are online, connected to different server instances: frames go from each \
             side to the other through the database, a few milliseconds later than on one instance."
        }
        "DEGRADED" => {
            "One side is offline: the server keeps the frames for it (10 minutes or 200 000 frames \
             per direction) and replays them in order when it is back."
        }
        _ => "",
    }
}
