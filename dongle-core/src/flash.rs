//! What the dongle keeps across a restart, and the fixed binary image a firmware writes to flash.
//!
//! The simulator keeps [`Flash`] in a JSON state file (its `state` module); a firmware keeps
//! [`Flash::to_image`] in a flash page. The image is 72 bytes: a magic and version, the fields in
//! little-endian order, and a CRC-32 over everything before it, so that an erased page (all 0xFF)
//! or a write cut short by a power loss reads as "no state" rather than as a wrong token.
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 4    | magic `DGF1`                                       |
//! | 4      | 1    | image version, 1                                   |
//! | 5      | 8    | device id                                          |
//! | 13     | 1    | 1 when a token follows, else 0                     |
//! | 14     | 32   | token (zeros without one)                          |
//! | 46     | 1    | 1 when a cool-down end follows, else 0             |
//! | 47     | 8    | cool-down end, ms on the wall clock the host keeps |
//! | 55     | 4    | bitrate                                            |
//! | 59     | 2    | sample point, permille                             |
//! | 61     | 2    | prescaler                                          |
//! | 63     | 1    | sjw                                                |
//! | 64     | 1    | tseg1                                              |
//! | 65     | 1    | tseg2                                              |
//! | 66     | 1    | mode (0 normal, 1 listen-only, 2 loopback, 3 ext. loop) |
//! | 67     | 1    | configuration flags                                |
//! | 68     | 4    | CRC-32 (the protocol's) of bytes 0..68             |

use firmware_proto::crc32;
use firmware_proto::ids::{DeviceId, DongleToken};
use firmware_proto::remp::CanMode;

use crate::timing::CanSettings;

/// What the dongle keeps in flash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flash {
    /// The dongle's identity.
    pub device_id: DeviceId,
    /// The token of the owner's server, once paired.
    pub token: Option<DongleToken>,
    /// When the pairing cool-down ends, in milliseconds of the host's wall clock (see
    /// [`crate::Dongle::new`]).
    pub cooldown_until_unix_ms: Option<u64>,
    /// The CAN configuration last applied.
    pub can: CanSettings,
}

/// The length of [`Flash::to_image`].
pub const IMAGE_LEN: usize = 72;
const MAGIC: [u8; 4] = *b"DGF1";
const IMAGE_VERSION: u8 = 1;

/// Why a flash image was not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// No image: the page is erased or holds something else.
    #[error("no dongle state in flash")]
    Empty,
    /// The image is of a version this core does not know.
    #[error("flash image version {0} is unknown")]
    Version(u8),
    /// The CRC does not match: a write was cut short, or the page is damaged.
    #[error("flash image damaged (CRC mismatch)")]
    Damaged,
    /// A field holds a value no core writes.
    #[error("flash image holds an invalid {0}")]
    Invalid(&'static str),
}

impl Flash {
    /// A fresh flash: no token, no cool-down, the default CAN configuration.
    pub fn new(device_id: DeviceId) -> Self {
        Self {
            device_id,
            token: None,
            cooldown_until_unix_ms: None,
            can: CanSettings::default(),
        }
    }

    /// The fixed binary image of this state.
    pub fn to_image(&self) -> [u8; IMAGE_LEN] {
        let mut image = [0u8; IMAGE_LEN];
        image[0..4].copy_from_slice(&MAGIC);
        image[4] = IMAGE_VERSION;
        image[5..13].copy_from_slice(&self.device_id.0);
        if let Some(token) = &self.token {
            image[13] = 1;
            image[14..46].copy_from_slice(token.as_bytes());
        }
        if let Some(end) = self.cooldown_until_unix_ms {
            image[46] = 1;
            image[47..55].copy_from_slice(&end.to_le_bytes());
        }
        let can = &self.can;
        image[55..59].copy_from_slice(&can.bitrate.to_le_bytes());
        image[59..61].copy_from_slice(&can.sample_point_permille.to_le_bytes());
        image[61..63].copy_from_slice(&can.prescaler.to_le_bytes());
        image[63] = can.sjw;
        image[64] = can.tseg1;
        image[65] = can.tseg2;
        image[66] = CanMode::ALL
            .iter()
            .position(|m| *m == can.mode)
            .unwrap_or(0) as u8;
        image[67] = can.flags;
        let crc = crc32::checksum(&image[..68]);
        image[68..72].copy_from_slice(&crc.to_le_bytes());
        image
    }

    /// Reads an image written by [`Flash::to_image`].
    pub fn from_image(image: &[u8; IMAGE_LEN]) -> Result<Flash, ImageError> {
        if image[0..4] != MAGIC {
            return Err(ImageError::Empty);
        }
        if image[4] != IMAGE_VERSION {
            return Err(ImageError::Version(image[4]));
        }
        let (body, crc) = image.split_at(68);
        if crc32::checksum(body).to_le_bytes() != crc {
            return Err(ImageError::Damaged);
        }
        let u16_at = |i: usize| u16::from_le_bytes([image[i], image[i + 1]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&image[5..13]);
        let token = match image[13] {
            0 => None,
            1 => Some(
                DongleToken::from_slice(&image[14..46])
                    .map_err(|_| ImageError::Invalid("token"))?,
            ),
            _ => return Err(ImageError::Invalid("token flag")),
        };
        let cooldown_until_unix_ms = match image[46] {
            0 => None,
            1 => {
                let mut end = [0u8; 8];
                end.copy_from_slice(&image[47..55]);
                Some(u64::from_le_bytes(end))
            }
            _ => return Err(ImageError::Invalid("cool-down flag")),
        };
        let mode = *CanMode::ALL
            .get(usize::from(image[66]))
            .ok_or(ImageError::Invalid("CAN mode"))?;
        Ok(Flash {
            device_id: DeviceId(id),
            token,
            cooldown_until_unix_ms,
            can: CanSettings {
                bitrate: u32::from_le_bytes([image[55], image[56], image[57], image[58]]),
                sample_point_permille: u16_at(59),
                prescaler: u16_at(61),
                sjw: image[63],
                tseg1: image[64],
                tseg2: image[65],
                mode,
                flags: image[67],
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Flash {
        let mut flash = Flash::new(DeviceId([1, 2, 3, 4, 5, 6, 7, 8]));
        flash.token = Some(DongleToken::from_bytes([7; 32]));
        flash.cooldown_until_unix_ms = Some(1_765_000_000_000);
        flash.can.mode = CanMode::ExtLoop;
        flash.can.bitrate = 250_000;
        flash
    }

    #[test]
    fn an_image_reads_back_as_written() {
        let flash = sample();
        assert_eq!(Flash::from_image(&flash.to_image()), Ok(flash));
        let fresh = Flash::new(DeviceId([9; 8]));
        assert_eq!(Flash::from_image(&fresh.to_image()), Ok(fresh));
    }

    #[test]
    fn an_erased_or_torn_page_is_not_a_state() {
        assert_eq!(
            Flash::from_image(&[0xff; IMAGE_LEN]),
            Err(ImageError::Empty)
        );
        let mut image = sample().to_image();
        image[20] ^= 1;
        assert_eq!(Flash::from_image(&image), Err(ImageError::Damaged));
        let mut image = sample().to_image();
        image[4] = 2;
        assert_eq!(Flash::from_image(&image), Err(ImageError::Version(2)));
    }

    proptest! {
        #[test]
        fn no_image_panics(bytes in proptest::collection::vec(any::<u8>(), IMAGE_LEN)) {
            // A valid header and CRC around random fields, so that the field checks are reached.
            let mut image = [0u8; IMAGE_LEN];
            image.copy_from_slice(&bytes);
            image[0..4].copy_from_slice(&MAGIC);
            image[4] = IMAGE_VERSION;
            let crc = crc32::checksum(&image[..68]);
            image[68..72].copy_from_slice(&crc.to_le_bytes());
            if let Ok(flash) = Flash::from_image(&image) {
                prop_assert_eq!(Flash::from_image(&flash.to_image()), Ok(flash));
            }
        }
    }
}
