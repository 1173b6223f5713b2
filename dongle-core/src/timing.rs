//! CAN bit timing: range checks of raw timing and timing derived from bitrate and sample point.
//!
//! The simulated controller runs from an 80 MHz CAN kernel clock ([`CAN_CLOCK_HZ`]), the
//! FDCAN clock the STM32H753 firmware uses. A bit is `1 + tseg1 + tseg2` time quanta of
//! `prescaler / clock` seconds each; the sample point sits after `1 + tseg1` quanta.
//!
//! A request is checked in this order, and the first failure decides the status:
//! 1. invalid: the mode or flags are unknown, the bitrate is outside 10 000..=1 000 000 bit/s
//!    (when derived), the sample point outside 500..=950 permille (when derived), or raw
//!    values outside the controller's ranges ([`TimingLimits::BXCAN`], or [`TimingLimits::FDCAN_NOMINAL`]
//!    when the dongle announces FD);
//! 2. apply_failed: no prescaler and segment split reaches the bitrate within 1 %.

use firmware_proto::remp::{BITRATE_RANGE, CanConfig, CanMode, SAMPLE_POINT_RANGE, TimingLimits};

/// The simulated CAN kernel clock in Hz.
pub const CAN_CLOCK_HZ: u32 = 80_000_000;
/// The largest bitrate error, in parts per million, that a derived timing may have.
pub const MAX_BITRATE_ERROR_PPM: u64 = 10_000;
/// The controller's effective configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanSettings {
    /// Effective bitrate in bit/s (rounded).
    pub bitrate: u32,
    /// Effective sample point in permille (rounded).
    pub sample_point_permille: u16,
    /// Prescaler.
    pub prescaler: u16,
    /// Synchronisation jump width.
    pub sjw: u8,
    /// Time segment 1.
    pub tseg1: u8,
    /// Time segment 2.
    pub tseg2: u8,
    /// Operating mode.
    pub mode: CanMode,
    /// Configuration flags (auto_retx, tx_pause, protocol_exc; use_raw as requested).
    pub flags: u8,
}

impl Default for CanSettings {
    /// 500 kbit/s at 87.5 %, normal mode, automatic retransmission: the firmware's default.
    fn default() -> Self {
        Self {
            bitrate: 500_000,
            sample_point_permille: 875,
            prescaler: 10,
            sjw: 1,
            tseg1: 13,
            tseg2: 2,
            mode: CanMode::Normal,
            flags: CanConfig::FLAG_AUTO_RETX,
        }
    }
}

impl CanSettings {
    /// The CAN_CONFIG payload fields of these settings, as a response with `status`.
    pub fn to_response(&self, status: firmware_proto::remp::ConfigStatus) -> CanConfig {
        CanConfig {
            action: firmware_proto::remp::ConfigAction::Response,
            status,
            bitrate: self.bitrate,
            sample_point_permille: self.sample_point_permille,
            prescaler: self.prescaler,
            sjw: self.sjw,
            tseg1: self.tseg1,
            tseg2: self.tseg2,
            mode: self.mode,
            flags: self.flags,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    /// A field is out of range; the reason names it.
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// The values are in range but the controller cannot realise them.
    #[error("apply failed: {0}")]
    ApplyFailed(&'static str),
}

const KNOWN_FLAGS: u8 = CanConfig::FLAG_USE_RAW
    | CanConfig::FLAG_AUTO_RETX
    | CanConfig::FLAG_TX_PAUSE
    | CanConfig::FLAG_PROTOCOL_EXC;

/// Checks a SET request and returns the settings the controller would run with.
pub fn apply(
    request: &CanConfig,
    limits: &TimingLimits,
    clock_hz: u32,
) -> Result<CanSettings, TimingError> {
    if request.flags & !KNOWN_FLAGS != 0 {
        return Err(TimingError::Invalid("unknown flag bits"));
    }
    let (prescaler, tseg1, tseg2) = if request.flags & CanConfig::FLAG_USE_RAW != 0 {
        check_raw(request, limits)?;
        (request.prescaler, request.tseg1, request.tseg2)
    } else {
        if !BITRATE_RANGE.contains(&request.bitrate) {
            return Err(TimingError::Invalid("bitrate outside 10000..=1000000"));
        }
        if !SAMPLE_POINT_RANGE.contains(&request.sample_point_permille) {
            return Err(TimingError::Invalid(
                "sample point outside 500..=950 permille",
            ));
        }
        derive(
            request.bitrate,
            request.sample_point_permille,
            limits,
            clock_hz,
        )
        .ok_or(TimingError::ApplyFailed("bitrate not reachable within 1%"))?
    };
    let sjw = if request.flags & CanConfig::FLAG_USE_RAW != 0 {
        request.sjw
    } else {
        // A derived timing keeps a requested SJW that fits, and otherwise uses 1, the
        // controller's reset value.
        let max = limits.sjw_max.min(tseg2);
        if (1..=max).contains(&request.sjw) {
            request.sjw
        } else {
            1
        }
    };
    let quanta = 1 + u64::from(tseg1) + u64::from(tseg2);
    let divisor = u64::from(prescaler) * quanta;
    let bitrate = (u64::from(clock_hz) + divisor / 2) / divisor;
    let sample_point = ((1 + u64::from(tseg1)) * 1000 + quanta / 2) / quanta;
    Ok(CanSettings {
        bitrate: u32::try_from(bitrate).unwrap_or(u32::MAX),
        sample_point_permille: u16::try_from(sample_point).unwrap_or(u16::MAX),
        prescaler,
        sjw,
        tseg1,
        tseg2,
        mode: request.mode,
        flags: request.flags,
    })
}

fn check_raw(r: &CanConfig, l: &TimingLimits) -> Result<(), TimingError> {
    if !(1..=l.prescaler_max).contains(&r.prescaler) {
        return Err(TimingError::Invalid("prescaler out of range"));
    }
    if !(1..=l.tseg1_max).contains(&r.tseg1) {
        return Err(TimingError::Invalid("tseg1 out of range"));
    }
    if !(1..=l.tseg2_max).contains(&r.tseg2) {
        return Err(TimingError::Invalid("tseg2 out of range"));
    }
    if !(1..=l.sjw_max).contains(&r.sjw) {
        return Err(TimingError::Invalid("sjw out of range"));
    }
    if r.sjw > r.tseg2 {
        return Err(TimingError::Invalid("sjw larger than tseg2"));
    }
    Ok(())
}

/// How a candidate timing ranks: bitrate error (ppm), sample point error (permille), and
/// the number of quanta negated (more is better). Smaller is better.
type Score = (u64, u64, i64);

/// Finds prescaler, tseg1 and tseg2 for `bitrate` and `sample_point` (permille): the smallest
/// bitrate error first, then the closest sample point, then the most time quanta per bit (finer
/// resynchronisation). `None` when nothing is within [`MAX_BITRATE_ERROR_PPM`].
pub fn derive(
    bitrate: u32,
    sample_point: u16,
    l: &TimingLimits,
    clock_hz: u32,
) -> Option<(u16, u8, u8)> {
    let clock = u64::from(clock_hz);
    let bitrate = u64::from(bitrate);
    let sp = u64::from(sample_point);
    let max_quanta = 1 + u64::from(l.tseg1_max) + u64::from(l.tseg2_max);
    // (bitrate error ppm, sample point error permille, -quanta) orders the candidates.
    let mut best: Option<(Score, (u16, u8, u8))> = None;
    for prescaler in 1..=u64::from(l.prescaler_max) {
        let ideal = clock / (prescaler * bitrate);
        for quanta in [ideal, ideal + 1] {
            if !(3..=max_quanta).contains(&quanta) {
                continue;
            }
            let actual = clock / (prescaler * quanta);
            let error_ppm = actual.abs_diff(bitrate) * 1_000_000 / bitrate;
            if error_ppm > MAX_BITRATE_ERROR_PPM {
                continue;
            }
            let Some((tseg1, tseg2)) = split(quanta, sp, l) else {
                continue;
            };
            let achieved_sp = (1 + tseg1) * 1000 / quanta;
            let key = (error_ppm, achieved_sp.abs_diff(sp), -(quanta as i64));
            if best.is_none_or(|(k, _)| key < k) {
                best = Some((key, (prescaler as u16, tseg1 as u8, tseg2 as u8)));
            }
        }
    }
    best.map(|(_, v)| v)
}

/// Splits `quanta` into tseg1 and tseg2 with the sample point closest to `sp` permille.
fn split(quanta: u64, sp: u64, l: &TimingLimits) -> Option<(u64, u64)> {
    let tseg1_ideal = (quanta * sp + 500) / 1000;
    let tseg1_ideal = tseg1_ideal.saturating_sub(1);
    let low = quanta.saturating_sub(1 + u64::from(l.tseg2_max)).max(1);
    let high = (quanta.saturating_sub(2)).min(u64::from(l.tseg1_max));
    if low > high {
        return None;
    }
    let tseg1 = tseg1_ideal.clamp(low, high);
    Some((tseg1, quanta - 1 - tseg1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use firmware_proto::remp::ConfigAction;

    fn set(bitrate: u32, sp: u16) -> CanConfig {
        CanConfig {
            action: ConfigAction::Set,
            bitrate,
            sample_point_permille: sp,
            ..CanConfig::get()
        }
    }

    #[test]
    fn derives_common_bitrates_exactly() {
        for (bitrate, sp) in [
            (125_000, 875),
            (250_000, 875),
            (500_000, 875),
            (1_000_000, 800),
            (83_333, 875),
        ] {
            let s = apply(&set(bitrate, sp), &TimingLimits::BXCAN, CAN_CLOCK_HZ).unwrap();
            assert!(
                s.bitrate.abs_diff(bitrate) * 100 <= bitrate,
                "{bitrate}: {s:?}"
            );
            assert!((1..=16).contains(&s.tseg1) && (1..=8).contains(&s.tseg2));
            assert!(
                s.sample_point_permille.abs_diff(sp) <= 30,
                "{bitrate}: {s:?}"
            );
        }
        let s = apply(&set(500_000, 875), &TimingLimits::BXCAN, CAN_CLOCK_HZ).unwrap();
        assert_eq!(
            (s.prescaler, s.tseg1, s.tseg2, s.sample_point_permille),
            (10, 13, 2, 875)
        );
    }

    #[test]
    fn unreachable_bitrate_fails_to_apply() {
        let err = apply(&set(970_000, 875), &TimingLimits::BXCAN, CAN_CLOCK_HZ).unwrap_err();
        assert!(matches!(err, TimingError::ApplyFailed(_)));
    }

    #[test]
    fn out_of_range_values_are_invalid() {
        assert!(matches!(
            apply(&set(5_000, 875), &TimingLimits::BXCAN, CAN_CLOCK_HZ),
            Err(TimingError::Invalid(_))
        ));
        assert!(matches!(
            apply(&set(500_000, 990), &TimingLimits::BXCAN, CAN_CLOCK_HZ),
            Err(TimingError::Invalid(_))
        ));
        let raw = |p, s1, s2, j| CanConfig {
            prescaler: p,
            tseg1: s1,
            tseg2: s2,
            sjw: j,
            flags: CanConfig::FLAG_USE_RAW,
            ..set(0, 0)
        };
        assert!(apply(&raw(10, 13, 2, 1), &TimingLimits::BXCAN, CAN_CLOCK_HZ).is_ok());
        for bad in [
            raw(0, 13, 2, 1),
            raw(1025, 13, 2, 1),
            raw(10, 17, 2, 1),
            raw(10, 13, 9, 1),
            raw(10, 13, 2, 5),
            raw(10, 13, 2, 3),
        ] {
            assert!(
                matches!(
                    apply(&bad, &TimingLimits::BXCAN, CAN_CLOCK_HZ),
                    Err(TimingError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        // FDCAN's wider ranges accept what bxCAN refuses.
        assert!(
            apply(
                &raw(10, 40, 9, 5),
                &TimingLimits::FDCAN_NOMINAL,
                CAN_CLOCK_HZ
            )
            .is_ok()
        );
    }

    #[test]
    fn raw_timing_reports_its_effective_bitrate() {
        let req = CanConfig {
            prescaler: 20,
            tseg1: 13,
            tseg2: 2,
            sjw: 1,
            flags: CanConfig::FLAG_USE_RAW,
            ..set(0, 0)
        };
        let s = apply(&req, &TimingLimits::BXCAN, CAN_CLOCK_HZ).unwrap();
        assert_eq!((s.bitrate, s.sample_point_permille), (250_000, 875));
    }
}
