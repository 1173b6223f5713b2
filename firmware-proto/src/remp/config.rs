//! REMP type 2: CAN controller configuration, one 16-byte layout for request and response.
//!
//! | off | size | field                 |
//! |-----|------|-----------------------|
//! | 0   | 1    | action (0 get, 1 set, 2 response) |
//! | 1   | 1    | reserved (request) / status (response) |
//! | 2   | 4    | bitrate u32 BE        |
//! | 6   | 2    | sample_point_permille u16 BE |
//! | 8   | 2    | prescaler u16 BE      |
//! | 10  | 1    | sjw                   |
//! | 11  | 1    | tseg1                 |
//! | 12  | 1    | tseg2                 |
//! | 13  | 1    | mode                  |
//! | 14  | 1    | flags                 |
//! | 15  | 1    | reserved              |

use crate::wire::{Reader, Writer};
use crate::{Error, Result};

/// What a CAN_CONFIG packet asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigAction {
    /// 0: read the current configuration (the other fields are ignored).
    Get,
    /// 1: apply the configuration.
    Set,
    /// 2: the dongle's answer, carrying the effective configuration.
    Response,
}

/// The outcome carried by a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ConfigStatus {
    /// 0.
    #[default]
    Ok,
    /// 1: the requested configuration is out of range; nothing changed.
    Invalid,
    /// 2: the controller refused it; the effective configuration is reported.
    ApplyFailed,
}

/// The controller's operating mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CanMode {
    /// 0: normal.
    #[default]
    Normal,
    /// 1: listen only, never transmits (not even ACKs).
    ListenOnly,
    /// 2: internal loopback.
    Loopback,
    /// 3: external loopback.
    ExtLoop,
}

impl CanMode {
    /// Every mode, in wire order.
    pub const ALL: [CanMode; 4] = [
        CanMode::Normal,
        CanMode::ListenOnly,
        CanMode::Loopback,
        CanMode::ExtLoop,
    ];

    /// The mode's name everywhere above the wire: the control protocol, the API, the simulator's state
    /// file and the command lines (`normal`, `listen_only`, `loopback`, `ext_loop`).
    pub fn name(self) -> &'static str {
        match self {
            CanMode::Normal => "normal",
            CanMode::ListenOnly => "listen_only",
            CanMode::Loopback => "loopback",
            CanMode::ExtLoop => "ext_loop",
        }
    }

    /// The mode of a [`CanMode::name`].
    pub fn from_name(name: &str) -> Option<CanMode> {
        CanMode::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// For hosts that read modes as owned text, such as a database column (`#[sqlx(try_from = "String")]`).
#[cfg(feature = "std")]
impl TryFrom<std::string::String> for CanMode {
    type Error = crate::Error;

    fn try_from(name: std::string::String) -> crate::Result<Self> {
        CanMode::from_name(&name).ok_or(crate::Error::InvalidField("mode"))
    }
}

/// Nominal bitrates a CAN_CONFIG SET may ask a dongle to derive its timing from, in bit/s (SPEC 3.6).
/// The server checks a request against them before sending it, and the dongle checks again.
pub const BITRATE_RANGE: core::ops::RangeInclusive<u32> = 10_000..=1_000_000;
/// Sample points a CAN_CONFIG SET may ask for when the timing is derived, in permille (SPEC 3.6).
pub const SAMPLE_POINT_RANGE: core::ops::RangeInclusive<u16> = 500..=950;

/// The ranges of a controller's nominal bit timing registers, which raw timing (`FLAG_USE_RAW`) must
/// respect; every value starts at 1. Which one a dongle has follows from its capabilities: FDCAN when it
/// announces CAN FD, bxCAN otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimingLimits {
    /// Largest prescaler.
    pub prescaler_max: u16,
    /// Largest time segment 1.
    pub tseg1_max: u8,
    /// Largest time segment 2.
    pub tseg2_max: u8,
    /// Largest synchronisation jump width.
    pub sjw_max: u8,
}

impl TimingLimits {
    /// STM32 bxCAN: prescaler 1..=1024, tseg1 1..=16, tseg2 1..=8, sjw 1..=4.
    pub const BXCAN: TimingLimits = TimingLimits {
        prescaler_max: 1024,
        tseg1_max: 16,
        tseg2_max: 8,
        sjw_max: 4,
    };
    /// STM32 FDCAN nominal timing: NBRP 1..=512, NTSEG1 1..=256 (255 is the most the one-byte wire
    /// field holds), NTSEG2 1..=128, NSJW 1..=128.
    pub const FDCAN_NOMINAL: TimingLimits = TimingLimits {
        prescaler_max: 512,
        tseg1_max: 255,
        tseg2_max: 128,
        sjw_max: 128,
    };

    /// The controller's ranges and its name: FDCAN's for a dongle that announces CAN FD, else bxCAN's.
    pub fn of_controller(can_fd: bool) -> (TimingLimits, &'static str) {
        if can_fd {
            (TimingLimits::FDCAN_NOMINAL, "FDCAN")
        } else {
            (TimingLimits::BXCAN, "bxCAN")
        }
    }
}

/// A CAN_CONFIG request or response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanConfig {
    /// Get, set or response.
    pub action: ConfigAction,
    /// The status of a response; always `Ok` in requests (the byte is reserved there).
    pub status: ConfigStatus,
    /// Nominal bitrate in bit/s.
    pub bitrate: u32,
    /// Sample point in permille (e.g. 875).
    pub sample_point_permille: u16,
    /// Raw timing: prescaler.
    pub prescaler: u16,
    /// Raw timing: synchronisation jump width.
    pub sjw: u8,
    /// Raw timing: time segment 1.
    pub tseg1: u8,
    /// Raw timing: time segment 2.
    pub tseg2: u8,
    /// Operating mode.
    pub mode: CanMode,
    /// Flag bits, see the `FLAG_` constants.
    pub flags: u8,
}

impl CanConfig {
    /// Use prescaler/sjw/tseg1/tseg2 as given instead of deriving them from the bitrate.
    pub const FLAG_USE_RAW: u8 = 0x01;
    /// Automatic retransmission.
    pub const FLAG_AUTO_RETX: u8 = 0x02;
    /// Transmission paused.
    pub const FLAG_TX_PAUSE: u8 = 0x04;
    /// Protocol exception handling (FDCAN).
    pub const FLAG_PROTOCOL_EXC: u8 = 0x08;
    /// The payload length.
    pub const LEN: usize = 16;

    /// A GET request (all other fields zero).
    pub const fn get() -> Self {
        Self {
            action: ConfigAction::Get,
            status: ConfigStatus::Ok,
            bitrate: 0,
            sample_point_permille: 0,
            prescaler: 0,
            sjw: 0,
            tseg1: 0,
            tseg2: 0,
            mode: CanMode::Normal,
            flags: 0,
        }
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        let (action, second) = match self.action {
            ConfigAction::Get => (0, 0),
            ConfigAction::Set => (1, 0),
            ConfigAction::Response => (2, status_to_u8(self.status)),
        };
        w.u8(action)?;
        w.u8(second)?;
        w.u32_be(self.bitrate)?;
        w.u16_be(self.sample_point_permille)?;
        w.u16_be(self.prescaler)?;
        w.u8(self.sjw)?;
        w.u8(self.tseg1)?;
        w.u8(self.tseg2)?;
        w.u8(mode_to_u8(self.mode))?;
        w.u8(self.flags)?;
        w.u8(0)
    }

    /// Decodes the 16 payload bytes of a type-2 packet.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let action = match r.u8()? {
            0 => ConfigAction::Get,
            1 => ConfigAction::Set,
            2 => ConfigAction::Response,
            _ => return Err(Error::InvalidField("action")),
        };
        let second = r.u8()?;
        let status = match (action, second) {
            (ConfigAction::Response, 0) => ConfigStatus::Ok,
            (ConfigAction::Response, 1) => ConfigStatus::Invalid,
            (ConfigAction::Response, 2) => ConfigStatus::ApplyFailed,
            (ConfigAction::Response, _) => return Err(Error::InvalidField("status")),
            // In requests the byte is reserved: ignored.
            _ => ConfigStatus::Ok,
        };
        let bitrate = r.u32_be()?;
        let sample_point_permille = r.u16_be()?;
        let prescaler = r.u16_be()?;
        let sjw = r.u8()?;
        let tseg1 = r.u8()?;
        let tseg2 = r.u8()?;
        let mode = match r.u8()? {
            0 => CanMode::Normal,
            1 => CanMode::ListenOnly,
            2 => CanMode::Loopback,
            3 => CanMode::ExtLoop,
            _ => return Err(Error::InvalidField("mode")),
        };
        let flags = r.u8()?;
        let _reserved = r.u8()?;
        r.finish()?;
        Ok(Self {
            action,
            status,
            bitrate,
            sample_point_permille,
            prescaler,
            sjw,
            tseg1,
            tseg2,
            mode,
            flags,
        })
    }
}

const fn status_to_u8(s: ConfigStatus) -> u8 {
    match s {
        ConfigStatus::Ok => 0,
        ConfigStatus::Invalid => 1,
        ConfigStatus::ApplyFailed => 2,
    }
}

const fn mode_to_u8(m: CanMode) -> u8 {
    match m {
        CanMode::Normal => 0,
        CanMode::ListenOnly => 1,
        CanMode::Loopback => 2,
        CanMode::ExtLoop => 3,
    }
}
