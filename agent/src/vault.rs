//! The agent's token vault: dongle tokens kept on disk, encrypted with AES-256-GCM.
//!
//! The server hands the agent a dongle's token only for dongles of the agent's own user. The agent must
//! keep it across restarts to authenticate to the dongle, so it stores it here: one random 32-byte key in
//! `vault.key` and one ciphertext per dongle in `vault.json`, both mode 0600 (on Windows the key is
//! also sealed with DPAPI for the user, see `platform`). Each ciphertext is bound to
//! its device id through the associated data, so an entry copied under another device id fails to decrypt.
//!
//! Nothing outside this module sees a token's plaintext except the session that sends it to the dongle.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use firmware_proto::ids::{DeviceId, DongleToken};
use rand::RngExt;
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "vault.key";
const VAULT_FILE: &str = "vault.json";
const AAD_LABEL: &[u8] = b"bridge-agent vault v1:";
const FORMAT_VERSION: u32 = 1;

/// What can go wrong with the vault. Messages name the file and what to do; never a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    #[error("could not read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the vault key {path} is damaged (expected 32 bytes): restore it from a backup, or delete it and \
         vault.json together and pair the dongles again"
    )]
    KeyDamaged { path: PathBuf },
    #[error(
        "the vault key {path} could not be unsealed for this user ({source}): it is damaged, or was sealed \
         by another user or on another machine; restore it from a backup, or delete it and vault.json \
         together and pair the dongles again"
    )]
    KeyNotUnsealed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the vault {path} is damaged ({reason}): restore it from a backup, or delete it and pair the \
         dongles again"
    )]
    VaultDamaged { path: PathBuf, reason: String },
    #[error(
        "the token for dongle {device_id} does not decrypt with this vault's key: the vault file was \
         changed or belongs to another key; unpair and pair the dongle again"
    )]
    Decrypt { device_id: DeviceId },
}

#[derive(Serialize, Deserialize, Default)]
struct VaultFile {
    version: u32,
    entries: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Entry {
    nonce: String,
    ciphertext: String,
}

/// An open vault. Every change is written to disk before the call returns.
pub struct Vault {
    dir: PathBuf,
    cipher: Aes256Gcm,
    file: VaultFile,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.dir)
            .field("entries", &self.file.entries.len())
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens the vault in `dir`, creating the folder, the key and an empty vault when absent.
    pub fn open(dir: &Path) -> Result<Self, VaultError> {
        create_private_dir(dir)?;
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| VaultError::KeyDamaged {
            path: dir.join(KEY_FILE),
        })?;
        let path = dir.join(VAULT_FILE);
        let file = match fs::read(&path) {
            Ok(bytes) => {
                let file: VaultFile =
                    serde_json::from_slice(&bytes).map_err(|e| VaultError::VaultDamaged {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(VaultError::VaultDamaged {
                        path,
                        reason: format!("unknown format version {}", file.version),
                    });
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VaultFile {
                version: FORMAT_VERSION,
                entries: BTreeMap::new(),
            },
            Err(source) => return Err(VaultError::Io { path, source }),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            cipher,
            file,
        })
    }

    /// The token stored for `device_id`, if any.
    pub fn get(&self, device_id: &DeviceId) -> Result<Option<DongleToken>, VaultError> {
        let Some(entry) = self.file.entries.get(&device_id.to_string()) else {
            return Ok(None);
        };
        let damaged = |reason: &str| VaultError::VaultDamaged {
            path: self.dir.join(VAULT_FILE),
            reason: format!("entry {device_id}: {reason}"),
        };
        let nonce: [u8; 12] = B64
            .decode(&entry.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| damaged("bad nonce"))?;
        let ciphertext = B64
            .decode(&entry.ciphertext)
            .map_err(|_| damaged("bad ciphertext"))?;
        let plaintext = self
            .cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad(device_id),
                },
            )
            .map_err(|_| VaultError::Decrypt {
                device_id: *device_id,
            })?;
        DongleToken::from_slice(&plaintext)
            .map(Some)
            .map_err(|_| damaged("the decrypted token is not 32 bytes"))
    }

    /// Stores (or replaces) the token for `device_id` under a fresh random nonce.
    pub fn put(&mut self, device_id: &DeviceId, token: &DongleToken) -> Result<(), VaultError> {
        let nonce: [u8; 12] = rand::rng().random();
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: &aad(device_id),
                },
            )
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        self.file.entries.insert(
            device_id.to_string(),
            Entry {
                nonce: B64.encode(nonce),
                ciphertext: B64.encode(ciphertext),
            },
        );
        self.save()
    }

    /// Forgets the token for `device_id`; true when there was one.
    pub fn remove(&mut self, device_id: &DeviceId) -> Result<bool, VaultError> {
        let removed = self.file.entries.remove(&device_id.to_string()).is_some();
        if removed {
            self.save()?;
        }
        Ok(removed)
    }

    /// The device ids that have a token.
    pub fn device_ids(&self) -> Vec<DeviceId> {
        self.file
            .entries
            .keys()
            .filter_map(|k| k.parse().ok())
            .collect()
    }

    fn save(&self) -> Result<(), VaultError> {
        let bytes = serde_json::to_vec_pretty(&self.file).expect("the vault serialises");
        write_private_atomic(&self.dir.join(VAULT_FILE), &bytes)
    }
}

/// The associated data that binds a ciphertext to its device id.
fn aad(device_id: &DeviceId) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(device_id.as_bytes());
    aad
}

/// The vault key in `path`, made when absent. Where the OS seals keys (DPAPI on Windows) the file holds
/// the sealed key, and a key an earlier agent stored in the clear is sealed the first time it is read.
fn load_or_create_key(path: &Path) -> Result<[u8; 32], VaultError> {
    load_or_create_key_with(path, |from, to| fs::hard_link(from, to))
}

/// [`load_or_create_key`], with `link` standing for `fs::hard_link` (tests stand in a filesystem
/// without hard links).
fn load_or_create_key_with(
    path: &Path,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> Result<[u8; 32], VaultError> {
    let io = |source| VaultError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(stored) => {
            // A key that does not read whole may be one another agent is still writing in place (a
            // filesystem without hard links): its key is the vault's once it is written.
            let key = match unseal(path, &stored) {
                Err(VaultError::KeyDamaged { .. } | VaultError::KeyNotUnsealed { .. }) => {
                    return read_made_key(path);
                }
                read => read?,
            };
            // A key stored in the clear by an earlier agent is sealed now, once the file is seen not
            // to change (it is not a seal another agent is still writing).
            if crate::platform::SEALS_KEYS
                && stored.as_slice() == key.as_slice()
                && settled(path, &stored)
            {
                // The key is read either way: a seal that fails now is tried again at the next open.
                let sealed = crate::platform::seal_key(&key)
                    .map_err(io)
                    .and_then(|sealed| write_private_atomic(path, &sealed));
                if let Err(e) = sealed {
                    tracing::warn!(error = %e, "the vault key is still stored in the clear");
                }
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::rng().random();
            let stored = crate::platform::seal_key(&key).map_err(io)?;
            match create_key_file(path, &stored, link) {
                Ok(()) => Ok(key),
                // Another agent made it first: its key is the vault's.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_made_key(path),
                Err(e) => Err(io(e)),
            }
        }
        Err(source) => Err(io(source)),
    }
}

/// Puts a new key file at `path`, never over one that exists (AlreadyExists then). It is written whole
/// beside it and linked into place, so that two agents starting at once never each keep a different
/// key and neither reads half of one. Where the filesystem has no hard links (FAT, some network
/// mounts), it is created exclusively in place and written there, and another agent reading it
/// meanwhile waits for it to be whole ([`read_made_key`]).
fn create_key_file(
    path: &Path,
    stored: &[u8],
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = crate::home::temp_path_for(path);
    let written = crate::platform::private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .and_then(|mut file| file.write_all(stored).and_then(|_| file.sync_all()));
    let placed = written.and_then(|()| match link(&tmp, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            tracing::info!(error = %e, "no hard link for the vault key here: it is made in place");
            let mut file = crate::platform::private_file_options()
                .write(true)
                .create_new(true)
                .open(path)?;
            let written = file.write_all(stored).and_then(|_| file.sync_all());
            if written.is_err() {
                // The file is this agent's (it made it): a key that was never whole must not stay
                // behind for the next start to take for a damaged one.
                drop(file);
                let _ = fs::remove_file(path);
            }
            written
        }
        linked => linked,
    });
    let _ = fs::remove_file(&tmp);
    placed
}

/// How long an agent that found a key file being made elsewhere waits for it to be whole.
const KEY_MADE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The key another agent has just made at `path`. On a filesystem without hard links it may still be
/// being written: a key that does not read whole is read again until [`KEY_MADE_WAIT`] has passed,
/// and then it is damaged (or sealed for someone else), which the error says.
fn read_made_key(path: &Path) -> Result<[u8; 32], VaultError> {
    let deadline = std::time::Instant::now() + KEY_MADE_WAIT;
    loop {
        let read = fs::read(path)
            .map_err(|source| VaultError::Io {
                path: path.to_path_buf(),
                source,
            })
            .and_then(|stored| unseal(path, &stored));
        match read {
            Err(VaultError::KeyDamaged { .. } | VaultError::KeyNotUnsealed { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Whether `path` still holds `stored` after a moment: nobody is writing it.
fn settled(path: &Path, stored: &[u8]) -> bool {
    std::thread::sleep(std::time::Duration::from_millis(50));
    fs::read(path).is_ok_and(|now| now == stored)
}

/// The vault key from what `path` holds.
fn unseal(path: &Path, stored: &[u8]) -> Result<[u8; 32], VaultError> {
    crate::platform::unseal_key(stored)
        .map_err(|source| VaultError::KeyNotUnsealed {
            path: path.to_path_buf(),
            source,
        })?
        .try_into()
        .map_err(|_| VaultError::KeyDamaged {
            path: path.to_path_buf(),
        })
}

/// Creates `dir` (and its parents) and makes it private to this user.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), VaultError> {
    let io = |source| VaultError::Io {
        path: dir.to_path_buf(),
        source,
    };
    crate::platform::create_private_dir(dir).map_err(io)
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file and a rename, so that a crash
/// leaves either the old file or the new one, never half of one.
pub(crate) fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    let io = |source| VaultError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = crate::home::temp_path_for(path);
    let mut file = crate::platform::private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io)?;
    crate::platform::restrict(&file).map_err(io)?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeviceId {
        DeviceId::from_bytes([0, 1, 2, 3, 4, 5, 6, n])
    }

    #[test]
    fn tokens_survive_reopening_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let token = DongleToken::from_bytes([7; 32]);
        {
            let mut vault = Vault::open(dir.path()).unwrap();
            assert!(vault.get(&id(1)).unwrap().is_none());
            vault.put(&id(1), &token).unwrap();
        }
        let vault = Vault::open(dir.path()).unwrap();
        assert_eq!(vault.get(&id(1)).unwrap(), Some(token));
        assert_eq!(vault.device_ids(), vec![id(1)]);
        #[cfg(unix)]
        for file in [KEY_FILE, VAULT_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
        // The plaintext never reaches the disk.
        let raw = fs::read(dir.path().join(VAULT_FILE)).unwrap();
        assert!(!raw.windows(32).any(|w| w == [7; 32]));
        assert!(!String::from_utf8_lossy(&raw).contains(&hex::encode([7u8; 32])));
    }

    /// On Windows the key file holds the key sealed with DPAPI, a key an earlier agent left in the
    /// clear is sealed when the vault opens and keeps its tokens, and a sealed key that does not unseal
    /// (another user's, another machine's) is told as such.
    #[test]
    #[cfg(windows)]
    fn on_windows_the_key_is_sealed_for_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join(KEY_FILE);
        let clear = [5u8; 32];
        fs::write(&key_path, clear).unwrap();
        let token = DongleToken::from_bytes([7; 32]);
        Vault::open(dir.path())
            .unwrap()
            .put(&id(1), &token)
            .unwrap();
        let stored = fs::read(&key_path).unwrap();
        assert_ne!(stored.as_slice(), clear.as_slice(), "still in the clear");
        assert!(!stored.windows(32).any(|w| w == clear));
        assert_eq!(crate::platform::unseal_key(&stored).unwrap(), clear);
        assert_eq!(
            Vault::open(dir.path()).unwrap().get(&id(1)).unwrap(),
            Some(token)
        );

        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(KEY_FILE), [0xA5u8; 180]).unwrap();
        let err = Vault::open(other.path()).unwrap_err();
        assert!(matches!(err, VaultError::KeyNotUnsealed { .. }), "{err}");
        assert!(err.to_string().contains("pair the dongles again"), "{err}");
    }

    /// Agents started at once on one fresh folder all open the vault, with one key: none reads a key
    /// file another is still writing, and none keeps a key of its own.
    #[test]
    fn agents_opening_a_fresh_vault_at_once_agree_on_its_key() {
        // A race: enough rounds that the old code (the key written in place) failed most runs.
        for _ in 0..100 {
            let dir = tempfile::tempdir().unwrap();
            let vaults: Vec<Vault> = std::thread::scope(|scope| {
                let opening: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| Vault::open(dir.path())))
                    .collect();
                opening
                    .into_iter()
                    .map(|t| t.join().unwrap().unwrap())
                    .collect()
            });
            let token = DongleToken::from_bytes([4; 32]);
            let mut first = Vault::open(dir.path()).unwrap();
            first.put(&id(1), &token).unwrap();
            for mut vault in vaults {
                // Each reads the file again through its own key.
                vault.file = Vault::open(dir.path()).unwrap().file;
                assert_eq!(vault.get(&id(1)).unwrap(), Some(token));
            }
        }
    }

    /// FAT and some network mounts have no hard links: agents starting at once on such a folder still
    /// make one key between them (before, none could make a vault there at all).
    #[test]
    fn without_hard_links_agents_opening_a_fresh_vault_at_once_agree_on_its_key() {
        let no_links = |_: &Path, _: &Path| -> std::io::Result<()> {
            Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "this filesystem has no hard links",
            ))
        };
        for _ in 0..50 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(KEY_FILE);
            let keys: Vec<[u8; 32]> = std::thread::scope(|scope| {
                let opening: Vec<_> = (0..8)
                    .map(|_| scope.spawn(|| load_or_create_key_with(&path, no_links)))
                    .collect();
                opening
                    .into_iter()
                    .map(|t| t.join().unwrap().unwrap())
                    .collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]));
            assert_eq!(load_or_create_key(&path).unwrap(), keys[0]);
            // Nothing is left beside the key.
            let files: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(files.len(), 1, "{files:?}");
        }
    }

    #[test]
    fn an_entry_moved_to_another_device_id_does_not_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let mut vault = Vault::open(dir.path()).unwrap();
        vault
            .put(&id(1), &DongleToken::from_bytes([9; 32]))
            .unwrap();
        let entry = vault.file.entries[&id(1).to_string()].clone();
        vault.file.entries.insert(id(2).to_string(), entry);
        vault.save().unwrap();

        let vault = Vault::open(dir.path()).unwrap();
        assert!(matches!(
            vault.get(&id(2)),
            Err(VaultError::Decrypt { device_id }) if device_id == id(2)
        ));
        assert!(vault.get(&id(1)).unwrap().is_some());
    }

    #[test]
    fn a_damaged_key_or_vault_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut vault = Vault::open(dir.path()).unwrap();
        vault
            .put(&id(1), &DongleToken::from_bytes([1; 32]))
            .unwrap();

        fs::write(dir.path().join(VAULT_FILE), b"{ not json").unwrap();
        let err = Vault::open(dir.path()).unwrap_err();
        assert!(matches!(err, VaultError::VaultDamaged { .. }), "{err}");
        assert!(err.to_string().contains("vault.json"));

        fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let err = Vault::open(dir.path()).unwrap_err();
        // Where keys are sealed, five bytes are a seal that does not open rather than a short key.
        if crate::platform::SEALS_KEYS {
            assert!(matches!(err, VaultError::KeyNotUnsealed { .. }), "{err}");
        } else {
            assert!(matches!(err, VaultError::KeyDamaged { .. }), "{err}");
        }
        assert!(err.to_string().contains("vault.key"), "{err}");
    }

    #[test]
    fn a_tampered_ciphertext_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut vault = Vault::open(dir.path()).unwrap();
        vault
            .put(&id(1), &DongleToken::from_bytes([3; 32]))
            .unwrap();
        let entry = vault.file.entries.get_mut(&id(1).to_string()).unwrap();
        let mut ct = B64.decode(&entry.ciphertext).unwrap();
        ct[0] ^= 1;
        entry.ciphertext = B64.encode(ct);
        assert!(matches!(vault.get(&id(1)), Err(VaultError::Decrypt { .. })));
        assert!(vault.remove(&id(1)).unwrap());
        assert!(!vault.remove(&id(1)).unwrap());
    }
}
