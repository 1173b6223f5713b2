//! The agent's folder on disk: the server credentials, the token vault and the command journal.
//!
//! One folder holds everything the agent keeps between runs, so that `logout` and a backup each concern
//! one place. It is `--home`, else `$BRIDGE_AGENT_HOME`, else the platform's config folder
//! (`~/.config/bridge-agent` on Linux). The folder is made mode 0700 and every secret file in it 0600.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

const CREDENTIALS_FILE: &str = "agent.json";
const JOURNAL_DIR: &str = "commands";

/// What can go wrong with the agent's folder. Messages name the file and what to do; never a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    #[error(
        "no folder for the agent's state: set --home or BRIDGE_AGENT_HOME (the platform has no config folder)"
    )]
    NoHome,
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is damaged ({reason}): run `bridge-agent logout` and `bridge-agent login` again"
    )]
    Damaged { path: PathBuf, reason: String },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HomeError {
    let path = path.to_path_buf();
    move |source| HomeError::Io {
        action,
        path,
        source,
    }
}

/// What `login` stores: where the server is and how this agent proves who it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The server's base URL, e.g. `https://bridge.example.com`.
    pub server_url: String,
    pub agent_id: Uuid,
    /// The bearer token, shown once by the server at registration.
    pub agent_token: String,
    /// A PEM file of CA certificates to trust for this server besides the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("server_url", &self.server_url)
            .field("agent_id", &self.agent_id)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// The agent's folder.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `explicit` (from `--home` or `BRIDGE_AGENT_HOME`), else the platform's config folder.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        let dir = match explicit {
            Some(dir) => dir,
            None => dirs::config_dir()
                .ok_or(HomeError::NoHome)?
                .join("bridge-agent"),
        };
        Ok(Self { dir })
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the vault keeps its key and its tokens.
    pub fn vault_dir(&self) -> PathBuf {
        self.dir.join("vault")
    }

    /// Where the command journal keeps one file per command.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join(JOURNAL_DIR)
    }

    pub fn credentials_path(&self) -> PathBuf {
        self.dir.join(CREDENTIALS_FILE)
    }

    /// Makes the folder (private to this user: mode 0700 on Unix) if it is missing.
    pub fn create(&self) -> Result<(), HomeError> {
        crate::platform::create_private_dir(&self.dir).map_err(io("create", &self.dir))
    }

    /// The stored credentials, or `None` before the first `login`.
    pub fn load_credentials(&self) -> Result<Option<Credentials>, HomeError> {
        let path = self.credentials_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| HomeError::Damaged {
                path,
                // serde_json names a line and column, never the value it choked on.
                reason: e.to_string(),
            })
    }

    /// Stores the credentials, mode 0600, replacing the file whole so a crash never leaves half of one.
    pub fn save_credentials(&self, credentials: &Credentials) -> Result<(), HomeError> {
        self.create()?;
        let text = serde_json::to_string_pretty(credentials).expect("credentials serialize");
        write_private(&self.credentials_path(), text.as_bytes())
    }

    /// Deletes the credentials; false when there were none.
    pub fn remove_credentials(&self) -> Result<bool, HomeError> {
        let path = self.credentials_path();
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("delete", &path)(e)),
        }
    }
}

/// A temporary file beside `path` for writing it whole: named after the whole file name, this process
/// and a count of this process's calls, so that two files of one folder (vault.key and vault.json), two
/// agents on one folder, or two writers in one agent never share one.
pub(crate) fn temp_path_for(path: &Path) -> std::path::PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{call}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, mode 0600, synced, then renamed
/// over `path`: readers see the old file or the new one, never a mix.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HomeError> {
    let tmp = temp_path_for(path);
    let mut file = crate::platform::private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    crate::platform::restrict(&file).map_err(io("set the permissions of", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("replace", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            server_url: "http://127.0.0.1:8080".into(),
            agent_id: Uuid::nil(),
            agent_token: "s3cret-token".into(),
            ca_file: None,
        }
    }

    /// vault.key and vault.json once shared one temporary file (`vault.tmp`), so writing one while the
    /// other was written could rename the JSON over the key.
    #[test]
    fn files_of_one_folder_get_temporary_files_of_their_own() {
        let dir = Path::new("/agent/vault");
        let key = temp_path_for(&dir.join("vault.key"));
        let json = temp_path_for(&dir.join("vault.json"));
        assert_ne!(key, json);
        assert_ne!(
            key,
            temp_path_for(&dir.join("vault.key")),
            "nor two writers of one file"
        );
        assert_eq!(
            key.parent(),
            Some(dir),
            "beside the file, so the rename stays on one disk"
        );
    }

    #[test]
    fn credentials_round_trip_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path().join("agent"));
        assert_eq!(home.load_credentials().unwrap(), None);
        home.save_credentials(&creds()).unwrap();
        assert_eq!(home.load_credentials().unwrap(), Some(creds()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&home.credentials_path()), 0o600);
            assert_eq!(mode(home.dir()), 0o700);
        }
        assert!(home.remove_credentials().unwrap());
        assert!(!home.remove_credentials().unwrap());
    }

    #[test]
    fn a_damaged_file_is_a_clear_error_without_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        fs::write(
            home.credentials_path(),
            "{\"agent_token\": \"s3cret-token\", ",
        )
        .unwrap();
        let err = home.load_credentials().unwrap_err().to_string();
        assert!(err.contains("damaged") && err.contains("login"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        assert!(!format!("{:?}", creds()).contains("s3cret"));
    }
}
