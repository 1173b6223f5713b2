//! A paired dongle for the tests of what its owner does with it (CAN configuration, commands, frames):
//! a user, their connected test agent that serves the dongle, and the pairing done through the API.

use bridge_server::users::Role;

use uuid::Uuid;

use super::agent::{self, TestAgent};
use super::{TestApp, TestClient};

/// A user with a paired dongle and the agent serving it.
pub struct Owner {
    pub client: TestClient,
    pub user_id: Uuid,
    /// The agent's bearer token.
    pub token: String,
    pub agent: TestAgent,
    pub dongle_id: Uuid,
}

/// Logs in a new user, connects an agent of theirs that reports `device_id` with `caps`, and pairs the
/// dongle to the user through the API (the test agent accepts the PIN it shows).
pub async fn paired(app: &TestApp, email: &str, device_id: &str, caps: u32) -> Owner {
    let (client, user_id) = app.logged_in(email, Role::User).await;
    let (_, token) = agent::register(&client).await;
    let agent = TestAgent::connect(&app.base, &token).await;
    agent.report_caps(&app.pool, &[(device_id, caps)]).await;
    let dongle_id = super::data::pair(app, &client, device_id).await;
    Owner {
        client,
        user_id,
        token,
        agent,
        dongle_id,
    }
}

/// How many audit entries of `action` exist.
pub async fn audit_count(app: &TestApp, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = $1")
        .bind(action)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}
