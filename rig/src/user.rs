//! A technician using the JSON API: signed in with a session cookie and the CSRF token, as any client
//! uses it, and pairing dongles with the PIN they show.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::dongle::{DonglePart, next_pin};

/// A signed-in user of `/api/v1`.
pub struct UserClient {
    http: reqwest::Client,
    base: String,
    csrf: String,
}

impl UserClient {
    pub async fn login(base: &str, email: &str, password: &str) -> anyhow::Result<Self> {
        let mut client = Self {
            http: reqwest::Client::builder()
                .cookie_store(true)
                .timeout(Duration::from_secs(30))
                .build()?,
            base: base.to_string(),
            csrf: String::new(),
        };
        let answer = client
            .call(
                Method::POST,
                "/auth/login",
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        client.csrf = answer["csrf_token"]
            .as_str()
            .context("the login answer has no CSRF token")?
            .to_string();
        Ok(client)
    }

    /// Calls `/api/v1{path}`; a status of 400 or more is an error naming the server's code and message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.base))
            .header("x-csrf-token", &self.csrf);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{method} {path} answered {status}: {} {}",
                value["code"].as_str().unwrap_or(""),
                value["message"].as_str().unwrap_or(&text)
            );
        }
        Ok(value)
    }

    /// Opens `/api/v1{path}` as a stream (a live console's server-sent events, say).
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}/api/v1{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        if !response.status().is_success() {
            bail!("GET {path} answered {}", response.status());
        }
        Ok(response)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::PUT, path, Some(body)).await
    }
}

/// Waits up to 30 s until the user's listing of `device_id` satisfies `check`; answers the listing.
pub async fn wait_dongle(
    user: &UserClient,
    device_id: &str,
    check: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    for _ in 0..300 {
        let list = user.get("/dongles").await?;
        if let Some(d) = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["device_id"] == device_id)
            && check(d)
        {
            return Ok(d.clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("dongle {device_id} did not reach the expected state within 30 s")
}

/// Pairs `dongle` to the user with the PIN it shows, as a technician would, and waits until its agent
/// serves it as owned (the agent holds its token then); answers the dongle's id.
pub async fn pair(user: &UserClient, dongle: &DonglePart) -> anyhow::Result<String> {
    let listed = wait_dongle(user, &dongle.device_id, |d| d["online"] == true).await?;
    let id = listed["id"].as_str().context("a dongle id")?.to_string();
    let mut events = dongle.sim.events();
    let started = user
        .post(
            &format!("/dongles/{id}/pairing-mode"),
            json!({"action": "start"}),
        )
        .await?;
    let pin = next_pin(&mut events).await?;
    user.post(
        &format!("/dongles/{id}/pairing-submit"),
        json!({"pairing_session_id": started["pairing_session_id"], "pin": pin}),
    )
    .await?;
    wait_dongle(user, &dongle.device_id, |d| {
        d["owned"] == true && d["online"] == true
    })
    .await?;
    Ok(id)
}
