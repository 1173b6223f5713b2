//! Administration: only a super_admin sees it; disabling ends sessions and revokes agent tokens; the
//! audit log records admin actions and can be searched.

use crate::common;

use common::{PASSWORD, read, spawn_app};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use bridge_server::db::MIGRATOR;
use bridge_server::users::Role;

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_non_admin_is_told_admin_routes_do_not_exist(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (user, _) = app.logged_in("user@example.com", Role::User).await;
    let victim = app.create_user("victim@example.com", Role::User).await;
    for path in ["/admin/users", "/admin/audit-logs", "/admin/dongles"] {
        read(user.get(path).await)
            .await
            .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    for action in ["disable", "enable"] {
        let res = user
            .post_json(&format!("/admin/users/{victim}/{action}"), json!({}))
            .await;
        read(res)
            .await
            .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    let anon = app.client();
    read(anon.get("/admin/users").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn users_are_searched_and_paged(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (admin, _) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    for i in 0..5 {
        app.create_user(&format!("tech{i}@garage.example"), Role::User)
            .await;
    }
    let page = read(admin.get("/admin/users?per_page=2&page=2").await).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert_eq!(page.json["total"], 6);
    assert_eq!(page.json["items"].as_array().unwrap().len(), 2);
    assert_eq!(page.json["page"], 2);

    let found = read(admin.get("/admin/users?email=GARAGE&role=user").await).await;
    assert_eq!(found.json["total"], 5);
    let found = read(admin.get("/admin/users?role=super_admin").await).await;
    assert_eq!(found.json["total"], 1);
    assert_eq!(found.json["items"][0]["email"], "admin@example.com");
    assert!(!found.text.contains("password"), "{}", found.text);
    let none = read(admin.get("/admin/users?email=%25").await).await;
    assert_eq!(none.json["total"], 0, "LIKE wildcards are literal");
    read(admin.get("/admin/users?status=sleeping").await)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn disabling_ends_sessions_and_revokes_agent_tokens_and_is_audited(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (admin, admin_id) = app.logged_in("admin@example.com", Role::SuperAdmin).await;
    let (tech, tech_id) = app.logged_in("tech@example.com", Role::User).await;
    sqlx::query(
        "WITH a AS (INSERT INTO agents (user_id, agent_name) VALUES ($1, 'bench') RETURNING id) \
         INSERT INTO agent_tokens (agent_id, token_hash) SELECT id, 'h1' FROM a",
    )
    .bind(tech_id)
    .execute(&app.pool)
    .await
    .unwrap();

    let answer = read(
        admin
            .http
            .post(admin.api(&format!("/admin/users/{tech_id}/disable")))
            .header("X-CSRF-Token", admin.csrf.as_deref().unwrap())
            .header("User-Agent", "admin-console/1.0")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.json["status"], "disabled");
    read(tech.get("/auth/me").await)
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "AUTH_REQUIRED");
    assert_eq!(
        app.count("SELECT count(*) FROM agent_tokens WHERE revoked_at IS NULL")
            .await,
        0
    );

    // The disabled user cannot log in; enabling lets them in again.
    let mut again = app.client();
    again
        .login("tech@example.com", PASSWORD)
        .await
        .assert_error(StatusCode::FORBIDDEN, "FORBIDDEN");
    let answer = read(
        admin
            .post_json(&format!("/admin/users/{tech_id}/enable"), json!({}))
            .await,
    )
    .await;
    assert_eq!(answer.json["status"], "active");
    assert_eq!(
        again.login("tech@example.com", PASSWORD).await.status,
        StatusCode::OK
    );

    // An admin cannot lock themselves out.
    let answer = read(
        admin
            .post_json(&format!("/admin/users/{admin_id}/disable"), json!({}))
            .await,
    )
    .await;
    answer.assert_error(StatusCode::CONFLICT, "CONFLICT");

    // The audit log has the action, with actor, IP, user agent, target and before/after.
    let log = read(
        admin
            .get(&format!(
                "/admin/audit-logs?action=admin.user_disabled&actor={admin_id}"
            ))
            .await,
    )
    .await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.text);
    assert_eq!(log.json["total"], 1);
    let entry = &log.json["items"][0];
    assert_eq!(entry["target_type"], "user");
    assert_eq!(entry["target_id"], tech_id.to_string());
    assert_eq!(entry["ip"], "127.0.0.1");
    assert_eq!(entry["user_agent"], "admin-console/1.0");
    assert_eq!(entry["details"]["before"]["status"], "active");
    assert_eq!(entry["details"]["after"]["status"], "disabled");
    assert_eq!(entry["details"]["sessions_ended"], 1);
    assert_eq!(entry["details"]["agent_tokens_revoked"], 1);

    let by_target = read(
        admin
            .get(&format!(
                "/admin/audit-logs?target_type=user&target_id={tech_id}"
            ))
            .await,
    )
    .await;
    assert!(by_target.json["total"].as_i64().unwrap() >= 2);
    let future = read(
        admin
            .get("/admin/audit-logs?since=2999-01-01T00:00:00Z")
            .await,
    )
    .await;
    assert_eq!(future.json["total"], 0);
    let past = read(
        admin
            .get("/admin/audit-logs?until=2000-01-01T00:00:00Z")
            .await,
    )
    .await;
    assert_eq!(past.json["total"], 0);
    let all = read(admin.get("/admin/audit-logs?per_page=1").await).await;
    assert_eq!(all.json["items"].as_array().unwrap().len(), 1);
    assert!(all.json["total"].as_i64().unwrap() > 3);

    let unknown = uuid::Uuid::new_v4();
    read(
        admin
            .post_json(&format!("/admin/users/{unknown}/disable"), json!({}))
            .await,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "NOT_FOUND");
}

/// Administrators see every dongle, with its owner, state, agent and group, filtered, and act on one
/// from the list (force-unpair, which also releases a hold).
#[sqlx::test(migrator = "MIGRATOR")]
async fn admins_list_every_dongle_with_filters_and_release_a_hold_from_it(pool: PgPool) {
    use common::dongle::paired;
    let app = spawn_app(pool.clone()).await;
    let alice = paired(&app, "alice@example.com", "00000000000000b1", 0).await;
    let bob = paired(&app, "bob@example.com", "00000000000000b2", 0).await;
    sqlx::query("UPDATE dongles SET ownership_state = 'SECURITY_HOLD' WHERE id = $1")
        .bind(bob.dongle_id)
        .execute(&pool)
        .await
        .unwrap();
    let (admin, _) = app.logged_in("root@example.com", Role::SuperAdmin).await;
    let all = read(admin.get("/admin/dongles").await).await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text);
    assert_eq!(all.json["total"], 2);
    let row = all.json["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == "00000000000000b1")
        .cloned()
        .unwrap();
    assert_eq!(row["owner_email"], "alice@example.com");
    assert_eq!(row["ownership_state"], "CLAIMED_ACTIVE");
    assert_eq!(row["agent_id"], alice.agent.agent_id.to_string());
    assert_eq!(row["agent_online"], true);

    let ids = |page: &serde_json::Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_string())
            .collect()
    };
    for (query, expected) in [
        ("state=SECURITY_HOLD", vec!["00000000000000b2"]),
        ("owner=ALICE", vec!["00000000000000b1"]),
        ("device=0b2", vec!["00000000000000b2"]),
        ("owner=%25", vec![]),
    ] {
        let page = read(admin.get(&format!("/admin/dongles?{query}")).await).await;
        assert_eq!(page.status, StatusCode::OK, "{query}: {}", page.text);
        assert_eq!(ids(&page.json), expected, "{query}");
    }
    read(admin.get("/admin/dongles?state=NOPE").await)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    // Released from the list: unclaimed again.
    let released = admin
        .post_json(
            &format!("/admin/dongles/{}/force-unpair", bob.dongle_id),
            json!({}),
        )
        .await;
    assert_eq!(released.status(), StatusCode::OK);
    let page = read(admin.get("/admin/dongles?state=UNCLAIMED").await).await;
    assert_eq!(ids(&page.json), vec!["00000000000000b2"]);
}
