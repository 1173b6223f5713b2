//! CAN configuration (SPEC 3.6): validation, applying a configuration through the agent that serves the
//! dongle, and what is stored.
//!
//! Nothing reaches the dongle before the whole request passes the checks: bitrate and sample point
//! ranges, and with `use_raw` the timing ranges of the dongle's controller (STM32 bxCAN, or FDCAN nominal
//! timing when the dongle announces CAN FD). The stored configuration changes only when the dongle
//! acknowledges it, together with the effective values it reports; a refusal (NACK), a timeout or an
//! offline agent leaves it as it was. Applies to one dongle are serialised by a transaction-scoped
//! advisory lock held across the round trip, so the stored configuration is always the one the dongle
//! applied last, also with several server instances.

use chrono::{DateTime, Utc};
use control_proto::{CanEffective, CanSettings, ReplyOk, RequestBody};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;
use crate::dongles::DongleError;
use crate::dongles::Services;
use crate::dongles::{self, OwnedDongle};
use crate::error_code::ErrorCode;
use crate::rate_limit;
use firmware_proto::remp::{BITRATE_RANGE, CanMode, SAMPLE_POINT_RANGE, TimingLimits};

/// The mode names, for messages.
fn mode_names() -> String {
    CanMode::ALL.map(CanMode::name).join(", ")
}

fn default_true() -> bool {
    true
}

fn default_mode() -> String {
    "normal".into()
}

/// `PUT /dongles/:id/can-config`: the v0.7 fields. Numbers are read wide so that an out-of-range value
/// (even a negative one) is answered with the field's name rather than a parse error.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CanConfigRequest {
    /// Nominal bitrate in bit/s, 10 000..=1 000 000.
    pub bitrate: i64,
    /// Sample point in permille, 500..=950.
    pub sample_point_permille: i64,
    /// `normal` (default), `listen_only`, `loopback` or `ext_loop`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Use the raw timing fields below instead of deriving them from bitrate and sample point.
    #[serde(default)]
    pub use_raw: bool,
    /// With `use_raw`: 1..=1024 (bxCAN) or 1..=512 (FDCAN). Ignored without it.
    pub prescaler: Option<i64>,
    /// With `use_raw`: 1..=4 (bxCAN) or 1..=128 (FDCAN), and at most tseg2. Ignored without it.
    pub sjw: Option<i64>,
    /// With `use_raw`: 1..=16 (bxCAN) or 1..=255 (FDCAN). Ignored without it.
    pub tseg1: Option<i64>,
    /// With `use_raw`: 1..=8 (bxCAN) or 1..=128 (FDCAN). Ignored without it.
    pub tseg2: Option<i64>,
    /// Automatic retransmission (default true).
    #[serde(default = "default_true")]
    pub auto_retx: bool,
    #[serde(default)]
    pub tx_pause: bool,
    #[serde(default)]
    pub protocol_exc: bool,
}

/// `GET /dongles/:id/can-config`: what is stored, and what the dongle acknowledged last.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CanConfigState {
    pub dongle_id: Uuid,
    /// The configuration last applied (null when none was ever applied through the server).
    pub config: Option<CanSettings>,
    /// The effective values the dongle reported for it.
    pub effective: Option<CanEffective>,
    pub applied_at: Option<DateTime<Utc>>,
}

/// The answer to a successful `PUT /dongles/:id/can-config`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CanConfigApplied {
    pub dongle_id: Uuid,
    /// Always true: any other outcome is an error answer.
    pub applied: bool,
    /// The configuration as requested (and now stored).
    pub config: CanSettings,
    /// The values the dongle reports it runs with.
    pub effective: CanEffective,
    pub applied_at: DateTime<Utc>,
}

/// One failed check: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl From<Invalid> for DongleError {
    fn from(e: Invalid) -> Self {
        DongleError::Invalid {
            field: e.field,
            message: format!("{} {}", e.field, e.message),
        }
    }
}

fn in_range<T: Copy + Into<i64>>(
    field: &'static str,
    value: i64,
    range: &std::ops::RangeInclusive<T>,
) -> Result<i64, Invalid> {
    let (min, max) = ((*range.start()).into(), (*range.end()).into());
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Invalid {
            field,
            message: format!("must be between {min} and {max}."),
        })
    }
}

fn raw_field(
    field: &'static str,
    value: Option<i64>,
    max: impl Into<u16>,
    controller: &str,
) -> Result<i64, Invalid> {
    let max: u16 = max.into();
    let value = value.ok_or_else(|| Invalid {
        field,
        message: "is required with use_raw.".into(),
    })?;
    in_range(field, value, &(1..=max)).map_err(|_| Invalid {
        field,
        message: format!("must be between 1 and {max} for this dongle's {controller} controller."),
    })
}

/// Checks a request against SPEC 3.6; `can_fd` picks the FDCAN timing ranges over bxCAN's.
pub fn validate(req: &CanConfigRequest, can_fd: bool) -> Result<CanSettings, Invalid> {
    let bitrate = in_range("bitrate", req.bitrate, &BITRATE_RANGE)?;
    let sample_point = in_range(
        "sample_point_permille",
        req.sample_point_permille,
        &SAMPLE_POINT_RANGE,
    )?;
    let Some(mode) = CanMode::from_name(&req.mode) else {
        return Err(Invalid {
            field: "mode",
            message: format!("must be one of {}.", mode_names()),
        });
    };
    let (prescaler, sjw, tseg1, tseg2) = if req.use_raw {
        let (limits, controller) = TimingLimits::of_controller(can_fd);
        let prescaler = raw_field("prescaler", req.prescaler, limits.prescaler_max, controller)?;
        let tseg1 = raw_field("tseg1", req.tseg1, limits.tseg1_max, controller)?;
        let tseg2 = raw_field("tseg2", req.tseg2, limits.tseg2_max, controller)?;
        let sjw = raw_field("sjw", req.sjw, limits.sjw_max, controller)?;
        if sjw > tseg2 {
            return Err(Invalid {
                field: "sjw",
                message: "must not be greater than tseg2.".into(),
            });
        }
        // The limits keep every value within its wire type.
        (
            Some(prescaler as u16),
            Some(sjw as u8),
            Some(tseg1 as u8),
            Some(tseg2 as u8),
        )
    } else {
        // Without use_raw the dongle derives its timing from bitrate and sample point; raw fields a
        // client sends along are not used, so they are neither sent nor stored.
        (None, None, None, None)
    };
    Ok(CanSettings {
        bitrate: bitrate as u32,
        sample_point_permille: sample_point as u16,
        mode,
        use_raw: req.use_raw,
        prescaler,
        sjw,
        tseg1,
        tseg2,
        auto_retx: req.auto_retx,
        tx_pause: req.tx_pause,
        protocol_exc: req.protocol_exc,
    })
}

#[derive(Debug, sqlx::FromRow)]
struct StoredRow {
    bitrate: i32,
    sample_point_permille: i16,
    #[sqlx(try_from = "String")]
    mode: CanMode,
    use_raw: bool,
    prescaler: Option<i32>,
    sjw: Option<i16>,
    tseg1: Option<i16>,
    tseg2: Option<i16>,
    auto_retx: bool,
    tx_pause: bool,
    protocol_exc: bool,
    effective_bitrate: Option<i64>,
    effective_sample_point_permille: Option<i32>,
    effective_prescaler: Option<i32>,
    effective_sjw: Option<i16>,
    effective_tseg1: Option<i16>,
    effective_tseg2: Option<i16>,
    effective_mode: Option<String>,
    effective_use_raw: Option<bool>,
    effective_auto_retx: Option<bool>,
    effective_tx_pause: Option<bool>,
    effective_protocol_exc: Option<bool>,
    applied_at: Option<DateTime<Utc>>,
}

impl StoredRow {
    /// The stored configuration; None only if a value does not fit its type, which the checks before
    /// this server's writes rule out (another tool may write a tseg1 of 256, which the schema allows).
    fn config(&self) -> Option<CanSettings> {
        Some(CanSettings {
            bitrate: u32::try_from(self.bitrate).ok()?,
            sample_point_permille: u16::try_from(self.sample_point_permille).ok()?,
            mode: self.mode,
            use_raw: self.use_raw,
            prescaler: self.prescaler.map(u16::try_from).transpose().ok()?,
            sjw: self.sjw.map(u8::try_from).transpose().ok()?,
            tseg1: self.tseg1.map(u8::try_from).transpose().ok()?,
            tseg2: self.tseg2.map(u8::try_from).transpose().ok()?,
            auto_retx: self.auto_retx,
            tx_pause: self.tx_pause,
            protocol_exc: self.protocol_exc,
        })
    }

    /// The effective values, when the dongle acknowledged this configuration (all are written at once,
    /// from a [`CanEffective`], so each fits its type).
    fn effective(&self) -> Option<CanEffective> {
        Some(CanEffective {
            bitrate: u32::try_from(self.effective_bitrate?).ok()?,
            sample_point_permille: u16::try_from(self.effective_sample_point_permille?).ok()?,
            prescaler: u16::try_from(self.effective_prescaler?).ok()?,
            sjw: u8::try_from(self.effective_sjw?).ok()?,
            tseg1: u8::try_from(self.effective_tseg1?).ok()?,
            tseg2: u8::try_from(self.effective_tseg2?).ok()?,
            // The column is the `can_mode` enum, whose values are exactly the mode names.
            mode: CanMode::from_name(self.effective_mode.as_deref()?)?,
            use_raw: self.effective_use_raw?,
            auto_retx: self.effective_auto_retx?,
            tx_pause: self.effective_tx_pause?,
            protocol_exc: self.effective_protocol_exc?,
        })
    }
}

async fn load(
    db: impl sqlx::PgExecutor<'_>,
    dongle_id: Uuid,
) -> Result<Option<StoredRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT bitrate, sample_point_permille, mode::text AS mode, use_raw, prescaler, sjw, tseg1, \
           tseg2, auto_retx, tx_pause, protocol_exc, effective_bitrate, \
           effective_sample_point_permille, effective_prescaler, effective_sjw, effective_tseg1, \
           effective_tseg2, effective_mode::text AS effective_mode, effective_use_raw, \
           effective_auto_retx, effective_tx_pause, effective_protocol_exc, applied_at \
         FROM can_configs WHERE dongle_id = $1",
    )
    .bind(dongle_id)
    .fetch_optional(db)
    .await
}

/// `GET /dongles/:id/can-config` for the owner.
pub async fn get(
    svc: Services<'_>,
    caller: &Caller,
    dongle_id: Uuid,
) -> Result<CanConfigState, DongleError> {
    let dongle = dongles::owned_or_404(svc.pool, caller.user_id(), dongle_id).await?;
    let row = load(svc.pool, dongle.id).await?;
    let config = row.as_ref().and_then(StoredRow::config);
    if row.is_some() && config.is_none() {
        // Only a row written by another tool can hold such a value (the schema allows a tseg1 of 256,
        // as FDCAN does, but REMP carries one byte): said, not hidden behind "no configuration".
        tracing::warn!(%dongle_id, "the stored CAN configuration has a value this server cannot send (a tseg1 of 256?): shown as none until a configuration is applied again");
    }
    Ok(CanConfigState {
        dongle_id,
        config,
        effective: row.as_ref().and_then(StoredRow::effective),
        applied_at: row.and_then(|r| r.applied_at),
    })
}

fn snapshot(row: Option<&StoredRow>) -> serde_json::Value {
    match row {
        Some(r) => serde_json::json!({ "config": r.config(), "effective": r.effective() }),
        None => serde_json::Value::Null,
    }
}

/// `PUT /dongles/:id/can-config`: checks, sends through the serving agent, and stores the dongle's
/// acknowledgement. The same configuration twice is applied twice and answered alike.
pub async fn apply(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    req: &CanConfigRequest,
) -> Result<CanConfigApplied, DongleError> {
    let dongle = dongles::owned_or_404(svc.pool, caller.user_id(), dongle_id).await?;
    let config = validate(req, dongle.can_fd())?;
    rate_limit::agent_request(svc.pool, svc.rate_limits, caller.user_id()).await?;
    let agent_id = dongles::owned::serving_agent_or_offline(
        svc.pool,
        svc.hub,
        dongle.id,
        caller.user_id(),
        caller.agent_id(),
    )
    .await?;

    // One configuration at a time per dongle, on every instance, without holding a transaction or a
    // lock (and so a pooled connection) while the agent answers: a lease, released at the end.
    let timeout = svc.dongle_request_timeout;
    let Some(lease) =
        crate::dongle_lease::acquire(svc.pool, dongle.id, "can_config", timeout + LEASE_MARGIN)
            .await?
    else {
        return Err(DongleError::Busy(
            "Another CAN configuration of this dongle is in progress: try again in a moment.",
        ));
    };
    let applied = apply_leased(svc, caller, client, &dongle, config, agent_id).await;
    lease.release(svc.pool).await;
    applied
}

/// How much longer than the agent's timeout a lease lasts, for the writes after the answer.
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// [`apply`] once the dongle's lease is held.
async fn apply_leased(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle: &dongles::OwnedDongle,
    config: CanSettings,
    agent_id: Uuid,
) -> Result<CanConfigApplied, DongleError> {
    let dongle_id = dongle.id;
    let before = load(svc.pool, dongle.id).await?;
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::CanConfig {
                device_id: dongle.device_id,
                settings: config,
            },
            svc.dongle_request_timeout,
        )
        .await;
    let effective = match reply {
        Ok(ReplyOk::CanConfigApplied { effective }) => effective,
        Ok(other) => {
            tracing::warn!(%agent_id, reply = ?other, "an agent answered a CAN configuration oddly");
            let error = DongleError::UnexpectedReply(
                "The agent answered the CAN configuration with something else than the dongle's \
                 acknowledgement; nothing was stored.",
            );
            audit_failure(svc, caller, client, dongle, &config, &error).await;
            return Err(error);
        }
        Err(e) => {
            let error = DongleError::Request {
                error: e,
                refused: ErrorCode::CanConfigRejected,
            };
            audit_failure(svc, caller, client, dongle, &config, &error).await;
            return Err(error);
        }
    };
    let mut tx = svc.pool.begin().await?;
    let applied_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO can_configs (dongle_id, bitrate, sample_point_permille, mode, use_raw, prescaler, \
           sjw, tseg1, tseg2, auto_retx, tx_pause, protocol_exc, effective_bitrate, \
           effective_sample_point_permille, effective_prescaler, effective_sjw, effective_tseg1, \
           effective_tseg2, effective_mode, effective_use_raw, effective_auto_retx, effective_tx_pause, \
           effective_protocol_exc, applied_at) \
         VALUES ($1, $2, $3, $4::can_mode, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
           $18, $19::can_mode, $20, $21, $22, $23, now()) \
         ON CONFLICT (dongle_id) DO UPDATE SET bitrate = EXCLUDED.bitrate, \
           sample_point_permille = EXCLUDED.sample_point_permille, mode = EXCLUDED.mode, \
           use_raw = EXCLUDED.use_raw, prescaler = EXCLUDED.prescaler, sjw = EXCLUDED.sjw, \
           tseg1 = EXCLUDED.tseg1, tseg2 = EXCLUDED.tseg2, auto_retx = EXCLUDED.auto_retx, \
           tx_pause = EXCLUDED.tx_pause, protocol_exc = EXCLUDED.protocol_exc, \
           effective_bitrate = EXCLUDED.effective_bitrate, \
           effective_sample_point_permille = EXCLUDED.effective_sample_point_permille, \
           effective_prescaler = EXCLUDED.effective_prescaler, effective_sjw = EXCLUDED.effective_sjw, \
           effective_tseg1 = EXCLUDED.effective_tseg1, effective_tseg2 = EXCLUDED.effective_tseg2, \
           effective_mode = EXCLUDED.effective_mode, effective_use_raw = EXCLUDED.effective_use_raw, \
           effective_auto_retx = EXCLUDED.effective_auto_retx, \
           effective_tx_pause = EXCLUDED.effective_tx_pause, \
           effective_protocol_exc = EXCLUDED.effective_protocol_exc, applied_at = EXCLUDED.applied_at \
         RETURNING applied_at",
    )
    .bind(dongle.id)
    .bind(i32::try_from(config.bitrate).unwrap_or(i32::MAX))
    .bind(i16::try_from(config.sample_point_permille).unwrap_or(i16::MAX))
    .bind(config.mode.name())
    .bind(config.use_raw)
    .bind(config.prescaler.map(i32::from))
    .bind(config.sjw.map(i16::from))
    .bind(config.tseg1.map(i16::from))
    .bind(config.tseg2.map(i16::from))
    .bind(config.auto_retx)
    .bind(config.tx_pause)
    .bind(config.protocol_exc)
    .bind(i64::from(effective.bitrate))
    .bind(i32::from(effective.sample_point_permille))
    .bind(i32::from(effective.prescaler))
    .bind(i16::from(effective.sjw))
    .bind(i16::from(effective.tseg1))
    .bind(i16::from(effective.tseg2))
    .bind(effective.mode.name())
    .bind(effective.use_raw)
    .bind(effective.auto_retx)
    .bind(effective.tx_pause)
    .bind(effective.protocol_exc)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        Entry::new("can_config.apply", Some(caller.user_id()), client)
            .target(dongle_target(dongle.id))
            .details(serde_json::json!({
                "agent_id": agent_id,
                "via_agent": caller.agent_id().is_some(),
                "before": snapshot(before.as_ref()),
                "after": { "config": &config, "effective": &effective },
            })),
    )
    .await?;
    tx.commit().await?;
    Ok(CanConfigApplied {
        dongle_id,
        applied: true,
        config,
        effective,
        applied_at,
    })
}

fn dongle_target(dongle_id: Uuid) -> Target {
    Target {
        kind: "dongle",
        id: dongle_id.to_string(),
    }
}

/// Records a configuration the dongle did not apply. The apply's transaction is already rolled back, so
/// this entry is written on its own; failing to write it is logged, not answered.
async fn audit_failure(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle: &OwnedDongle,
    config: &CanSettings,
    error: &DongleError,
) {
    let entry = Entry::new("can_config.apply_failed", Some(caller.user_id()), client)
        .target(dongle_target(dongle.id))
        .details(serde_json::json!({ "code": error.code(), "requested": config }));
    if let Err(e) = audit::record(svc.pool, entry).await {
        tracing::warn!(dongle_id = %dongle.id, error = %e, "could not audit a failed CAN configuration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CanConfigRequest {
        CanConfigRequest {
            bitrate: 500_000,
            sample_point_permille: 875,
            mode: "normal".into(),
            use_raw: false,
            prescaler: None,
            sjw: None,
            tseg1: None,
            tseg2: None,
            auto_retx: true,
            tx_pause: false,
            protocol_exc: false,
        }
    }

    fn raw(prescaler: i64, tseg1: i64, tseg2: i64, sjw: i64) -> CanConfigRequest {
        CanConfigRequest {
            use_raw: true,
            prescaler: Some(prescaler),
            tseg1: Some(tseg1),
            tseg2: Some(tseg2),
            sjw: Some(sjw),
            ..req()
        }
    }

    fn field(r: Result<CanSettings, Invalid>) -> &'static str {
        r.unwrap_err().field
    }

    #[test]
    fn ranges_name_the_field() {
        assert!(validate(&req(), false).is_ok());
        for (bitrate, ok) in [
            (9_999, false),
            (10_000, true),
            (1_000_000, true),
            (1_000_001, false),
            (-1, false),
        ] {
            let r = validate(&CanConfigRequest { bitrate, ..req() }, false);
            assert_eq!(r.is_ok(), ok, "{bitrate}");
        }
        assert_eq!(
            field(validate(
                &CanConfigRequest {
                    sample_point_permille: 499,
                    ..req()
                },
                false
            )),
            "sample_point_permille"
        );
        assert_eq!(
            field(validate(
                &CanConfigRequest {
                    sample_point_permille: 951,
                    ..req()
                },
                false
            )),
            "sample_point_permille"
        );
        assert_eq!(
            field(validate(
                &CanConfigRequest {
                    mode: "silent".into(),
                    ..req()
                },
                false
            )),
            "mode"
        );
    }

    #[test]
    fn raw_timing_uses_the_controller_of_the_dongle() {
        assert!(validate(&raw(1024, 16, 8, 4), false).is_ok());
        assert_eq!(field(validate(&raw(1025, 16, 8, 4), false)), "prescaler");
        assert_eq!(field(validate(&raw(0, 16, 8, 4), false)), "prescaler");
        assert_eq!(field(validate(&raw(10, 17, 8, 4), false)), "tseg1");
        assert_eq!(field(validate(&raw(10, 13, 9, 4), false)), "tseg2");
        assert_eq!(field(validate(&raw(10, 13, 8, 5), false)), "sjw");
        assert_eq!(field(validate(&raw(10, 13, 2, 3), false)), "sjw");
        // FDCAN: wider timing segments, a narrower prescaler.
        assert!(validate(&raw(512, 255, 128, 128), true).is_ok());
        assert_eq!(field(validate(&raw(513, 13, 2, 1), true)), "prescaler");
        assert_eq!(field(validate(&raw(10, 256, 2, 1), true)), "tseg1");
        assert_eq!(field(validate(&raw(10, 13, 129, 1), true)), "tseg2");
        let missing = CanConfigRequest {
            tseg2: None,
            ..raw(10, 13, 2, 1)
        };
        assert_eq!(field(validate(&missing, false)), "tseg2");
        // Without use_raw the raw fields are not looked at.
        let ignored = CanConfigRequest {
            prescaler: Some(99_999),
            ..req()
        };
        assert_eq!(validate(&ignored, false).unwrap().prescaler, None);
    }
}
