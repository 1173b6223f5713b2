//! Leases on a dongle for requests that wait on its agent.
//!
//! Such a request must not hold a transaction, a row lock or an advisory lock while the agent answers:
//! each waiting request would keep a pooled connection, and a user whose own agent never answers could
//! take the whole pool. A lease is a row in `dongle_leases`, written and committed at once; one request
//! per dongle and purpose holds it, on any instance, until it ends or the lease's time runs out (a
//! holder that dies leaves nothing behind for longer than that). Others are told to try again.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

/// A lease held: give it back with [`Lease::release`] (one not given back ends at its time).
#[derive(Debug)]
#[must_use = "a lease should be released when the request ends"]
pub struct Lease {
    dongle_id: Uuid,
    purpose: &'static str,
    holder: Uuid,
}

/// Takes the lease for `purpose` on the dongle for `length`; None when another request holds it.
pub async fn acquire(
    pool: &PgPool,
    dongle_id: Uuid,
    purpose: &'static str,
    length: Duration,
) -> Result<Option<Lease>, sqlx::Error> {
    let holder = Uuid::new_v4();
    let taken: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO dongle_leases (dongle_id, purpose, holder, until) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
         ON CONFLICT (dongle_id, purpose) DO UPDATE SET holder = EXCLUDED.holder, until = EXCLUDED.until \
         WHERE dongle_leases.until <= now() \
         RETURNING holder",
    )
    .bind(dongle_id)
    .bind(purpose)
    .bind(holder)
    .bind(length.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(taken.map(|_| Lease {
        dongle_id,
        purpose,
        holder,
    }))
}

impl Lease {
    /// Gives the lease back (only this holder's: one that ran out and was taken since stays).
    pub async fn release(self, pool: &PgPool) {
        let released = sqlx::query(
            "DELETE FROM dongle_leases WHERE dongle_id = $1 AND purpose = $2 AND holder = $3",
        )
        .bind(self.dongle_id)
        .bind(self.purpose)
        .bind(self.holder)
        .execute(pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(dongle_id = %self.dongle_id, error = %e, "could not release a dongle lease; it ends by itself");
        }
    }
}
