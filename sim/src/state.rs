//! The dongle's flash: what survives a restart, kept in a JSON state file.
//!
//! The file holds the device id, the stored token (hex, because this file *is* the dongle's
//! flash; it is created with mode 0600), the end of a pairing cool-down as wall-clock time (so a
//! restart does not lift it) and the CAN configuration. It is written atomically: a temporary
//! file in the same folder, fsync, then rename over the old one, so a crash leaves the old or
//! the new contents, never half of each. A file that does not parse is an error that names
//! the file and says what to do; it is never silently replaced.
//!
//! [`Flash`] itself is the dongle core's; this module is the simulator's way of keeping it, through
//! the [`StateFile`] methods (a firmware keeps [`Flash::to_image`] in a flash page instead).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use firmware_proto::ids::{DeviceId, DongleToken};
use firmware_proto::remp::CanMode;
use serde::{Deserialize, Serialize};

pub use dongle_core::Flash;
use dongle_core::timing::CanSettings;

/// The largest state file read, in bytes; a real one is a few hundred.
const MAX_STATE_FILE_LEN: u64 = 64 * 1024;
/// The format version written into the file.
const FORMAT_VERSION: u32 = 1;

/// The wall clock the simulator gives its dongle core: milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but is not a valid state file.
    #[error(
        "state file {path} is damaged ({reason}); move it away to start as a new dongle, or restore it from a backup"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file belongs to another device id than the one asked for.
    #[error(
        "state file {path} holds device id {stored}, not the requested {requested}; use another --state file"
    )]
    DeviceIdMismatch {
        /// The file.
        path: PathBuf,
        /// The id in the file.
        stored: DeviceId,
        /// The id asked for.
        requested: DeviceId,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    device_id: String,
    token: Option<String>,
    cooldown_until_unix_ms: Option<u64>,
    can: StoredCan,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredCan {
    bitrate: u32,
    sample_point_permille: u16,
    prescaler: u16,
    sjw: u8,
    tseg1: u8,
    tseg2: u8,
    /// By its name (`normal`, `listen_only`, ...), checked as it is read.
    mode: CanMode,
    flags: u8,
}

/// The simulator's state file, as methods of the core's [`Flash`].
pub trait StateFile: Sized {
    /// A fresh flash with a random device id.
    fn random() -> Self;
    /// Reads the state file, or creates it when it does not exist (with `device_id`, or a
    /// random id). A `device_id` that disagrees with an existing file is an error.
    fn load_or_create(path: &Path, device_id: Option<DeviceId>) -> Result<Self, StateError>;
    /// Reads the state file; `Ok(None)` when it does not exist.
    fn load(path: &Path) -> Result<Option<Self>, StateError>;
    /// Writes the state file atomically (temporary file, fsync, rename), mode 0600.
    fn save(&self, path: &Path) -> Result<(), StateError>;
}

impl StateFile for Flash {
    fn random() -> Self {
        let mut id = [0u8; 8];
        rand::fill(&mut id);
        Self::new(DeviceId(id))
    }

    fn load_or_create(path: &Path, device_id: Option<DeviceId>) -> Result<Self, StateError> {
        match Self::load(path)? {
            Some(flash) => match device_id {
                Some(requested) if requested != flash.device_id => {
                    Err(StateError::DeviceIdMismatch {
                        path: path.into(),
                        stored: flash.device_id,
                        requested,
                    })
                }
                _ => Ok(flash),
            },
            None => {
                let flash = device_id.map_or_else(Self::random, Self::new);
                flash.save(path)?;
                Ok(flash)
            }
        }
    }

    fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let io = |source| StateError::Io {
            path: path.into(),
            source,
        };
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let mut text = String::new();
        file.take(MAX_STATE_FILE_LEN + 1)
            .read_to_string(&mut text)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    StateError::Damaged {
                        path: path.into(),
                        reason: "not UTF-8".into(),
                    }
                } else {
                    io(e)
                }
            })?;
        if text.len() as u64 > MAX_STATE_FILE_LEN {
            return Err(StateError::Damaged {
                path: path.into(),
                reason: "larger than 64 KiB".into(),
            });
        }
        parse(&text)
            .map(Some)
            .map_err(|reason| StateError::Damaged {
                path: path.into(),
                reason,
            })
    }

    fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.into(),
            source,
        };
        let c = &self.can;
        let format = FileFormat {
            version: FORMAT_VERSION,
            device_id: self.device_id.to_string(),
            token: self.token.map(|t| hex::encode(t.as_bytes())),
            cooldown_until_unix_ms: self.cooldown_until_unix_ms,
            can: StoredCan {
                bitrate: c.bitrate,
                sample_point_permille: c.sample_point_permille,
                prescaler: c.prescaler,
                sjw: c.sjw,
                tseg1: c.tseg1,
                tseg2: c.tseg2,
                mode: c.mode,
                flags: c.flags,
            },
        };
        let text =
            serde_json::to_string_pretty(&format).map_err(|e| io(std::io::Error::other(e)))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io(e)
        })
    }
}

fn parse(text: &str) -> Result<Flash, String> {
    let f: FileFormat = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if f.version != FORMAT_VERSION {
        return Err(format!("unknown format version {}", f.version));
    }
    let device_id = f
        .device_id
        .parse()
        .map_err(|_| "device_id is not 16 hex digits".to_string())?;
    let token = match f.token {
        None => None,
        Some(hex_token) => {
            let bytes = hex::decode(hex_token).map_err(|_| "token is not hex".to_string())?;
            Some(DongleToken::from_slice(&bytes).map_err(|_| "token is not 32 bytes".to_string())?)
        }
    };
    let c = f.can;
    let can = CanSettings {
        bitrate: c.bitrate,
        sample_point_permille: c.sample_point_permille,
        prescaler: c.prescaler,
        sjw: c.sjw,
        tseg1: c.tseg1,
        tseg2: c.tseg2,
        mode: c.mode,
        flags: c.flags,
    };
    Ok(Flash {
        device_id,
        token,
        cooldown_until_unix_ms: f.cooldown_until_unix_ms,
        can,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flash.json");
        let mut flash = Flash::load_or_create(&path, None).unwrap();
        flash.token = Some(DongleToken::from_bytes([7; 32]));
        flash.cooldown_until_unix_ms = Some(1234);
        flash.can.mode = CanMode::ListenOnly;
        flash.save(&path).unwrap();
        assert_eq!(Flash::load(&path).unwrap(), Some(flash.clone()));
        assert_eq!(
            Flash::load_or_create(&path, Some(flash.device_id)).unwrap(),
            flash
        );
        let other = DeviceId([9; 8]);
        assert!(matches!(
            Flash::load_or_create(&path, Some(other)),
            Err(StateError::DeviceIdMismatch { .. })
        ));
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flash.json");
        fs::write(&path, "{\"version\": 1, \"device_id\": \"zz\"").unwrap();
        let err = Flash::load_or_create(&path, None).unwrap_err();
        assert!(matches!(err, StateError::Damaged { .. }));
        assert!(err.to_string().contains("move it away"));
        fs::write(&path, vec![b' '; 70_000]).unwrap();
        assert!(matches!(
            Flash::load(&path),
            Err(StateError::Damaged { .. })
        ));
        // A mode no controller has, in a file otherwise whole, says which field is wrong.
        let good = Flash::load_or_create(&dir.path().join("good.json"), None).unwrap();
        good.save(&path).unwrap();
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("\"normal\"", "\"warp\"");
        fs::write(&path, text).unwrap();
        let err = Flash::load(&path).unwrap_err();
        assert!(matches!(err, StateError::Damaged { .. }));
        assert!(err.to_string().contains("CAN mode"), "{err}");
    }
}
