//! HTML by hand: one escaping function that every value goes through, the page frame, and the small
//! builders the pages share (the form that reaches the API, tables, notices).

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;

use super::assets;

/// Escapes text for HTML content and for quoted attribute values alike.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as plain text: strings as they are, null as an em dash, anything else as JSON.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "—".to_string(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".to_string(),
        Value::Bool(false) => "no".to_string(),
        other => other.to_string(),
    }
}

/// `text` escaped.
pub fn t(value: &Value) -> String {
    esc(&text(value))
}

/// A timestamp from the API (RFC 3339) as a `<time>` element; the page's script shows it in local time.
pub fn time(value: &Value) -> String {
    match value.as_str() {
        Some(at) => {
            let shown = at.get(..19).unwrap_or(at).replace('T', " ");
            format!("<time datetime=\"{}\">{} UTC</time>", esc(at), esc(&shown))
        }
        None => "—".to_string(),
    }
}

/// Percent-encodes a query value.
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The messages a `?notice=` code shows. Only these codes show anything, so that a link cannot put
/// words of its own on a page.
pub fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "signed_out" => "You were signed out: your session ended. Sign in again to go on.",
        "logged_out" => "You are signed out.",
        "signup_sent" => {
            "If the address can be used, a message is on its way to it: follow its link to confirm the address, then sign in."
        }
        "verified" => "Your email address is confirmed. You can sign in.",
        "reset_sent" => {
            "If an account uses this address, a message with a reset link is on its way to it."
        }
        "password_changed" => "Your password is changed: sign in with the new one.",
        "saved" => "Saved.",
        "paired" => "The dongle is paired to your account.",
        "unpaired" => "The dongle is unpaired.",
        "disabled" => {
            "The user is disabled: their sessions ended and their agents' tokens are revoked."
        }
        "enabled" => "The user is enabled again.",
        "revoked" => "The agent's tokens are revoked: it must log in again.",
        "force_unpaired" => "The dongle is unpaired and any security hold is cleared.",
        "holds_released" => "The accounts held from pairing the dongle are released.",
        "group_created" => "The group is created.",
        "activated" => "The group is activated.",
        "deactivated" => "The group is deactivated.",
        "deleted" => "Deleted.",
        "sent" => "The frame was handed to the dongle.",
        "session_ended" => "The session is ended.",
        _ => return None,
    })
}

/// The signed-in user, as `GET /auth/me` answers.
#[derive(Debug, Clone)]
pub struct Me {
    pub email: String,
    pub admin: bool,
}

impl Me {
    pub fn from_json(v: &Value) -> Self {
        Self {
            email: v["email"].as_str().unwrap_or("").to_string(),
            admin: v["role"] == "super_admin",
        }
    }
}

/// Which entry of the main navigation a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    None,
    Dongles,
    Groups,
    Agents,
    Admin,
}

/// One page: its title, content, the scripts it needs beyond `app.js`, and who is signed in.
pub struct Page {
    pub title: String,
    pub nav: Nav,
    pub me: Option<Me>,
    /// The session's CSRF token, for the forms that work without JavaScript.
    pub csrf: String,
    pub notice: Option<String>,
    pub body: String,
    pub scripts: &'static [&'static str],
    pub status: StatusCode,
    /// Reload the page every this many seconds (a command still running, for browsers without
    /// JavaScript).
    pub refresh: Option<u32>,
}

impl Page {
    pub fn new(title: impl Into<String>, nav: Nav) -> Self {
        Self {
            title: title.into(),
            nav,
            me: None,
            csrf: String::new(),
            notice: None,
            body: String::new(),
            scripts: &[],
            status: StatusCode::OK,
            refresh: None,
        }
    }

    pub fn render(self) -> Response {
        let mut nav = String::new();
        if let Some(me) = &self.me {
            let mut items = vec![
                (Nav::Dongles, "/dongles", "Dongles"),
                (Nav::Groups, "/groups", "Groups"),
                (Nav::Agents, "/agents", "Agents"),
            ];
            if me.admin {
                items.push((Nav::Admin, "/admin/users", "Admin"));
            }
            let links: String = items
                .iter()
                .map(|(which, href, label)| {
                    let current = if *which == self.nav {
                        " aria-current=\"page\""
                    } else {
                        ""
                    };
                    format!("<li><a href=\"{href}\"{current}>{label}</a></li>")
                })
                .collect();
            let logout = api_form(
                &self.csrf,
                ApiForm {
                    method: "POST",
                    path: "/auth/logout",
                    next: "/login?notice=logged_out",
                    ok: "redirect",
                    class: "logout",
                    ..ApiForm::default()
                },
                &format!(
                    "<span class=\"who\" title=\"Signed in as\">{}</span> \
                     <button type=\"submit\" class=\"secondary\">Sign out</button>",
                    esc(&me.email)
                ),
            );
            nav = format!(
                "<nav aria-label=\"Main\"><ul>{links}</ul></nav><div class=\"account\">{logout}</div>"
            );
        }
        let notice = self
            .notice
            .as_deref()
            .and_then(notice_text)
            .map(|text| {
                format!(
                    "<p class=\"notice\" role=\"status\" data-notice>{}</p>",
                    esc(text)
                )
            })
            .unwrap_or_default();
        let scripts: String = std::iter::once("app.js")
            .chain(self.scripts.iter().copied())
            .map(|s| {
                format!(
                    "<script src=\"/assets/{s}?v={}\" defer></script>",
                    assets::version()
                )
            })
            .collect();
        let refresh = self
            .refresh
            .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">\n"))
            .unwrap_or_default();
        let html = format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             {refresh}<title>{title} · CAN bridge</title>\n\
             <link rel=\"stylesheet\" href=\"/assets/app.css?v={v}\">\n\
             <link rel=\"icon\" href=\"/assets/icon.svg?v={v}\" type=\"image/svg+xml\">\n\
             {scripts}\n</head>\n<body>\n\
             <a class=\"skip\" href=\"#main\">Skip to content</a>\n\
             <header class=\"top\"><a class=\"brand\" href=\"/\">CAN bridge</a>{nav}</header>\n\
             <main id=\"main\" tabindex=\"-1\">\n<h1>{title}</h1>\n{notice}\
             <noscript><p class=\"notice\">JavaScript is off: pages and forms work, but live parts \
             (presence, the live console, charts, countdowns) need it.</p></noscript>\n\
             {body}\n</main>\n</body>\n</html>\n",
            title = esc(&self.title),
            v = assets::version(),
            body = self.body,
        );
        (self.status, Html(html)).into_response()
    }
}

/// How a form reaches the API. Without JavaScript it posts to `/forms`, which calls the API with the
/// session and the CSRF token of the hidden field; with JavaScript `app.js` sends the same request
/// with `fetch()`. Field names may carry a type (`name:int`, `name:bool`, `name:words`, `name:hex`,
/// `name:opt`); see `forms`.
#[derive(Debug, Clone, Copy)]
pub struct ApiForm<'a> {
    pub method: &'a str,
    /// The API path below `/api/v1`.
    pub path: &'a str,
    /// Where to go on success; `{field}` is replaced by that field of the answer.
    pub next: &'a str,
    /// The notice code shown after a redirect.
    pub notice: &'a str,
    /// What the script does on success: `redirect`, `refresh` (the page's regions) or a page handler.
    pub ok: &'a str,
    /// Without JavaScript, show the answer's fields on a page of their own instead of redirecting.
    pub show_result: bool,
    pub class: &'a str,
    pub id: &'a str,
    /// The accessible name of the form, when it needs one.
    pub label: &'a str,
}

impl Default for ApiForm<'_> {
    fn default() -> Self {
        Self {
            method: "POST",
            path: "",
            next: "",
            notice: "",
            ok: "refresh",
            show_result: false,
            class: "",
            id: "",
            label: "",
        }
    }
}

/// A form that reaches the API (see [`ApiForm`]), with an alert line for its errors.
pub fn api_form(csrf: &str, form: ApiForm<'_>, inner: &str) -> String {
    let id = if form.id.is_empty() {
        String::new()
    } else {
        format!(" id=\"{}\"", esc(form.id))
    };
    let label = if form.label.is_empty() {
        String::new()
    } else {
        format!(" aria-label=\"{}\"", esc(form.label))
    };
    let show = if form.show_result {
        "<input type=\"hidden\" name=\"_show\" value=\"result\">"
    } else {
        ""
    };
    format!(
        "<form method=\"post\" action=\"/forms\" class=\"api-form {class}\"{id}{label} data-ok=\"{ok}\">\
         <input type=\"hidden\" name=\"_csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"_method\" value=\"{method}\">\
         <input type=\"hidden\" name=\"_api\" value=\"{path}\">\
         <input type=\"hidden\" name=\"_next\" value=\"{next}\">\
         <input type=\"hidden\" name=\"_notice\" value=\"{notice}\">{show}\
         {inner}<p class=\"form-error\" role=\"alert\" hidden></p>\
         <p class=\"form-status\" role=\"status\" aria-live=\"polite\"></p></form>",
        class = esc(form.class),
        ok = esc(form.ok),
        csrf = esc(csrf),
        method = esc(form.method),
        path = esc(form.path),
        next = esc(form.next),
        notice = esc(form.notice),
    )
}

/// A labelled input. `id` is also the label's target; `attrs` is trusted markup (constant attributes).
pub fn field(id: &str, label: &str, input: &str) -> String {
    format!(
        "<div class=\"field\"><label for=\"{id}\">{label}</label>{input}</div>",
        id = esc(id),
        label = esc(label),
    )
}

/// `<input>` with a label. `value` is escaped; `attrs` is trusted markup.
pub fn input(id: &str, name: &str, label: &str, kind: &str, value: &str, attrs: &str) -> String {
    field(
        id,
        label,
        &format!(
            "<input id=\"{id}\" name=\"{name}\" type=\"{kind}\" value=\"{value}\" {attrs}>",
            id = esc(id),
            name = esc(name),
            kind = esc(kind),
            value = esc(value),
        ),
    )
}

/// A checkbox carrying `name:bool`, with the hidden `false` before it so that unchecked says false.
pub fn checkbox(id: &str, name: &str, label: &str, checked: bool) -> String {
    format!(
        "<div class=\"field check\"><input type=\"hidden\" name=\"{name}:bool\" value=\"false\">\
         <input id=\"{id}\" name=\"{name}:bool\" type=\"checkbox\" value=\"true\"{checked}>\
         <label for=\"{id}\">{label}</label></div>",
        id = esc(id),
        name = esc(name),
        label = esc(label),
        checked = if checked { " checked" } else { "" },
    )
}

/// `<select>` with a label; `options` are (value, text) pairs.
pub fn select(
    id: &str,
    name: &str,
    label: &str,
    options: &[(String, String)],
    chosen: &str,
) -> String {
    let options: String = options
        .iter()
        .map(|(value, text)| {
            let selected = if value == chosen { " selected" } else { "" };
            format!(
                "<option value=\"{}\"{selected}>{}</option>",
                esc(value),
                esc(text)
            )
        })
        .collect();
    field(
        id,
        label,
        &format!(
            "<select id=\"{id}\" name=\"{name}\">{options}</select>",
            id = esc(id),
            name = esc(name)
        ),
    )
}

/// A table in a scrolling wrapper (narrow screens scroll the table, not the page). `head` and `rows`
/// are markup already escaped.
pub fn table(caption: &str, head: &[&str], rows: &[String], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"empty\">{}</p>", esc(empty));
    }
    let head: String = head
        .iter()
        .map(|h| format!("<th scope=\"col\">{}</th>", esc(h)))
        .collect();
    format!(
        "<div class=\"table-wrap\" tabindex=\"0\" role=\"region\" aria-label=\"{cap}\"><table>\
         <caption class=\"visually-hidden\">{cap}</caption><thead><tr>{head}</tr></thead>\
         <tbody>{rows}</tbody></table></div>",
        cap = esc(caption),
        rows = rows.concat()
    )
}

/// A badge for presence.
pub fn presence(online: bool) -> &'static str {
    if online {
        "<span class=\"badge ok\" data-presence>online</span>"
    } else {
        "<span class=\"badge off\" data-presence>offline</span>"
    }
}

/// A badge for a state word (ownership state, group state, command status).
pub fn state_badge(state: &str) -> String {
    let class = match state {
        "ACTIVE" | "CROSS_INSTANCE" | "CLAIMED_ACTIVE" | "done" | "active" => "ok",
        "DEGRADED" | "BUFFER_PRESSURE" | "queued" | "running" | "RESET_DETECTED" => "warn",
        "SECURITY_HOLD" | "error" | "timeout" | "disabled" => "bad",
        _ => "off",
    };
    format!("<span class=\"badge {class}\">{}</span>", esc(state))
}

/// Paging links for an API page answer (`page`, `per_page`, `total`), keeping the page's query.
pub fn pager(base: &str, query: &[(String, String)], json: &Value) -> String {
    let page = json["page"].as_u64().unwrap_or(1);
    let per_page = json["per_page"].as_u64().unwrap_or(50).max(1);
    let total = json["total"].as_u64().unwrap_or(0);
    let pages = total.div_ceil(per_page).max(1);
    let link = |p: u64, text: &str, rel: &str| {
        let mut q: Vec<String> = query
            .iter()
            .filter(|(k, v)| k != "page" && !v.is_empty())
            .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
            .collect();
        q.push(format!("page={p}"));
        format!(
            "<a href=\"{}?{}\" rel=\"{rel}\">{text}</a>",
            esc(base),
            esc(&q.join("&"))
        )
    };
    let mut out = format!(
        "<nav class=\"pager\" aria-label=\"Pages\"><span>Page {page} of {pages} ({total} in all)</span>"
    );
    if page > 1 {
        out.push_str(&link(page - 1, "Previous page", "prev"));
    }
    if page < pages {
        out.push_str(&link(page + 1, "Next page", "next"));
    }
    out.push_str("</nav>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\" title='y'>&</a>"),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(t(&Value::String("<script>".into())), "&lt;script&gt;");
        assert_eq!(t(&Value::Null), "—");
    }

    #[test]
    fn notices_are_fixed_texts() {
        assert!(notice_text("signed_out").is_some());
        assert!(notice_text("<b>anything</b>").is_none());
    }

    #[test]
    fn url_encoding_keeps_only_safe_bytes() {
        assert_eq!(url_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
