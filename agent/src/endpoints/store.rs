//! `endpoints.json` in the agent's folder: the local endpoints the agent serves, as their specs.
//!
//! ```json
//! {"version": 1, "endpoints": [{"spec": "slcan:/dev/ttyACM0@500000"}, {"spec": "socketcand:127.0.0.1:29536"}]}
//! ```
//!
//! One entry per identity: adding a spec whose identity is there already replaces its settings. The file
//! is written whole through [`crate::home::write_private`] (mode 0600, renamed into place), so a reader
//! sees the old list or the new one. `endpoint add` and a running daemon may both write it; the daemon
//! reads it again every few seconds ([`super::EndpointSet`]), so an endpoint added while it runs is
//! served without a restart.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::EndpointSpec;
use crate::home::{Home, HomeError, write_private};

/// The file's name in the agent's folder.
pub const ENDPOINTS_FILE: &str = "endpoints.json";
const VERSION: u32 = 1;

/// What can go wrong with `endpoints.json`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is damaged ({reason}): correct it, or delete it and add the endpoints again with `bridge-agent endpoint add`"
    )]
    Damaged { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct File {
    version: u32,
    endpoints: Vec<Stored>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    spec: String,
}

/// The endpoints file of one agent folder.
#[derive(Debug, Clone)]
pub struct EndpointStore {
    home: Home,
    path: PathBuf,
}

impl EndpointStore {
    pub fn new(home: &Home) -> Self {
        Self {
            home: home.clone(),
            path: home.dir().join(ENDPOINTS_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The endpoints kept, in the order they were added; none before the first `endpoint add`.
    pub fn load(&self) -> Result<Vec<EndpointSpec>, StoreError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let damaged = |reason: String| StoreError::Damaged {
            path: self.path.clone(),
            reason,
        };
        let file: File = serde_json::from_str(&text).map_err(|e| damaged(e.to_string()))?;
        if file.version != VERSION {
            return Err(damaged(format!(
                "version {} is not {VERSION}: a newer agent wrote it",
                file.version
            )));
        }
        file.endpoints
            .iter()
            .map(|s| {
                s.spec
                    .parse()
                    .map_err(|e: super::SpecError| damaged(e.to_string()))
            })
            .collect()
    }

    fn save(&self, specs: &[EndpointSpec]) -> Result<(), StoreError> {
        self.home.create()?;
        let file = File {
            version: VERSION,
            endpoints: specs
                .iter()
                .map(|s| Stored {
                    spec: s.to_string(),
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).expect("the endpoint list serializes");
        write_private(&self.path, text.as_bytes())?;
        Ok(())
    }

    /// Keeps `spec`, replacing the settings of an endpoint with the same identity; answers the spec it
    /// replaced, if any.
    pub fn add(&self, spec: &EndpointSpec) -> Result<Option<EndpointSpec>, StoreError> {
        let mut specs = self.load()?;
        let identity = spec.identity();
        let replaced = match specs.iter_mut().find(|s| s.identity() == identity) {
            Some(existing) => Some(std::mem::replace(existing, spec.clone())),
            None => {
                specs.push(spec.clone());
                None
            }
        };
        self.save(&specs)?;
        Ok(replaced)
    }

    /// Forgets the endpoint with `spec`'s identity (its settings do not matter); answers the spec it
    /// removed, if there was one.
    pub fn remove(&self, spec: &EndpointSpec) -> Result<Option<EndpointSpec>, StoreError> {
        let mut specs = self.load()?;
        let identity = spec.identity();
        let Some(index) = specs.iter().position(|s| s.identity() == identity) else {
            return Ok(None);
        };
        let removed = specs.remove(index);
        self.save(&specs)?;
        Ok(Some(removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> EndpointSpec {
        s.parse().unwrap()
    }

    #[test]
    fn add_replace_remove_round_trip_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(&Home::at(dir.path().join("agent")));
        assert!(store.load().unwrap().is_empty());
        assert_eq!(store.add(&spec("socketcan:can0")).unwrap(), None);
        assert_eq!(store.add(&spec("slcan:/dev/ttyACM0@500k")).unwrap(), None);
        assert_eq!(
            store.add(&spec("slcan:/dev/ttyACM0@1M")).unwrap(),
            Some(spec("slcan:/dev/ttyACM0@500000"))
        );
        assert_eq!(
            store.load().unwrap(),
            vec![spec("socketcan:can0"), spec("slcan:/dev/ttyACM0@1000000")]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            store.remove(&spec("slcan:/dev/ttyACM0")).unwrap(),
            Some(spec("slcan:/dev/ttyACM0@1M"))
        );
        assert_eq!(store.remove(&spec("slcan:/dev/ttyACM0")).unwrap(), None);
        assert_eq!(store.load().unwrap(), vec![spec("socketcan:can0")]);
    }

    #[test]
    fn a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::new(&Home::at(dir.path()));
        std::fs::write(
            store.path(),
            r#"{"version": 1, "endpoints": [{"spec": "usb:x"}]}"#,
        )
        .unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("endpoint add"), "{e}");
        std::fs::write(store.path(), "{").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Damaged { .. })));
    }
}
