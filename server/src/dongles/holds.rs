//! The accounts held from pairing a dongle (five wrong PINs from that account), released by an
//! administrator without touching the dongle's owner.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audit::{self, Entry, Target};
use crate::client::ClientInfo;

use super::{DongleError, Services};

/// The answer to releasing a dongle's held accounts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HoldsReleased {
    pub dongle_id: Uuid,
    /// How many accounts were held (0 when none was: releasing twice changes nothing).
    pub released: usize,
}

/// Releases every account held from pairing `dongle_id`, audited as `pairing.hold_exited` when there
/// was one. The dongle's owner, token and group stay as they are.
pub async fn release(
    svc: Services<'_>,
    admin: Uuid,
    client: &ClientInfo,
    dongle_id: Uuid,
) -> Result<HoldsReleased, DongleError> {
    let mut tx = svc.pool.begin().await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM dongles WHERE id = $1)")
        .bind(dongle_id)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Err(DongleError::NoSuchDongle);
    }
    let users_held: Vec<Uuid> =
        sqlx::query_scalar("DELETE FROM pairing_holds WHERE dongle_id = $1 RETURNING user_id")
            .bind(dongle_id)
            .fetch_all(&mut *tx)
            .await?;
    if !users_held.is_empty() {
        audit::record(
            &mut *tx,
            Entry::new("pairing.hold_exited", Some(admin), client)
                .target(Target {
                    kind: "dongle",
                    id: dongle_id.to_string(),
                })
                .details(serde_json::json!({
                    "by": "admin.pairing_holds_released",
                    "users_held": users_held,
                })),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(HoldsReleased {
        dongle_id,
        released: users_held.len(),
    })
}
