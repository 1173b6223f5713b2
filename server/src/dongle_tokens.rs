//! Dongle tokens at rest (SPEC 3.5): AES-256-GCM with versioned master keys and row-bound associated data,
//! and the key rotation behind `bridge-server keys rotate`.
//!
//! A token is 32 random bytes. Its row in `dongle_tokens` holds the key version, a fresh 96-bit nonce and
//! the ciphertext with its tag. The associated data is [`AAD_LABEL`], the dongle's id and the key version,
//! so a ciphertext copied to another row, or relabelled with another key version, does not decrypt.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngExt;
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::audit::{self, Entry, Target};

/// The fixed label at the start of the associated data.
pub const AAD_LABEL: &[u8] = b"bridge-server/dongle-token/v1";
/// The environment variables the keys come from: `DONGLE_TOKEN_MASTER_KEY_V1`, `_V2`, ...
pub const KEY_ENV_PREFIX: &str = "DONGLE_TOKEN_MASTER_KEY_V";
/// The file a development server keeps its generated key in, inside its data folder.
pub const DEV_KEY_FILE: &str = "dongle-token-master-key-v1";

/// A dongle token in clear: only ever in memory, on its way to a dongle's agent. It is the control
/// protocol's type, so it goes into a message as it is; its `Debug` output is redacted.
pub use control_proto::Token as DongleToken;

/// A new token: 32 random bytes.
pub fn generate() -> DongleToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes[..]);
    DongleToken::from_bytes(bytes)
}

/// What goes into a `dongle_tokens` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_version: i32,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("{name} is not the base64 of 32 bytes")]
    BadKey { name: String },
    #[error("no dongle token key is configured: set {KEY_ENV_PREFIX}1 (base64 of 32 bytes)")]
    NoKey,
    #[error("key version {0} is not configured: set {KEY_ENV_PREFIX}{0}")]
    MissingVersion(i32),
    #[error("could not read or write the development key file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Wrong key, wrong row, or a damaged ciphertext; the message says no more on purpose.
    #[error("the stored dongle token does not decrypt for this row")]
    Decrypt,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// The master keys by version. New writes use [`KeyRing::write_version`].
#[derive(Clone)]
pub struct KeyRing {
    keys: BTreeMap<i32, [u8; 32]>,
    write_version: i32,
}

impl fmt::Debug for KeyRing {
    // Key material never reaches a log line: only the versions are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("write_version", &self.write_version)
            .finish()
    }
}

impl Default for KeyRing {
    /// A random, in-memory key of version 1: what tests and throwaway servers run with. `serve` always
    /// loads its keys from the environment or the data folder.
    fn default() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill(&mut key[..]);
        Self::new([(1, key)]).expect("one key")
    }
}

impl KeyRing {
    /// A ring of `keys`, writing with the highest version.
    pub fn new(keys: impl IntoIterator<Item = (i32, [u8; 32])>) -> Result<Self, KeyError> {
        let keys: BTreeMap<i32, [u8; 32]> = keys.into_iter().collect();
        let write_version = *keys.keys().next_back().ok_or(KeyError::NoKey)?;
        Ok(Self {
            keys,
            write_version,
        })
    }

    /// Parses `(name, base64 value)` pairs named `DONGLE_TOKEN_MASTER_KEY_V<n>`; other names are ignored.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<Self>, KeyError> {
        let mut keys = Vec::new();
        for (name, value) in vars {
            let Some(version) = name.strip_prefix(KEY_ENV_PREFIX) else {
                continue;
            };
            let Ok(version) = version.parse::<i32>() else {
                continue;
            };
            if version < 1 {
                continue;
            }
            keys.push((version, decode_key(&name, &value)?));
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Self::new(keys).map(Some)
    }

    /// The keys of the process environment, or, when none is set, a development key kept in
    /// `data_dir` (made on first use, mode 0600). The second value is true when the development key
    /// was used, so the caller can say so.
    pub fn from_env_or_dev(data_dir: &Path) -> Result<(Self, bool), KeyError> {
        if let Some(ring) = Self::from_vars(std::env::vars())? {
            return Ok((ring, false));
        }
        let path = data_dir.join(DEV_KEY_FILE);
        let file_err = |source| KeyError::File {
            path: path.display().to_string(),
            source,
        };
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => decode_key(DEV_KEY_FILE, text.trim())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(file_err)?;
                let mut key = [0u8; 32];
                rand::rng().fill(&mut key[..]);
                write_private(&path, B64.encode(key).as_bytes()).map_err(file_err)?;
                key
            }
            Err(e) => return Err(file_err(e)),
        };
        Ok((Self::new([(1, key)])?, true))
    }

    /// The same keys, writing with `version` (e.g. `keys rotate --to N`).
    pub fn writing_with(mut self, version: i32) -> Result<Self, KeyError> {
        if !self.keys.contains_key(&version) {
            return Err(KeyError::MissingVersion(version));
        }
        self.write_version = version;
        Ok(self)
    }

    pub fn write_version(&self) -> i32 {
        self.write_version
    }

    pub fn versions(&self) -> Vec<i32> {
        self.keys.keys().copied().collect()
    }

    /// A 32-byte key for another purpose than dongle tokens, derived from master key `version` as
    /// HMAC-SHA256(master key, `label`): one configured secret then serves several purposes, and a
    /// ciphertext made for one purpose never opens under another. `None` when the version is unknown.
    pub fn derive(&self, version: i32, label: &[u8]) -> Option<[u8; 32]> {
        use hmac::{Hmac, Mac};
        let key = self.keys.get(&version)?;
        let mut mac = <Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(key)
            .expect("HMAC takes a key of any length");
        mac.update(label);
        Some(mac.finalize().into_bytes().into())
    }

    fn cipher(&self, version: i32) -> Result<Aes256Gcm, KeyError> {
        let key = self
            .keys
            .get(&version)
            .ok_or(KeyError::MissingVersion(version))?;
        Ok(Aes256Gcm::new_from_slice(key).expect("32-byte key"))
    }

    /// Encrypts `token` for the row of `dongle_id` with the write key and a fresh nonce.
    pub fn seal(&self, dongle_id: Uuid, token: &DongleToken) -> Result<Sealed, KeyError> {
        self.seal_with(self.write_version, dongle_id, token)
    }

    fn seal_with(
        &self,
        version: i32,
        dongle_id: Uuid,
        token: &DongleToken,
    ) -> Result<Sealed, KeyError> {
        let cipher = self.cipher(version)?;
        let mut nonce = [0u8; 12];
        rand::rng().fill(&mut nonce[..]);
        let aad = aad(dongle_id, version);
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: token.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        Ok(Sealed {
            key_version: version,
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypts a row's ciphertext; fails for any other row, key version or damage.
    pub fn open(&self, dongle_id: Uuid, sealed: &Sealed) -> Result<DongleToken, TokenError> {
        let cipher = self.cipher(sealed.key_version)?;
        let nonce: [u8; 12] = sealed
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::Decrypt)?;
        let aad = aad(dongle_id, sealed.key_version);
        let plain = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| TokenError::Decrypt)?;
        let bytes: [u8; 32] = plain.try_into().map_err(|_| TokenError::Decrypt)?;
        Ok(DongleToken::from_bytes(bytes))
    }
}

fn decode_key(name: &str, value: &str) -> Result<[u8; 32], KeyError> {
    B64.decode(value.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| KeyError::BadKey {
            name: name.to_string(),
        })
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// The associated data binding a ciphertext to its row and key version.
pub fn aad(dongle_id: Uuid, key_version: i32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 1 + 16 + 4);
    aad.extend_from_slice(AAD_LABEL);
    aad.push(0);
    aad.extend_from_slice(dongle_id.as_bytes());
    aad.extend_from_slice(&key_version.to_be_bytes());
    aad
}

/// Encrypts and stores the token of a dongle (replacing any earlier one).
pub async fn store(
    db: impl PgExecutor<'_>,
    keys: &KeyRing,
    dongle_id: Uuid,
    token: &DongleToken,
) -> Result<(), TokenError> {
    let sealed = keys.seal(dongle_id, token)?;
    sqlx::query(
        "INSERT INTO dongle_tokens (dongle_id, key_version, nonce, ciphertext) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (dongle_id) DO UPDATE SET key_version = EXCLUDED.key_version, \
         nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext",
    )
    .bind(dongle_id)
    .bind(sealed.key_version)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .execute(db)
    .await?;
    Ok(())
}

/// The stored row of a dongle's token, if any.
pub async fn load_sealed(
    db: impl PgExecutor<'_>,
    dongle_id: Uuid,
) -> Result<Option<Sealed>, sqlx::Error> {
    let row: Option<(i32, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT key_version, nonce, ciphertext FROM dongle_tokens WHERE dongle_id = $1",
    )
    .bind(dongle_id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(key_version, nonce, ciphertext)| Sealed {
        key_version,
        nonce,
        ciphertext,
    }))
}

/// The token of a dongle in clear, if it has one.
pub async fn load(
    db: impl PgExecutor<'_>,
    keys: &KeyRing,
    dongle_id: Uuid,
) -> Result<Option<DongleToken>, TokenError> {
    match load_sealed(db, dongle_id).await? {
        Some(sealed) => keys.open(dongle_id, &sealed).map(Some),
        None => Ok(None),
    }
}

/// How many token rows use each key version.
pub async fn status(pool: &PgPool) -> Result<Vec<(i32, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT key_version, count(*) FROM dongle_tokens GROUP BY key_version ORDER BY key_version",
    )
    .fetch_all(pool)
    .await
}

/// How `rotate` runs.
#[derive(Debug, Clone, Copy)]
pub struct RotateOptions {
    pub to: i32,
    pub dry_run: bool,
    pub batch_size: i64,
    /// Stop after this many batches (tests use it to stop half way, as a kill would).
    pub max_batches: Option<u32>,
}

/// What `rotate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotateReport {
    /// Rows re-encrypted (or, in a dry run, that would be).
    pub rows: u64,
    pub batches: u32,
    /// Rows still on another version when it stopped (the skipped ones included).
    pub remaining: i64,
    /// Rows that decrypt with no key of the ring (damaged, or sealed under a key that is gone), by
    /// dongle id: reported and left as they are, so that one bad row does not stop the rest.
    pub skipped: Vec<Uuid>,
}

/// Re-encrypts every row not on key `to` with key `to`, one committed batch at a time, each batch with
/// an audit entry. Each row is replaced by one UPDATE of its own, so a stop at any point leaves every row
/// either old or new and decryptable; running it again continues, and a finished rotation is a no-op.
pub async fn rotate(
    pool: &PgPool,
    keys: &KeyRing,
    options: RotateOptions,
) -> Result<RotateReport, TokenError> {
    keys.cipher(options.to)?;
    let mut report = RotateReport::default();
    if options.dry_run {
        let rows: Vec<(Uuid, i32, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT dongle_id, key_version, nonce, ciphertext FROM dongle_tokens WHERE key_version <> $1 \
             ORDER BY dongle_id",
        )
        .bind(options.to)
        .fetch_all(pool)
        .await?;
        for (dongle_id, key_version, nonce, ciphertext) in rows {
            // A dry run proves which rows would decrypt, without writing anything.
            let sealed = Sealed {
                key_version,
                nonce,
                ciphertext,
            };
            match keys.open(dongle_id, &sealed) {
                Ok(_) => report.rows += 1,
                Err(e) => skip(&mut report, dongle_id, key_version, &e),
            }
        }
        report.remaining = report.rows as i64 + report.skipped.len() as i64;
        return Ok(report);
    }
    let mut after: Option<Uuid> = None;
    loop {
        if options.max_batches.is_some_and(|m| report.batches >= m) {
            break;
        }
        let mut tx = pool.begin().await?;
        // SKIP LOCKED lets two rotations run at once without waiting on each other's rows. Rows come
        // in id order after the last one looked at, so a row that did not decrypt is not asked for
        // again, and however many are skipped each is read once.
        let rows: Vec<(Uuid, i32, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT dongle_id, key_version, nonce, ciphertext FROM dongle_tokens \
             WHERE key_version <> $1 AND ($3::uuid IS NULL OR dongle_id > $3) \
             ORDER BY dongle_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(options.to)
        .bind(options.batch_size.max(1))
        .bind(after)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = rows.last().map(|r| r.0) else {
            break;
        };
        after = Some(last);
        let mut from_versions = BTreeMap::<i32, u64>::new();
        let mut rotated = 0u64;
        let mut skipped = Vec::new();
        for (dongle_id, key_version, nonce, ciphertext) in &rows {
            let sealed = Sealed {
                key_version: *key_version,
                nonce: nonce.clone(),
                ciphertext: ciphertext.clone(),
            };
            let token = match keys.open(*dongle_id, &sealed) {
                Ok(token) => token,
                Err(e) => {
                    skip(&mut report, *dongle_id, *key_version, &e);
                    skipped.push(*dongle_id);
                    continue;
                }
            };
            let sealed = keys.seal_with(options.to, *dongle_id, &token)?;
            sqlx::query(
                "UPDATE dongle_tokens SET key_version = $2, nonce = $3, ciphertext = $4 \
                 WHERE dongle_id = $1 AND key_version = $5",
            )
            .bind(dongle_id)
            .bind(sealed.key_version)
            .bind(&sealed.nonce)
            .bind(&sealed.ciphertext)
            .bind(key_version)
            .execute(&mut *tx)
            .await?;
            *from_versions.entry(*key_version).or_default() += 1;
            rotated += 1;
        }
        audit::record(
            &mut *tx,
            Entry {
                actor: None,
                action: "keys.rotated_batch",
                target: Some(Target {
                    kind: "key_version",
                    id: options.to.to_string(),
                }),
                ip: None,
                user_agent: None,
                details: serde_json::json!({
                    "to": options.to,
                    "rows": rotated,
                    "from_versions": from_versions,
                    "skipped": skipped,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        report.rows += rotated;
        report.batches += 1;
    }
    report.remaining =
        sqlx::query_scalar("SELECT count(*) FROM dongle_tokens WHERE key_version <> $1")
            .bind(options.to)
            .fetch_one(pool)
            .await?;
    Ok(report)
}

/// Notes a row that `rotate` could not decrypt. Only the id and the key version are logged: the error
/// says no more than "does not decrypt" on purpose.
fn skip(report: &mut RotateReport, dongle_id: Uuid, key_version: i32, error: &TokenError) {
    tracing::warn!(%dongle_id, key_version, %error, "a dongle token does not decrypt: left as it is");
    report.skipped.push(dongle_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new([(1, [1u8; 32]), (2, [2u8; 32])]).unwrap()
    }

    #[test]
    fn a_sealed_token_opens_only_for_its_own_row_and_version() {
        let keys = ring();
        let row = Uuid::new_v4();
        let token = generate();
        let sealed = keys.seal(row, &token).unwrap();
        assert_eq!(sealed.key_version, 2);
        assert_eq!(sealed.nonce.len(), 12);
        assert_eq!(keys.open(row, &sealed).unwrap(), token);
        assert!(matches!(
            keys.open(Uuid::new_v4(), &sealed),
            Err(TokenError::Decrypt)
        ));
        let relabelled = Sealed {
            key_version: 1,
            ..sealed.clone()
        };
        assert!(matches!(
            keys.open(row, &relabelled),
            Err(TokenError::Decrypt)
        ));
        let mut damaged = sealed.clone();
        damaged.ciphertext[0] ^= 1;
        assert!(matches!(keys.open(row, &damaged), Err(TokenError::Decrypt)));
    }

    #[test]
    fn nonces_are_fresh() {
        let keys = ring();
        let row = Uuid::new_v4();
        let token = generate();
        assert_ne!(
            keys.seal(row, &token).unwrap().nonce,
            keys.seal(row, &token).unwrap().nonce
        );
    }

    #[test]
    fn keys_come_from_versioned_variables_and_never_show_in_debug() {
        let k1 = B64.encode([7u8; 32]);
        let ring = KeyRing::from_vars([
            (format!("{KEY_ENV_PREFIX}1"), k1.clone()),
            (format!("{KEY_ENV_PREFIX}3"), B64.encode([9u8; 32])),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(ring.write_version(), 3);
        assert_eq!(ring.versions(), vec![1, 3]);
        assert!(!format!("{ring:?}").contains(&k1));
        assert!(matches!(
            KeyRing::from_vars([(format!("{KEY_ENV_PREFIX}1"), "short".to_string())]),
            Err(KeyError::BadKey { .. })
        ));
        assert!(KeyRing::from_vars([]).unwrap().is_none());
        assert!(format!("{:?}", generate()) == "DongleToken(**redacted**)");
    }

    #[test]
    fn the_development_key_is_made_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        // Only meaningful when the environment names no key; a CI with keys set skips the check.
        if std::env::vars().any(|(k, _)| k.starts_with(KEY_ENV_PREFIX)) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, dev) = KeyRing::from_env_or_dev(dir.path()).unwrap();
        assert!(dev);
        let mode = std::fs::metadata(dir.path().join(DEV_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, _) = KeyRing::from_env_or_dev(dir.path()).unwrap();
        let row = Uuid::new_v4();
        let token = generate();
        assert_eq!(b.open(row, &a.seal(row, &token).unwrap()).unwrap(), token);
    }
}
