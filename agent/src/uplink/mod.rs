//! The agent's link to the server: TLS settings, the JSON API (login, registration, the technician's
//! pairing calls) and the control WebSocket connection with its reconnect schedule.
//!
//! Nothing here knows about dongles; the daemon decides what to say, this module only carries it.

pub mod api;
pub mod backoff;
pub mod control;
pub mod tls;

/// The WebSocket URL of `path` on the server at `server_url` (`http` -> `ws`, `https` -> `wss`).
pub fn ws_url(server_url: &str, path: &str) -> String {
    let base = server_url.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{base}{path}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ws_urls() {
        assert_eq!(
            super::ws_url("https://a.example/", "/ws/agent"),
            "wss://a.example/ws/agent"
        );
        assert_eq!(
            super::ws_url("http://127.0.0.1:8080", "/ws/agent"),
            "ws://127.0.0.1:8080/ws/agent"
        );
    }
}
