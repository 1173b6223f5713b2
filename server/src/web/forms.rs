//! `POST /forms`: how a dashboard form reaches the API without JavaScript.
//!
//! A form names its API call in hidden fields (`_method`, `_api` below `/api/v1`, `_csrf`, `_next`,
//! `_notice`, `_show`); its other fields become the JSON body, typed by a suffix of their name:
//!
//! | name | JSON |
//! |---|---|
//! | `x` | the text |
//! | `x:opt` | the text, or left out when empty |
//! | `x:int` | a number (left out when empty) |
//! | `x:hex` | a number written in hex, `0x` optional (left out when empty) |
//! | `x:bool` | true for `true`/`on`, else false (the last value of a name wins, so a hidden `false` before a checkbox says unchecked) |
//! | `x:words` | the words of the text, as an array |
//!
//! The API call carries the browser's session cookie and the form's CSRF token as `X-CSRF-Token`, so
//! the API checks it as for any client. On success the browser goes to `_next` (where `{field}` is
//! that field of the answer) with the `_notice`, or, with `_show=result`, sees the answer's fields on
//! a page (the one way to see a token shown once without JavaScript). On failure it sees the API's
//! message. `app.js` reads the same fields and sends the same request itself.

use axum::Form;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{Map, Value};

use super::api::{Ctx, Reply};
use super::html::{Nav, Page, esc, text, url_encode};

/// The typed body of a form, or what is wrong with a field.
pub fn body_of(fields: &[(String, String)]) -> Result<Map<String, Value>, String> {
    let mut body = Map::new();
    for (name, raw) in fields {
        if name.starts_with('_') {
            continue;
        }
        let (key, kind) = name.split_once(':').unwrap_or((name.as_str(), ""));
        let value = raw.trim();
        let parsed = match kind {
            "" => Some(Value::String(raw.clone())),
            "opt" => (!value.is_empty()).then(|| Value::String(value.to_string())),
            "int" if value.is_empty() => None,
            "int" => Some(Value::from(
                value
                    .parse::<i64>()
                    .map_err(|_| format!("{key} must be a whole number."))?,
            )),
            "hex" if value.is_empty() => None,
            "hex" => {
                let digits = value
                    .strip_prefix("0x")
                    .or_else(|| value.strip_prefix("0X"))
                    .unwrap_or(value);
                Some(Value::from(
                    i64::from_str_radix(digits, 16)
                        .map_err(|_| format!("{key} must be a number in hex."))?,
                ))
            }
            "bool" => Some(Value::Bool(matches!(value, "true" | "on" | "1"))),
            "words" => Some(Value::Array(
                value
                    .split_whitespace()
                    .map(|w| Value::String(w.to_string()))
                    .collect(),
            )),
            _ => return Err(format!("the form has a field of unknown type: {name}")),
        };
        match parsed {
            Some(v) => {
                body.insert(key.to_string(), v);
            }
            None => {
                body.remove(key);
            }
        }
    }
    Ok(body)
}

/// A path below `/api/v1` that a form may name: plain segments only.
fn api_path_ok(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("..")
        && !path.contains("//")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(&b))
}

/// A place on this site to go next: a local path, never another origin.
pub fn local_path(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control());
    if ok { next } else { "/" }
}

/// `next` with each `{field}` replaced by that field of `answer`, percent-encoded.
pub fn fill(next: &str, answer: &Value) -> String {
    let mut out = String::new();
    let mut rest = next;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                let key = &after[..end];
                let value = match &answer[key] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                out.push_str(&url_encode(&value));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn meta<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// `POST /forms`.
pub async fn submit(
    ctx: Ctx,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let back = headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.find("://").map(|i| &r[i + 3..]))
        .and_then(|r| r.find('/').map(|i| &r[i..]))
        .map(local_path)
        .unwrap_or("/")
        .to_string();
    if !same_origin(&headers) {
        return refused(
            "/",
            "This form was sent from another site: open the page on this server and send it from there.",
        );
    }
    let method = match meta(&fields, "_method") {
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        _ => return refused(&back, "The form names no method the API takes."),
    };
    let path = meta(&fields, "_api");
    if !api_path_ok(path) {
        return refused(&back, "The form names no API path.");
    }
    let body = match body_of(&fields) {
        Ok(body) => body,
        Err(message) => return refused(&back, &message),
    };
    let body = (method != Method::DELETE || !body.is_empty()).then_some(Value::Object(body));
    let csrf = meta(&fields, "_csrf");
    let reply = ctx
        .call(
            method,
            path,
            body.as_ref(),
            (!csrf.is_empty()).then_some(csrf),
        )
        .await;
    if !reply.ok() {
        if reply.signed_out() && path != "/auth/login" {
            return Redirect::to("/login?notice=signed_out").into_response();
        }
        return failed(&back, &reply);
    }
    let cookies: Vec<_> = reply
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    let mut response = if meta(&fields, "_show") == "result" {
        result_page(&reply, local_path(meta(&fields, "_next")))
    } else {
        let mut next = fill(local_path(meta(&fields, "_next")), &reply.json);
        let notice = meta(&fields, "_notice");
        if super::html::notice_text(notice).is_some() {
            next.push(if next.contains('?') { '&' } else { '?' });
            next.push_str("notice=");
            next.push_str(notice);
        }
        Redirect::to(local_path(&next)).into_response()
    };
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Whether the browser says the form comes from a page of this server. Forms that need a session also
/// carry its CSRF token; this also stops a cross-site form from signing a browser in to an account of
/// someone else's (the sign-in form has no session to bind a token to).
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin.split_once("://").map(|(_, h)| h) == Some(host),
        // Without either header (old browsers, scripts) the CSRF token and SameSite cookie decide.
        _ => true,
    }
}

fn refused(back: &str, message: &str) -> Response {
    let reply = Reply {
        status: StatusCode::BAD_REQUEST,
        json: serde_json::json!({"code": "VALIDATION_ERROR", "message": message}),
        headers: HeaderMap::new(),
    };
    failed(back, &reply)
}

fn failed(back: &str, reply: &Reply) -> Response {
    let mut page = Page::new("That did not work", Nav::None);
    page.status = if reply.status.is_client_error() {
        reply.status
    } else {
        StatusCode::BAD_GATEWAY
    };
    page.body = format!(
        "<p class=\"error\" role=\"alert\">{}</p><p><code>{}</code></p>\
         <p><a href=\"{}\">Go back</a></p>",
        esc(&reply.message()),
        esc(reply.code()),
        esc(back)
    );
    page.render()
}

fn result_page(reply: &Reply, next: &str) -> Response {
    let mut page = Page::new("Done", Nav::None);
    let mut rows = String::new();
    let mut secret = false;
    if let Some(fields) = reply.json.as_object() {
        for (key, value) in fields {
            let is_secret = key.contains("token");
            secret |= is_secret;
            rows.push_str(&format!(
                "<dt>{}</dt><dd><code{}>{}</code></dd>",
                esc(key),
                if is_secret { " class=\"secret\"" } else { "" },
                esc(&text(value))
            ));
        }
    }
    let warning = if secret {
        "<p class=\"notice warn\" role=\"status\">Copy the token now: it is shown this once, and \
         the server keeps only its hash.</p>"
    } else {
        ""
    };
    page.body = format!(
        "{warning}<dl class=\"answer\">{rows}</dl><p><a href=\"{}\">Continue</a></p>",
        esc(next)
    );
    page.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn typed_fields_become_json() {
        let body = body_of(&pairs(&[
            ("_csrf", "x"),
            ("bitrate:int", "500000"),
            ("use_raw:bool", "false"),
            ("use_raw:bool", "true"),
            ("auto_retx:bool", "false"),
            ("can_id:hex", "0x7DF"),
            ("args:words", " a  b "),
            ("prescaler:int", ""),
            ("note:opt", ""),
            ("mode", "normal"),
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(body),
            json!({"bitrate": 500000, "use_raw": true, "auto_retx": false, "can_id": 2015,
                   "args": ["a", "b"], "mode": "normal"})
        );
        assert!(body_of(&pairs(&[("bitrate:int", "fast")])).is_err());
        assert!(body_of(&pairs(&[("x:eval", "1")])).is_err());
    }

    #[test]
    fn only_local_paths_and_plain_api_paths() {
        assert_eq!(local_path("/dongles"), "/dongles");
        assert_eq!(local_path("//evil.example"), "/");
        assert_eq!(local_path("https://evil.example"), "/");
        assert_eq!(local_path("/\\evil"), "/");
        assert!(api_path_ok("/dongles/0b5f/pairing-mode"));
        assert!(!api_path_ok("/../healthz"));
        assert!(!api_path_ok("/dongles?x=1"));
    }

    #[test]
    fn forms_from_other_sites_are_refused() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h));
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h));
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&h));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "bridge.example:8080".parse().unwrap());
        h.insert(
            header::ORIGIN,
            "https://bridge.example:8080".parse().unwrap(),
        );
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
    }

    #[test]
    fn next_takes_fields_of_the_answer() {
        let answer = json!({"pairing_session_id": "a b", "n": 3});
        assert_eq!(
            fill(
                "/d/1?pairing={pairing_session_id}&n={n}&x={missing}",
                &answer
            ),
            "/d/1?pairing=a%20b&n=3&x="
        );
    }
}
