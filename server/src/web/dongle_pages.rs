//! The dongles: the list with presence, and a dongle's page with pairing, CAN configuration, commands,
//! the live console and a frame sent by hand; a command's own page.

use axum::extract::Path;
use axum::response::Response;
use serde_json::Value;

use super::api::Ctx;
use super::html::{
    ApiForm, Nav, api_form, checkbox, esc, input, presence, select, state_badge, t, table, time,
};
use super::{Session, error_page, not_found, parse_id, query_value, signed_in};
use crate::commands::allow_list::ALLOW_LIST;
use crate::dongles::announces_can_fd;
use firmware_proto::remp::{BITRATE_RANGE, CanMode, SAMPLE_POINT_RANGE, TimingLimits};

/// Where a dongle is plugged in, in a few words.
pub fn link_text(transport: &Value) -> String {
    match transport["kind"].as_str() {
        Some("usb") => format!(
            "USB {}",
            transport["path"]
                .as_str()
                .or(transport["serial_number"].as_str())
                .unwrap_or("")
        ),
        Some("lan") => format!("LAN {}", transport["addr"].as_str().unwrap_or("")),
        Some("local") => format!(
            "Local {} {}",
            transport["endpoint"].as_str().unwrap_or(""),
            transport["location"].as_str().unwrap_or("")
        ),
        Some(other) => other.to_string(),
        None => "—".to_string(),
    }
}

/// What an ownership state means for the person looking at it.
fn state_explanation(state: &str) -> &'static str {
    match state {
        "UNCLAIMED" => "Nobody has paired this dongle yet: pair it below with the PIN it shows.",
        "CLAIMED_ACTIVE" => "Paired.",
        "RESET_DETECTED" => {
            "The dongle reported a factory reset or a token that no longer matches: an administrator \
             must force-unpair it before it can be paired again."
        }
        "SECURITY_HOLD" => {
            "On security hold (too many wrong PINs or pairing starts, or failed authentications). \
             Only an administrator can clear the hold, by force-unpairing the dongle."
        }
        _ => "",
    }
}

/// `GET /dongles`.
pub async fn list(ctx: Ctx) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let reply = ctx.get("/dongles").await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let mut page = session.page(&ctx, "Dongles", Nav::Dongles);
    page.body = format!(
        "<p>Your dongles, and the unclaimed dongles your own agents see now. Presence updates by \
         itself.</p><section data-region=\"dongles\" data-poll-dongles>{}</section>",
        dongle_table(&reply.json["items"])
    );
    page.render()
}

/// The table of dongles (also what the list's script refreshes).
pub fn dongle_table(items: &Value) -> String {
    let rows: Vec<String> = items
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|d| {
                    let id = t(&d["id"]);
                    let owner = if d["owned"] == true {
                        "yours"
                    } else {
                        "not paired to you"
                    };
                    let group = match d["group_id"].as_str() {
                        Some(g) => format!("<a href=\"/groups/{0}\">{1}</a>", esc(g), esc(&g[..8.min(g.len())])),
                        None => "—".to_string(),
                    };
                    format!(
                        "<tr data-dongle-id=\"{id}\"><td><a href=\"/dongles/{id}\"><code>{}</code></a></td>\
                         <td>{}</td><td>{} <span class=\"muted\">{owner}</span></td><td>{}</td>\
                         <td>{}</td><td>{group}</td><td>{}</td></tr>",
                        t(&d["device_id"]),
                        presence(d["online"] == true),
                        state_badge(d["ownership_state"].as_str().unwrap_or("")),
                        esc(&link_text(&d["transport"])),
                        t(&d["fw_build"]),
                        time(&d["last_seen_at"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        "Dongles",
        &[
            "Device",
            "Presence",
            "State",
            "Link",
            "Firmware",
            "Group",
            "Last seen",
        ],
        &rows,
        "No dongle yet. Run `bridge-agent run` on the workstation a dongle is plugged into (after \
         `bridge-agent login`, or register an agent on the Agents page): the dongles it sees appear \
         here.",
    )
}

/// `GET /dongles/{id}`.
pub async fn detail(ctx: Ctx, Path(raw): Path<String>) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(id) = parse_id(&raw) else {
        return not_found(Some(&session));
    };
    let reply = ctx.get(&format!("/dongles/{id}")).await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let d = reply.json;
    let device = d["device_id"].as_str().unwrap_or("").to_string();
    let owned = d["owned"] == true;
    let mut page = session.page(&ctx, format!("Dongle {device}"), Nav::Dongles);
    let mut body = format!(
        "<section aria-labelledby=\"summary-h\" data-region=\"summary\" data-dongle=\"{id}\" \
         data-capabilities=\"{caps}\"><h2 id=\"summary-h\">Summary</h2>{}</section>",
        summary(&d),
        caps = d["capabilities"].as_i64().unwrap_or(0),
    );
    if owned {
        body.push_str(&owned_sections(&ctx, &session, id, &d).await);
    } else {
        body.push_str(&pairing_section(&ctx, &session, id, &d));
    }
    page.body = body;
    page.scripts = &["dongle.js", "console.js"];
    page.render()
}

fn summary(d: &Value) -> String {
    let state = d["ownership_state"].as_str().unwrap_or("");
    let caps = d["capabilities"].as_i64();
    let group = match d["group_id"].as_str() {
        Some(g) => format!("<a href=\"/groups/{0}\">{0}</a>", esc(g)),
        None => "none".to_string(),
    };
    format!(
        "<dl class=\"facts\"><dt>Device id</dt><dd><code>{}</code></dd>\
         <dt>Presence</dt><dd data-dongle-presence>{}</dd>\
         <dt>State</dt><dd>{} <span class=\"muted\">{}</span></dd>\
         <dt>Link</dt><dd>{}</dd><dt>Firmware</dt><dd>{}</dd>\
         <dt>CAN FD</dt><dd>{}</dd><dt>Last seen</dt><dd>{}</dd><dt>Group</dt><dd>{group}</dd></dl>",
        t(&d["device_id"]),
        presence(d["online"] == true),
        state_badge(state),
        esc(state_explanation(state)),
        esc(&link_text(&d["transport"])),
        t(&d["fw_build"]),
        match caps {
            Some(c) if announces_can_fd(c) => "yes",
            Some(_) => "no",
            None => "—",
        },
        time(&d["last_seen_at"]),
    )
}

fn pairing_section(ctx: &Ctx, session: &Session, id: uuid::Uuid, d: &Value) -> String {
    let state = d["ownership_state"].as_str().unwrap_or("");
    // After a start without JavaScript, the page comes back with the window's session and end.
    let pairing = query_value(&ctx.uri, "pairing").filter(|p| parse_id(p).is_some());
    let expires = query_value(&ctx.uri, "expires").unwrap_or_default();
    let start_next = format!("/dongles/{id}?pairing={{pairing_session_id}}&expires={{expires_at}}");
    let start_path = format!("/dongles/{id}/pairing-mode");
    let start = api_form(
        &session.csrf,
        ApiForm {
            path: &start_path,
            next: &start_next,
            ok: "pairing-started",
            id: "pairing-start",
            label: "Start pairing",
            ..ApiForm::default()
        },
        "<input type=\"hidden\" name=\"action\" value=\"start\">\
         <button type=\"submit\">Start pairing</button>",
    );
    let submit_path = format!("/dongles/{id}/pairing-submit");
    let submit_next = format!("/dongles/{id}");
    let pin_form = api_form(
        &session.csrf,
        ApiForm {
            path: &submit_path,
            next: &submit_next,
            notice: "paired",
            ok: "paired",
            id: "pairing-submit",
            label: "Enter the PIN",
            ..ApiForm::default()
        },
        &format!(
            "<input type=\"hidden\" name=\"pairing_session_id\" value=\"{}\">{}\
             <button type=\"submit\">Pair</button>",
            esc(pairing.as_deref().unwrap_or("")),
            input(
                "pairing-pin",
                "pin",
                "PIN shown by the dongle (6 digits)",
                "text",
                "",
                "inputmode=\"numeric\" pattern=\"[0-9]{6}\" maxlength=\"6\" autocomplete=\"one-time-code\" required"
            ),
        ),
    );
    let hidden = if pairing.is_some() { "" } else { " hidden" };
    let hold = if state == "SECURITY_HOLD" || state == "RESET_DETECTED" {
        format!(
            "<p class=\"notice warn\" role=\"status\">{}</p>",
            esc(state_explanation(state))
        )
    } else {
        String::new()
    };
    format!(
        "<section aria-labelledby=\"pairing-h\" id=\"pairing\"><h2 id=\"pairing-h\">Pairing</h2>{hold}\
         <p>Start pairing: the dongle shows a 6-digit PIN (on its display or LED pattern; a simulated \
         dongle prints it in its log) and waits <strong>120 s</strong> for it. Five wrong PINs put the \
         dongle on a cool-down and on security hold.</p>{start}\
         <div id=\"pairing-window\"{hidden}><p id=\"pairing-countdown\" class=\"countdown\" \
         data-expires=\"{}\" role=\"timer\" aria-live=\"off\">Pairing window open.</p>{pin_form}</div>\
         </section>",
        esc(&expires)
    )
}

async fn owned_sections(ctx: &Ctx, session: &Session, id: uuid::Uuid, d: &Value) -> String {
    let config_path = format!("/dongles/{id}/can-config");
    let commands_path = format!("/dongles/{id}/commands?per_page=10");
    let history_path = format!("/dongles/{id}/cli-telemetry?per_page=20");
    let (config, commands, history) = tokio::join!(
        ctx.get(&config_path),
        ctx.get(&commands_path),
        ctx.get(&history_path)
    );
    let fd = announces_can_fd(d["capabilities"].as_i64().unwrap_or(0));
    let unpair_path = format!("/dongles/{id}/unpair");
    let unpair = api_form(
        &session.csrf,
        ApiForm {
            path: &unpair_path,
            next: "/dongles",
            notice: "unpaired",
            ok: "redirect",
            id: "unpair",
            class: "inline",
            label: "Unpair",
            ..ApiForm::default()
        },
        "<button type=\"submit\" class=\"danger\" data-confirm=\"Unpair this dongle? It forgets its \
         token and leaves its group.\">Unpair</button>",
    );
    format!(
        "<section aria-labelledby=\"owner-h\"><h2 id=\"owner-h\">Ownership</h2>\
         <p>This dongle is paired to your account.</p>{unpair}</section>{}{}{}{}",
        can_section(session, id, &config.json, fd),
        commands_section(ctx, session, id, &commands.json),
        history_section(&history.json),
        console_section(session, id, fd),
    )
}

fn num(v: &Value, default: i64) -> String {
    v.as_i64().unwrap_or(default).to_string()
}

fn can_section(session: &Session, id: uuid::Uuid, state: &Value, fd: bool) -> String {
    let c = &state["config"];
    let modes: Vec<(String, String)> = CanMode::ALL
        .into_iter()
        .map(|mode| {
            let label = match mode {
                CanMode::Normal => "Normal",
                CanMode::ListenOnly => "Listen only",
                CanMode::Loopback => "Loopback",
                CanMode::ExtLoop => "External loopback",
            };
            (mode.name().to_string(), label.to_string())
        })
        .collect();
    // The ranges are firmware-proto's, the ones the API checks: the form and the timing preview read
    // them from here rather than keeping copies of their own.
    let (limits, controller) = TimingLimits::of_controller(fd);
    let TimingLimits {
        prescaler_max,
        tseg1_max,
        tseg2_max,
        sjw_max,
    } = limits;
    let hint = format!(
        "{controller} ranges: prescaler 1–{prescaler_max}, tseg1 1–{tseg1_max}, tseg2 1–{tseg2_max}, \
         sjw 1–{sjw_max} and at most tseg2."
    );
    let (bitrate_min, bitrate_max) = (BITRATE_RANGE.start(), BITRATE_RANGE.end());
    let (sp_min, sp_max) = (SAMPLE_POINT_RANGE.start(), SAMPLE_POINT_RANGE.end());
    let fields = format!(
        "<div class=\"grid\">{}{}{}</div>\
         <datalist id=\"common-bitrates\"><option value=\"125000\"><option value=\"250000\">\
         <option value=\"500000\"><option value=\"1000000\"></datalist>\
         <div class=\"timing-preview\" id=\"timing-preview\" role=\"status\" aria-live=\"polite\" \
         data-prescaler-max=\"{prescaler_max}\" data-tseg1-max=\"{tseg1_max}\" \
         data-tseg2-max=\"{tseg2_max}\" data-bitrate-min=\"{bitrate_min}\" \
         data-bitrate-max=\"{bitrate_max}\" data-sample-point-min=\"{sp_min}\" data-sample-point-max=\"{sp_max}\">\
         <p>The timing preview needs JavaScript.</p></div>\
         {}\
         <fieldset><legend>Raw timing</legend><p class=\"hint\">{hint}</p><div class=\"grid\">{}{}{}{}</div></fieldset>\
         <fieldset><legend>Options</legend>{}{}{}</fieldset>\
         <button type=\"submit\">Apply</button>",
        input(
            "can-bitrate",
            "bitrate:int",
            "Bitrate (bit/s)",
            "number",
            &num(&c["bitrate"], 500_000),
            &format!(
                "min=\"{bitrate_min}\" max=\"{bitrate_max}\" step=\"1\" list=\"common-bitrates\" required"
            )
        ),
        input(
            "can-sample-point",
            "sample_point_permille:int",
            "Sample point (‰)",
            "number",
            &num(&c["sample_point_permille"], 875),
            &format!("min=\"{sp_min}\" max=\"{sp_max}\" step=\"1\" required")
        ),
        select(
            "can-mode",
            "mode",
            "Mode",
            &modes,
            c["mode"].as_str().unwrap_or("normal")
        ),
        checkbox(
            "can-use-raw",
            "use_raw",
            "Use the raw timing below instead of bitrate and sample point",
            c["use_raw"] == true
        ),
        input(
            "can-prescaler",
            "prescaler:int",
            "Prescaler",
            "number",
            c["prescaler"]
                .as_i64()
                .map(|v| v.to_string())
                .as_deref()
                .unwrap_or(""),
            &format!("min=\"1\" max=\"{prescaler_max}\"")
        ),
        input(
            "can-tseg1",
            "tseg1:int",
            "tseg1",
            "number",
            c["tseg1"]
                .as_i64()
                .map(|v| v.to_string())
                .as_deref()
                .unwrap_or(""),
            &format!("min=\"1\" max=\"{tseg1_max}\"")
        ),
        input(
            "can-tseg2",
            "tseg2:int",
            "tseg2",
            "number",
            c["tseg2"]
                .as_i64()
                .map(|v| v.to_string())
                .as_deref()
                .unwrap_or(""),
            &format!("min=\"1\" max=\"{tseg2_max}\"")
        ),
        input(
            "can-sjw",
            "sjw:int",
            "sjw",
            "number",
            c["sjw"]
                .as_i64()
                .map(|v| v.to_string())
                .as_deref()
                .unwrap_or(""),
            &format!("min=\"1\" max=\"{sjw_max}\"")
        ),
        checkbox(
            "can-auto-retx",
            "auto_retx",
            "Automatic retransmission",
            c["auto_retx"] != false
        ),
        checkbox(
            "can-tx-pause",
            "tx_pause",
            "Transmit pause",
            c["tx_pause"] == true
        ),
        checkbox(
            "can-protocol-exc",
            "protocol_exc",
            "Protocol exception handling",
            c["protocol_exc"] == true
        ),
    );
    let path = format!("/dongles/{id}/can-config");
    let next = format!("/dongles/{id}");
    let form = api_form(
        &session.csrf,
        ApiForm {
            method: "PUT",
            path: &path,
            next: &next,
            notice: "saved",
            ok: "can-applied",
            id: "can-config",
            label: "CAN configuration",
            ..ApiForm::default()
        },
        &fields,
    );
    format!(
        "<section aria-labelledby=\"can-h\"><h2 id=\"can-h\">CAN configuration</h2>{form}\
         <div data-region=\"can-effective\">{}</div></section>",
        effective_table(state)
    )
}

/// What the dongle acknowledged for the stored configuration.
pub fn effective_table(state: &Value) -> String {
    let e = &state["effective"];
    if e.is_null() {
        return "<p class=\"empty\" id=\"can-effective\">No configuration applied through the server \
                yet: the dongle runs with its own.</p>"
            .to_string();
    }
    let c = &state["config"];
    let rows: Vec<String> = [
        ("Bitrate (bit/s)", "bitrate"),
        ("Sample point (‰)", "sample_point_permille"),
        ("Prescaler", "prescaler"),
        ("tseg1", "tseg1"),
        ("tseg2", "tseg2"),
        ("sjw", "sjw"),
        ("Mode", "mode"),
        ("Raw timing", "use_raw"),
        ("Automatic retransmission", "auto_retx"),
        ("Transmit pause", "tx_pause"),
        ("Protocol exception handling", "protocol_exc"),
    ]
    .iter()
    .map(|(label, key)| {
        format!(
            "<tr><th scope=\"row\">{label}</th><td>{}</td><td data-effective=\"{key}\">{}</td></tr>",
            t(&c[*key]),
            t(&e[*key])
        )
    })
    .collect();
    format!(
        "<div id=\"can-effective\"><h3>Effective values</h3><p>Acknowledged by the dongle {}.</p>{}</div>",
        time(&state["applied_at"]),
        table(
            "Requested and effective CAN configuration",
            &["Setting", "Requested", "Effective"],
            &rows,
            ""
        )
    )
}

fn commands_section(ctx: &Ctx, session: &Session, id: uuid::Uuid, page: &Value) -> String {
    let dev = ctx.state.config.dev_mode;
    let options: Vec<(String, String)> = ALLOW_LIST
        .iter()
        .filter(|c| dev || !c.dangerous)
        .map(|c| (c.name.to_string(), c.name.to_string()))
        .collect();
    let path = format!("/dongles/{id}/commands");
    let next = format!("/dongles/{id}/commands/{{command_id}}");
    // Dangerous commands run only on a development server, and only when asked for explicitly.
    let dangerous_box = if dev {
        checkbox(
            "command-dangerous",
            "allow_dangerous",
            "Allow a dangerous command (development server only)",
            false,
        )
    } else {
        String::new()
    };
    let form = api_form(
        &session.csrf,
        ApiForm {
            path: &path,
            next: &next,
            ok: "command-queued",
            id: "command-form",
            label: "Run a command",
            ..ApiForm::default()
        },
        &format!(
            "<div class=\"grid\">{}{}{}</div>{dangerous_box}<button type=\"submit\">Run</button>",
            select("command-name", "command", "Command", &options, "version"),
            input(
                "command-args",
                "args:words",
                "Arguments (words, for echo and sleep)",
                "text",
                "",
                "autocomplete=\"off\""
            ),
            input(
                "command-timeout",
                "timeout_ms:int",
                "Timeout (ms, optional)",
                "number",
                "",
                "min=\"100\" max=\"70000\""
            ),
        ),
    );
    let host_path = format!("/dongles/{id}/host-commands");
    let host_next = format!("/dongles/{id}");
    let host_options: Vec<(String, String)> = control_proto::HostCommand::ALL
        .iter()
        .map(|c| (c.name().to_string(), c.name().to_string()))
        .collect();
    let host_form = api_form(
        &session.csrf,
        ApiForm {
            path: &host_path,
            next: &host_next,
            ok: "refresh",
            id: "host-command-form",
            label: "Run a diagnostic on the agent's workstation",
            ..ApiForm::default()
        },
        &format!(
            "{}<button type=\"submit\" class=\"secondary\">Run on the workstation</button>",
            select(
                "host-command-name",
                "command",
                "Network diagnostic on the agent's workstation (its output streams to the live console)",
                &host_options,
                "interfaces"
            )
        ),
    );
    format!(
        "<section aria-labelledby=\"commands-h\"><h2 id=\"commands-h\">Commands</h2>\
         <p>Only the commands of the server's allow-list run.</p>{form}{host_form}\
         <div id=\"command-output\" class=\"command-output\" aria-live=\"polite\" hidden>\
         <p><span data-command-name></span>: <span data-command-status class=\"badge\"></span> \
         <span data-command-exit></span></p><pre data-command-stdout tabindex=\"0\"></pre>\
         <pre data-command-stderr class=\"stderr\" hidden></pre></div>\
         <div data-region=\"commands\"><h3>Recent commands</h3>{}</div></section>",
        commands_table(id, page)
    )
}

fn commands_table(id: uuid::Uuid, page: &Value) -> String {
    let rows: Vec<String> = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|c| {
                    let args = c["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    format!(
                        "<tr><td><a href=\"/dongles/{id}/commands/{}\">{}</a></td><td>{}</td>\
                         <td>{}</td><td>{}</td><td>{}</td></tr>",
                        t(&c["command_id"]),
                        t(&c["command"]),
                        esc(&args),
                        state_badge(c["status"].as_str().unwrap_or("")),
                        t(&c["exit_code"]),
                        time(&c["created_at"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        "Recent commands",
        &["Command", "Arguments", "Status", "Exit code", "Queued"],
        &rows,
        "No command yet.",
    )
}

/// The dongle's history of commands: typed on its UART console or sent from here, newest first.
fn history_section(page: &Value) -> String {
    let rows: Vec<String> = page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|h| {
                    let source = match h["source"].as_str() {
                        Some("uart") => "UART console",
                        Some("remote") => "Remote",
                        Some("host") => "Workstation",
                        _ => "?",
                    };
                    let mut outcome = t(&h["exit_code"]);
                    if h["error"] == true {
                        outcome.push_str(" (failed)");
                    }
                    if h["truncated"] == true {
                        outcome.push_str(" (output cut)");
                    }
                    format!(
                        "<tr data-source=\"{}\"><td>{}</td><td><code>{}</code></td><td>{}</td>\
                         <td><pre class=\"output\">{}</pre></td><td>{}</td></tr>",
                        t(&h["source"]),
                        source,
                        t(&h["command"]),
                        outcome,
                        t(&h["output"]),
                        time(&h["created_at"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "<section aria-labelledby=\"history-h\"><h2 id=\"history-h\">Command history</h2>\
         <p>Commands typed on the dongle's own console (its UART) and those sent from here, as the \
         dongle reported them. New ones also appear in the live console below.</p>\
         <div data-region=\"cli-history\">{}</div></section>",
        table(
            "Command history",
            &["Where", "Command", "Exit code", "Output", "When"],
            &rows,
            "No command yet.",
        )
    )
}

/// The live console of a stream (an SSE path under `/api/v1/streams`): status, sampling notice,
/// frames-per-second chart, filters, the frames table and the other events. `console.js` runs it.
pub fn console_markup(stream: &str, title: &str, chart_label: &str) -> String {
    format!(
        "<div class=\"console\" data-console=\"{stream}\">\
         <p class=\"console-status\" data-console-status role=\"status\">The live console needs \
         JavaScript.</p>\
         <p class=\"notice warn\" data-sampling role=\"status\" hidden></p>\
         <div class=\"chart\"><canvas data-fps-chart width=\"640\" height=\"140\" role=\"img\" \
         aria-label=\"{chart_label}\"></canvas><p class=\"chart-caption\"><span data-fps>0</span> \
         frames/s now, <span data-frames-total>0</span> frames shown since the page opened.</p>\
         <p class=\"chart-caption\" data-bus-load hidden></p></div>\
         <form class=\"filters\" data-console-filters aria-label=\"Filter the frames of {title}\">\
         <div class=\"field\"><label for=\"filter-id\">CAN id (hex, comma-separated; empty: all)</label>\
         <input id=\"filter-id\" name=\"filter-id\" type=\"text\" autocomplete=\"off\" \
         spellcheck=\"false\"></div>\
         <div class=\"field\"><label for=\"filter-dir\">Direction</label>\
         <select id=\"filter-dir\" name=\"filter-dir\"><option value=\"\">Both</option>\
         <option value=\"rx\">rx (from the bus)</option><option value=\"tx\">tx (onto the bus)</option>\
         </select></div>\
         <button type=\"button\" class=\"secondary\" data-console-pause aria-pressed=\"false\">Pause</button>\
         <button type=\"button\" class=\"secondary\" data-console-clear>Clear</button></form>\
         <div class=\"table-wrap console-table\" tabindex=\"0\" role=\"region\" aria-label=\"Frames of {title}\">\
         <table><caption class=\"visually-hidden\">Frames, newest first</caption><thead><tr>\
         <th scope=\"col\">Time</th><th scope=\"col\">Dongle</th><th scope=\"col\">Dir</th>\
         <th scope=\"col\">CAN id</th><th scope=\"col\">Data</th></tr></thead>\
         <tbody data-frames></tbody></table></div>\
         <h3>Events</h3><ol class=\"events\" data-events aria-live=\"polite\"></ol></div>",
        stream = esc(stream),
        title = esc(title),
        chart_label = esc(chart_label),
    )
}

fn console_section(session: &Session, id: uuid::Uuid, fd: bool) -> String {
    let path = format!("/dongles/{id}/can/send");
    let next = format!("/dongles/{id}");
    let fd_box = if fd {
        checkbox("send-fd", "fd", "CAN FD frame (up to 64 bytes)", false)
    } else {
        String::new()
    };
    let send = api_form(
        &session.csrf,
        ApiForm {
            path: &path,
            next: &next,
            notice: "sent",
            ok: "frame-sent",
            id: "send-frame",
            label: "Send a frame",
            ..ApiForm::default()
        },
        &format!(
            "<div class=\"grid\">{}{}</div>{}{fd_box}<button type=\"submit\">Send</button>",
            input(
                "send-id",
                "can_id:hex",
                "CAN id (hex)",
                "text",
                "7DF",
                "required pattern=\"(0x|0X)?[0-9a-fA-F]{1,8}\" autocomplete=\"off\" spellcheck=\"false\""
            ),
            input(
                "send-data",
                "data_hex",
                "Data (hex bytes, e.g. 02010C)",
                "text",
                "02010C",
                "pattern=\"([0-9a-fA-F]{2})*\" autocomplete=\"off\" spellcheck=\"false\""
            ),
            checkbox(
                "send-extended",
                "is_extended",
                "Extended id (29 bits)",
                false
            ),
        ),
    );
    format!(
        "<section aria-labelledby=\"console-h\"><h2 id=\"console-h\">Live console</h2>{}\
         <h3>Send a frame</h3>{send}</section>",
        console_markup(
            &format!("/api/v1/streams/dongles/{id}/console"),
            "this dongle",
            "Frames per second over the last minute"
        )
    )
}

/// `GET /dongles/{id}/commands/{command_id}`: one command; the page reloads itself until it ends.
pub async fn command(ctx: Ctx, Path((raw, raw_cmd)): Path<(String, String)>) -> Response {
    let session = match signed_in(&ctx).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (Some(id), Some(cmd)) = (parse_id(&raw), parse_id(&raw_cmd)) else {
        return not_found(Some(&session));
    };
    let reply = ctx.get(&format!("/dongles/{id}/commands/{cmd}")).await;
    if !reply.ok() {
        return error_page(&reply, Some(&session));
    }
    let c = reply.json;
    let status = c["status"].as_str().unwrap_or("");
    let mut page = session.page(
        &ctx,
        format!("Command {}", text_of(&c["command"])),
        Nav::Dongles,
    );
    if matches!(status, "queued" | "running") {
        page.refresh = Some(2);
    }
    let stderr = match c["stderr"].as_str() {
        Some(s) if !s.is_empty() => {
            format!("<h2>stderr</h2><pre class=\"stderr\">{}</pre>", esc(s))
        }
        _ => String::new(),
    };
    page.body = format!(
        "<dl class=\"facts\"><dt>Status</dt><dd>{}</dd><dt>Exit code</dt><dd>{}</dd>\
         <dt>Queued</dt><dd>{}</dd><dt>Started</dt><dd>{}</dd><dt>Finished</dt><dd>{}</dd>\
         <dt>Output cut</dt><dd>{}</dd></dl><h2>Output</h2><pre tabindex=\"0\">{}</pre>{stderr}\
         <p><a href=\"/dongles/{id}\">Back to the dongle</a></p>",
        state_badge(status),
        t(&c["exit_code"]),
        time(&c["created_at"]),
        time(&c["started_at"]),
        time(&c["finished_at"]),
        t(&c["truncated"]),
        esc(c["stdout"].as_str().unwrap_or("")),
    );
    page.render()
}

fn text_of(v: &Value) -> String {
    super::html::text(v)
}
