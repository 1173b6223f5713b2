//! Agents: the user's agents with presence, registering one (its token is shown once), revoking.

use axum::response::Response;

use super::api::Ctx;
use super::html::{ApiForm, Nav, api_form, esc, input, presence, t, table, time};
use super::{error_page, signed_in};

/// `GET /agents`.
pub async fn list(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let reply = ctx.get("/agents").await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let rows: Vec<String> = reply.json["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|a| {
                    let id = a["id"].as_str().unwrap_or("");
                    let name = a["agent_name"].as_str().unwrap_or("agent");
                    let revoke = if a["active_token"] == true {
                        let path = format!("/agents/{id}/tokens");
                        let label = format!("Revoke the token of {name}");
                        api_form(
                            &session.csrf,
                            ApiForm {
                                method: "DELETE",
                                path: &path,
                                next: "/agents",
                                notice: "revoked",
                                ok: "refresh",
                                class: "inline",
                                label: &label,
                                ..ApiForm::default()
                            },
                            &format!(
                                "<button type=\"submit\" class=\"danger\" aria-label=\"{}\" \
                                 data-confirm=\"Revoke this agent's token? It must log in again.\">Revoke</button>",
                                esc(&label)
                            ),
                        )
                    } else {
                        "<span class=\"muted\">revoked</span>".to_string()
                    };
                    let version = if a["upgrade_required"] == true {
                        format!(
                            "{} <span class=\"badge warn\" data-upgrade>upgrade bridge-agent</span>",
                            t(&a["version"])
                        )
                    } else {
                        t(&a["version"])
                    };
                    format!(
                        "<tr data-agent-id=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                         <td>{version}</td><td>{}</td><td>{}</td><td>{revoke}</td></tr>",
                        esc(id),
                        esc(name),
                        presence(a["online"] == true),
                        t(&a["hostname"]),
                        t(&a["os"]),
                        interfaces(&a["interfaces"]),
                        time(&a["last_seen_at"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let register = api_form(
        &session.csrf,
        ApiForm {
            path: "/agents/register",
            next: "/agents",
            ok: "agent-registered",
            show_result: true,
            id: "agent-register",
            label: "Register an agent",
            ..ApiForm::default()
        },
        &format!(
            "{}<button type=\"submit\">Register</button>",
            input(
                "agent-name",
                "agent_name:opt",
                "Name (to tell your workstations apart)",
                "text",
                "",
                "maxlength=\"100\" autocomplete=\"off\""
            )
        ),
    );
    let mut page = session.page(&ctx, "Agents", Nav::Agents);
    page.body = format!(
        "<p>An agent runs on each workstation with dongles, and connects them to this server. \
         <code>bridge-agent login</code> registers one for you; register one here to give an agent \
         its token by hand.</p>\
         <section aria-labelledby=\"agents-h\" data-region=\"agents\"><h2 id=\"agents-h\">Your agents</h2>{}</section>\
         <section aria-labelledby=\"register-h\"><h2 id=\"register-h\">Register an agent</h2>{register}\
         <div id=\"agent-token\" class=\"token-box\" hidden>\
         <p class=\"notice warn\" role=\"status\">Copy this token now: it is shown this once, and the \
         server keeps only its hash. The agent sends it as <code>Authorization: Bearer</code>.</p>\
         <dl class=\"facts\"><dt>Agent id</dt><dd><code data-new-agent-id></code></dd>\
         <dt>Token</dt><dd><code class=\"secret\" data-agent-token></code> \
         <button type=\"button\" class=\"secondary\" data-copy-token>Copy</button></dd>\
         <dt>Control WebSocket</dt><dd><code data-agent-ws></code></dd></dl>\
         <button type=\"button\" class=\"secondary\" data-hide-token>I have copied it: hide it</button></div>\
         </section>",
        table(
            "Agents",
            &[
                "Name",
                "Presence",
                "Host",
                "OS",
                "Version",
                "Network interfaces",
                "Last seen",
                "Token"
            ],
            &rows,
            "No agent yet."
        )
    );
    page.render()
}

/// An agent's interfaces: each name with its addresses, marked when the LAN discovery uses it, with
/// the reason when it does not.
fn interfaces(list: &serde_json::Value) -> String {
    let items: Vec<String> = list
        .as_array()
        .map(|all| {
            all.iter()
                .map(|i| {
                    let addresses: Vec<&str> = i["addresses"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                        .unwrap_or_default();
                    let verdict = if i["used_for_discovery"] == true {
                        "discovery".to_string()
                    } else {
                        format!("not scanned: {}", t(&i["excluded_because"]))
                    };
                    format!(
                        "<li data-interface=\"{}\"><code>{}</code> {} <span class=\"muted\">({verdict})</span></li>",
                        t(&i["name"]),
                        t(&i["name"]),
                        esc(&addresses.join(", ")),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if items.is_empty() {
        return "<span class=\"muted\">none reported</span>".to_string();
    }
    format!("<ul class=\"plain\">{}</ul>", items.concat())
}
