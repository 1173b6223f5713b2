//! Dongle tokens at rest (SPEC 3.5) in the real database: row-bound ciphertexts and key rotation.

use bridge_server::db::MIGRATOR;
use bridge_server::dongle_tokens::{self, DongleToken, KeyRing, RotateOptions, TokenError};
use sqlx::PgPool;
use uuid::Uuid;

async fn dongles_with_tokens(pool: &PgPool, keys: &KeyRing, n: usize) -> Vec<(Uuid, DongleToken)> {
    let mut out = Vec::new();
    for i in 0..n {
        let id: Uuid =
            sqlx::query_scalar("INSERT INTO dongles (device_id) VALUES ($1) RETURNING id")
                .bind(format!("{i:016x}"))
                .fetch_one(pool)
                .await
                .unwrap();
        let token = dongle_tokens::generate();
        dongle_tokens::store(pool, keys, id, &token).await.unwrap();
        out.push((id, token));
    }
    out
}

fn ring(versions: &[i32]) -> KeyRing {
    KeyRing::new(versions.iter().map(|&v| (v, [v as u8; 32]))).unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_ciphertext_decrypts_only_with_its_own_rows_aad(pool: PgPool) {
    let keys = ring(&[1]);
    let rows = dongles_with_tokens(&pool, &keys, 2).await;
    let (a, token_a) = &rows[0];
    let (b, _) = &rows[1];
    assert_eq!(
        &dongle_tokens::load(&pool, &keys, *a)
            .await
            .unwrap()
            .unwrap(),
        token_a
    );
    // Move A's ciphertext into B's row: it no longer decrypts.
    sqlx::query(
        "UPDATE dongle_tokens SET nonce = src.nonce, ciphertext = src.ciphertext \
         FROM (SELECT nonce, ciphertext FROM dongle_tokens WHERE dongle_id = $1) src WHERE dongle_id = $2",
    )
    .bind(a)
    .bind(b)
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        dongle_tokens::load(&pool, &keys, *b).await,
        Err(TokenError::Decrypt)
    ));
    // Relabel A's row with another key version (that exists): it no longer decrypts either.
    let keys2 = ring(&[1, 2]);
    sqlx::query("UPDATE dongle_tokens SET key_version = 2 WHERE dongle_id = $1")
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
    assert!(matches!(
        dongle_tokens::load(&pool, &keys2, *a).await,
        Err(TokenError::Decrypt)
    ));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn rotation_keeps_every_token_usable_is_idempotent_and_resumes(pool: PgPool) {
    let old = ring(&[1]);
    let rows = dongles_with_tokens(&pool, &old, 5).await;
    let keys = ring(&[1, 2]);
    let options = |max_batches| RotateOptions {
        to: 2,
        dry_run: false,
        batch_size: 2,
        max_batches,
    };

    // A dry run writes nothing.
    let dry = dongle_tokens::rotate(
        &pool,
        &keys,
        RotateOptions {
            dry_run: true,
            ..options(None)
        },
    )
    .await
    .unwrap();
    assert_eq!(dry.rows, 5);
    assert_eq!(dongle_tokens::status(&pool).await.unwrap(), vec![(1, 5)]);

    // Stopped after one batch, as if killed half way: every token still decrypts.
    let first = dongle_tokens::rotate(&pool, &keys, options(Some(1)))
        .await
        .unwrap();
    assert_eq!((first.rows, first.batches, first.remaining), (2, 1, 3));
    assert_eq!(
        dongle_tokens::status(&pool).await.unwrap(),
        vec![(1, 3), (2, 2)]
    );
    for (id, token) in &rows {
        assert_eq!(
            &dongle_tokens::load(&pool, &keys, *id)
                .await
                .unwrap()
                .unwrap(),
            token
        );
    }
    // Run again: it continues where it stopped.
    let rest = dongle_tokens::rotate(&pool, &keys, options(None))
        .await
        .unwrap();
    assert_eq!((rest.rows, rest.batches, rest.remaining), (3, 2, 0));
    assert_eq!(dongle_tokens::status(&pool).await.unwrap(), vec![(2, 5)]);
    // Idempotent: nothing left to do.
    let again = dongle_tokens::rotate(&pool, &keys, options(None))
        .await
        .unwrap();
    assert_eq!((again.rows, again.batches), (0, 0));
    for (id, token) in &rows {
        assert_eq!(
            &dongle_tokens::load(&pool, &keys, *id)
                .await
                .unwrap()
                .unwrap(),
            token
        );
    }
    // The old key can go now: key 2 alone opens every row.
    let only_new = KeyRing::new([(2, [2u8; 32])]).unwrap();
    for (id, token) in &rows {
        assert_eq!(
            &dongle_tokens::load(&pool, &only_new, *id)
                .await
                .unwrap()
                .unwrap(),
            token
        );
    }
    // One audit entry per batch.
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_logs WHERE action = 'keys.rotated_batch'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audited, 3);
}

/// One damaged row (or one sealed under a key nobody has any more) must not stop a rotation: the rows
/// around it are re-encrypted, and the damaged one is reported by id, left as it is, and counted as
/// remaining. Before, the first such row ended the whole rotation.
#[sqlx::test(migrator = "MIGRATOR")]
async fn keys_rotate_reports_and_skips_rows_it_cannot_decrypt(pool: PgPool) {
    let old = ring(&[1]);
    let rows = dongles_with_tokens(&pool, &old, 5).await;
    let mut ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    ids.sort();
    // The second row in rotation order is damaged.
    let damaged = ids[1];
    sqlx::query("UPDATE dongle_tokens SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 255) \
         WHERE dongle_id = $1")
        .bind(damaged)
        .execute(&pool)
        .await
        .unwrap();
    let keys = ring(&[1, 2]);
    let options = RotateOptions {
        to: 2,
        dry_run: true,
        batch_size: 2,
        max_batches: None,
    };
    let dry = dongle_tokens::rotate(&pool, &keys, options).await.unwrap();
    assert_eq!(dry.rows, 4);
    assert_eq!(dry.skipped, vec![damaged]);

    let done = dongle_tokens::rotate(
        &pool,
        &keys,
        RotateOptions {
            dry_run: false,
            ..options
        },
    )
    .await
    .unwrap();
    assert_eq!(done.rows, 4);
    assert_eq!(done.skipped, vec![damaged]);
    assert_eq!(done.remaining, 1);
    assert_eq!(
        dongle_tokens::status(&pool).await.unwrap(),
        vec![(1, 1), (2, 4)]
    );
    for (id, token) in rows.iter().filter(|(id, _)| *id != damaged) {
        assert_eq!(
            &dongle_tokens::load(&pool, &keys, *id)
                .await
                .unwrap()
                .unwrap(),
            token
        );
    }
}
