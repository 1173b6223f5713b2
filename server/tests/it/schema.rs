//! The v0.7 schema: migrations, rollback, and the constraints that make it stronger than the reference.
//!
//! Every test gets its own fresh database from `#[sqlx::test]`.

use bridge_server::db::MIGRATOR;
use sqlx::{PgPool, Row};
use uuid::Uuid;

const TABLES: [&str; 15] = [
    "users",
    "sessions",
    "agents",
    "agent_tokens",
    "dongles",
    "dongle_tokens",
    "dongle_groups",
    "dongle_group_members",
    "can_configs",
    "commands",
    "audit_logs",
    "email_verification_tokens",
    "password_reset_tokens",
    "email_outbox",
    "cli_telemetry",
];

/// A text snapshot of everything the migrations define: columns, constraints, indexes, triggers, enum
/// labels and functions. Two equal snapshots mean two equal schemas.
async fn schema_snapshot(pool: &PgPool) -> Vec<String> {
    let queries = [
        "SELECT 'col ' || table_name || '.' || column_name || ' ' || data_type || ' ' || udt_name || ' ' \
           || is_nullable || ' ' || coalesce(column_default, '-') \
         FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
        "SELECT 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
           AND conrelid <> coalesce(to_regclass('_sqlx_migrations'), 0) ORDER BY 1",
        "SELECT 'idx ' || indexdef FROM pg_indexes \
         WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations' ORDER BY 1",
        "SELECT 'trg ' || event_object_table || ' ' || trigger_name || ' ' || action_timing || ' ' \
           || event_manipulation || ' ' || action_statement \
         FROM information_schema.triggers WHERE trigger_schema = 'public' ORDER BY 1",
        "SELECT 'enum ' || t.typname || ' ' || e.enumsortorder || ' ' || e.enumlabel \
         FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid ORDER BY 1",
        "SELECT 'fn ' || proname || ' ' || md5(prosrc) FROM pg_proc \
         WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    ];
    let mut lines = Vec::new();
    for q in queries {
        let rows: Vec<String> = sqlx::query_scalar(q).fetch_all(pool).await.unwrap();
        lines.extend(rows);
    }
    lines
}

async fn user(pool: &PgPool, email: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO users (email, password_hash) VALUES ($1, 'x') RETURNING id")
        .bind(email)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn dongle(pool: &PgPool, device_id: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO dongles (device_id) VALUES ($1) RETURNING id")
        .bind(device_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn group(pool: &PgPool, user: Uuid, a: Uuid, b: Uuid) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(user)
    .bind(a)
    .bind(b)
    .fetch_one(pool)
    .await
}

/// The SQLSTATE and constraint name of a database error.
fn db_error(err: sqlx::Error) -> (String, String) {
    let db = err.as_database_error().expect("a database error");
    (
        db.code().unwrap_or_default().to_string(),
        db.constraint().unwrap_or_default().to_string(),
    )
}

const UNIQUE_VIOLATION: &str = "23505";
const CHECK_VIOLATION: &str = "23514";
const FOREIGN_KEY_VIOLATION: &str = "23503";

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_an_empty_database(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    for table in TABLES {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(found.as_deref(), Some(table), "table {table} missing");
    }
    // Every timestamp column is timestamptz.
    let naive: Vec<String> = sqlx::query_scalar(
        "SELECT table_name || '.' || column_name FROM information_schema.columns \
         WHERE table_schema = 'public' AND data_type = 'timestamp without time zone'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(naive.is_empty(), "columns without time zone: {naive:?}");
}

#[sqlx::test(migrations = false)]
async fn up_down_up_leaves_the_same_schema(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    let first = schema_snapshot(&pool).await;
    assert!(first.len() > 100, "the snapshot should see the schema");

    MIGRATOR.undo(&pool, 0).await.unwrap();
    let empty = schema_snapshot(&pool).await;
    assert!(empty.is_empty(), "down left objects behind: {empty:?}");

    MIGRATOR.run(&pool).await.unwrap();
    let second = schema_snapshot(&pool).await;
    assert_eq!(first, second);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_never_holds_the_same_dongle_twice(pool: PgPool) {
    let u = user(&pool, "a@example.com").await;
    let d1 = dongle(&pool, "0011223344556677").await;
    let d2 = dongle(&pool, "8899aabbccddeeff").await;
    group(&pool, u, d1, d2).await.expect("a valid group");

    let d3 = dongle(&pool, "0000000000000003").await;
    let err = group(&pool, u, d3, d3).await.unwrap_err();
    assert_eq!(
        db_error(err),
        (
            CHECK_VIOLATION.to_string(),
            "dongle_groups_distinct_sides".to_string()
        )
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongle_joins_at_most_one_group_whichever_side(pool: PgPool) {
    let u = user(&pool, "a@example.com").await;
    let a = dongle(&pool, "00000000000000aa").await;
    let b = dongle(&pool, "00000000000000bb").await;
    let c = dongle(&pool, "00000000000000cc").await;
    group(&pool, u, a, b).await.unwrap();

    // a is side A and b side B of the existing group; try each as each side of a new group.
    for (x, y, what) in [
        (a, c, "A as A"),
        (c, a, "A as B"),
        (b, c, "B as A"),
        (c, b, "B as B"),
    ] {
        let err = group(&pool, u, x, y).await.unwrap_err();
        assert_eq!(db_error(err).0, UNIQUE_VIOLATION, "{what} was accepted");
    }
    // The same pair in the other order is rejected too.
    let err = group(&pool, u, b, a).await.unwrap_err();
    assert_eq!(db_error(err).0, UNIQUE_VIOLATION);

    let groups: i64 = sqlx::query_scalar("SELECT count(*) FROM dongle_groups")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(groups, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_concurrent_groups_cannot_share_a_dongle(pool: PgPool) {
    let u = user(&pool, "a@example.com").await;
    let a = dongle(&pool, "00000000000000aa").await;
    let b = dongle(&pool, "00000000000000bb").await;
    let c = dongle(&pool, "00000000000000cc").await;

    // The first transaction makes (a, b) and holds its transaction open.
    let mut first = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id) VALUES ($1, $2, $3)",
    )
    .bind(u)
    .bind(a)
    .bind(b)
    .execute(&mut *first)
    .await
    .unwrap();

    // The second, on another connection, makes (c, a): it must wait for the first, then fail.
    let pool2 = pool.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool2.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO dongle_groups (user_id, dongle_a_id, dongle_b_id) VALUES ($1, $2, $3)",
        )
        .bind(u)
        .bind(c)
        .bind(a)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    });
    first.commit().await.unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert_eq!(db_error(err).0, UNIQUE_VIOLATION);

    let members: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT dongle_id, side::text FROM dongle_group_members ORDER BY side")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(members, vec![(a, "a".to_string()), (b, "b".to_string())]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dongle_in_a_group_cannot_be_deleted(pool: PgPool) {
    let u = user(&pool, "a@example.com").await;
    let a = dongle(&pool, "00000000000000aa").await;
    let b = dongle(&pool, "00000000000000bb").await;
    let g = group(&pool, u, a, b).await.unwrap();

    let err = sqlx::query("DELETE FROM dongles WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(db_error(err).0, FOREIGN_KEY_VIOLATION);

    // Once the group is gone, so is the membership, and the dongle can go.
    sqlx::query("DELETE FROM dongle_groups WHERE id = $1")
        .bind(g)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM dongles WHERE id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    let c = dongle(&pool, "00000000000000cc").await;
    group(&pool, u, b, c)
        .await
        .expect("b is free again after its group was deleted");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn token_hashes_are_unique_and_a_dongle_has_one_token(pool: PgPool) {
    let u = user(&pool, "a@example.com").await;
    let agent: Uuid = sqlx::query_scalar(
        "INSERT INTO agents (user_id, agent_name) VALUES ($1, 'bench') RETURNING id",
    )
    .bind(u)
    .fetch_one(&pool)
    .await
    .unwrap();

    let inserts = [
        (
            "INSERT INTO agent_tokens (agent_id, token_hash) VALUES ($1, 'h1')",
            agent,
            "agent_tokens_token_hash_key",
        ),
        (
            "INSERT INTO email_verification_tokens (user_id, token_hash, expires_at) VALUES ($1, 'h1', now())",
            u,
            "email_verification_tokens_token_hash_key",
        ),
        (
            "INSERT INTO password_reset_tokens (user_id, token_hash, expires_at) VALUES ($1, 'h1', now())",
            u,
            "password_reset_tokens_token_hash_key",
        ),
    ];
    for (sql, owner, constraint) in inserts {
        sqlx::query(sql).bind(owner).execute(&pool).await.unwrap();
        let err = sqlx::query(sql)
            .bind(owner)
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(
            db_error(err),
            (UNIQUE_VIOLATION.to_string(), constraint.to_string())
        );
    }

    let d = dongle(&pool, "0011223344556677").await;
    let insert_token = "INSERT INTO dongle_tokens (dongle_id, key_version, nonce, ciphertext) \
                        VALUES ($1, 1, decode(repeat('00', 12), 'hex'), decode(repeat('00', 48), 'hex'))";
    sqlx::query(insert_token)
        .bind(d)
        .execute(&pool)
        .await
        .unwrap();
    let err = sqlx::query(insert_token)
        .bind(d)
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        db_error(err),
        (
            UNIQUE_VIOLATION.to_string(),
            "dongle_tokens_dongle_id_key".to_string()
        )
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bad_device_ids_are_rejected(pool: PgPool) {
    for bad in [
        "ABC",
        "001122334455667",
        "0011223344556677AA",
        "00112233445566AA",
        "001122334455667g",
        "",
    ] {
        let err = sqlx::query("INSERT INTO dongles (device_id) VALUES ($1)")
            .bind(bad)
            .execute(&pool)
            .await
            .unwrap_err();
        assert_eq!(
            db_error(err),
            (
                CHECK_VIOLATION.to_string(),
                "dongles_device_id_format".to_string()
            ),
            "{bad:?} was accepted"
        );
    }
    dongle(&pool, "00112233445566aa").await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn session_queries_use_their_indexes(pool: PgPool) {
    // 200 users with 50 sessions each; one session in a hundred has expired.
    sqlx::query(
        "INSERT INTO users (email, password_hash) \
         SELECT 'user' || g || '@example.com', 'x' FROM generate_series(1, 200) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO sessions (id, user_id, expires_at) \
         SELECT md5(u.id::text || s), u.id, \
                CASE WHEN s % 100 = 0 THEN now() - interval '1 hour' ELSE now() + interval '1 hour' END \
         FROM users u, generate_series(1, 50) s",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE sessions")
        .execute(&pool)
        .await
        .unwrap();

    let one_user: Uuid = sqlx::query_scalar("SELECT id FROM users LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    let plan_for = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(sql)
                .bind(one_user)
                .fetch_all(&pool)
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let expired = plan_for(
        "EXPLAIN SELECT id FROM sessions WHERE expires_at < now() AND $1::uuid IS NOT NULL",
    )
    .await;
    assert!(
        expired.contains("sessions_expires_at_idx"),
        "plan: {expired}"
    );
    let by_user = plan_for("EXPLAIN SELECT id FROM sessions WHERE user_id = $1").await;
    assert!(by_user.contains("sessions_user_id_idx"), "plan: {by_user}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn deleting_a_user_removes_their_sessions_and_agents_and_keeps_the_audit(pool: PgPool) {
    let u = user(&pool, "gone@example.com").await;
    let keep = user(&pool, "stays@example.com").await;
    sqlx::query("INSERT INTO sessions (id, user_id, expires_at) VALUES ('s1', $1, now()), ('s2', $2, now())")
        .bind(u)
        .bind(keep)
        .execute(&pool)
        .await
        .unwrap();
    let agent: Uuid = sqlx::query_scalar(
        "INSERT INTO agents (user_id, agent_name) VALUES ($1, 'bench') RETURNING id",
    )
    .bind(u)
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO agent_tokens (agent_id, token_hash) VALUES ($1, 'h')")
        .bind(agent)
        .execute(&pool)
        .await
        .unwrap();
    let d = dongle(&pool, "0011223344556677").await;
    sqlx::query(
        "UPDATE dongles SET owner_user_id = $1, ownership_state = 'CLAIMED_ACTIVE' WHERE id = $2",
    )
    .bind(u)
    .bind(d)
    .execute(&pool)
    .await
    .unwrap();
    let audit: Uuid = sqlx::query_scalar(
        "INSERT INTO audit_logs (actor_user_id, action, details) VALUES ($1, 'auth.login', '{}') RETURNING id",
    )
    .bind(u)
    .fetch_one(&pool)
    .await
    .unwrap();

    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(u)
        .execute(&pool)
        .await
        .unwrap();

    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM sessions").await, 1);
    assert_eq!(count("SELECT count(*) FROM agents").await, 0);
    assert_eq!(count("SELECT count(*) FROM agent_tokens").await, 0);
    let actor: Option<Uuid> =
        sqlx::query_scalar("SELECT actor_user_id FROM audit_logs WHERE id = $1")
            .bind(audit)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(actor, None, "the audit entry stays, without its actor");
    let owner: Option<Uuid> = sqlx::query_scalar("SELECT owner_user_id FROM dongles WHERE id = $1")
        .bind(d)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, None, "the dongle stays, without its owner");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn updated_at_is_kept_by_the_database(pool: PgPool) {
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO users (email, password_hash, created_at, updated_at) \
         VALUES ('a@example.com', 'x', now() - interval '1 day', now() - interval '1 day') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE users SET status = 'disabled' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let fresh: bool = sqlx::query_scalar(
        "SELECT updated_at > now() - interval '1 minute' AND created_at < now() - interval '1 hour' FROM users WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(fresh);

    // Emails are stored normalised; the database refuses anything else.
    let err =
        sqlx::query("INSERT INTO users (email, password_hash) VALUES ('Mixed@Example.com', 'x')")
            .execute(&pool)
            .await
            .unwrap_err();
    assert_eq!(db_error(err).0, CHECK_VIOLATION);
}
