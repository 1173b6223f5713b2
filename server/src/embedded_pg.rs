//! A private PostgreSQL cluster in a data folder, for `serve` without `DATABASE_URL` and for the demo.
//!
//! It uses the system's `initdb` and `pg_ctl` (found on PATH or in the newest
//! `/usr/lib/postgresql/*/bin`). The cluster lives in `<data dir>/postgres`, listens on a Unix socket in
//! a private temporary folder and on a free port of 127.0.0.1, and stops on [`EmbeddedPostgres::stop`]
//! or when the handle is dropped. As root, every PostgreSQL command runs as the `postgres` user through
//! `runuser`, since `initdb` refuses to run as root, and the data folder is handed to that user.
//!
//! Connections come through the socket, which only the cluster's owner (and root) can reach; TCP needs
//! the superuser password, kept in `<data dir>/postgres.password` for a developer's `psql`.
//!
//! # One server per folder, and the cluster a crashed server left behind
//!
//! A server holds an exclusive lock on `<data dir>/bridge-server.lock` for as long as its cluster runs.
//! The kernel releases it when the process ends, however it ends, so the lock tells a live server from a
//! dead one: a second server on the same folder is refused (it would share the cluster and stop it under
//! the first), while a cluster found running in a folder whose lock is free was left behind by a server
//! that was killed (SIGKILL, the OOM killer) before it could stop it. That orphan is stopped and the
//! cluster started again, so a crash never needs someone to find and kill a postmaster by hand.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Why the embedded cluster could not start or stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedPgError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or in /usr/lib/postgresql/*/bin: \
         install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL"
    )]
    NotInstalled,
    #[error(
        "running as root, but there is no `postgres` user to run PostgreSQL as: install PostgreSQL's server \
         package, or run as an ordinary user"
    )]
    NoPostgresUser,
    #[error(
        "the postgres user cannot reach {0}: as root, choose a data folder whose parent folders others may \
         enter (not under /root, for example)"
    )]
    Unreachable(PathBuf),
    #[error(
        "another bridge-server{} is using the data folder {}: stop it first, or give this one another \
         --data-dir (or a DATABASE_URL)",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .dir.display()
    )]
    InUse { dir: PathBuf, pid: Option<u32> },
    #[error("{what} failed: {detail}")]
    Command { what: &'static str, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EmbeddedPgError {
    let what = what.into();
    move |source| EmbeddedPgError::Io { what, source }
}

/// Where to look for PostgreSQL's binaries. The default is the process's PATH, then
/// `/usr/lib/postgresql/*/bin`; tests point both elsewhere to see the "not installed" error.
#[derive(Debug, Clone)]
pub struct BinSearch {
    pub path: Option<OsString>,
    pub versioned_root: PathBuf,
}

impl Default for BinSearch {
    fn default() -> Self {
        Self {
            path: std::env::var_os("PATH"),
            versioned_root: PathBuf::from("/usr/lib/postgresql"),
        }
    }
}

impl BinSearch {
    /// The folder holding both `initdb` and `pg_ctl`.
    pub fn find(&self) -> Result<PathBuf, EmbeddedPgError> {
        let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
        if let Some(path) = &self.path
            && let Some(dir) = std::env::split_paths(path).find(|d| has_both(d))
        {
            return Ok(dir);
        }
        // The newest version first: /usr/lib/postgresql/<major>/bin.
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.versioned_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((major, entry.path().join("bin")))
            })
            .filter(|(_, bin)| has_both(bin))
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, bin)| bin)
            .ok_or(EmbeddedPgError::NotInstalled)
    }
}

/// The name of the lock file a server holds in its data folder.
const LOCK_FILE: &str = "bridge-server.lock";

/// A running private cluster. Dropping it stops the cluster.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    /// The data folder's lock, held for as long as this value lives (see the module's documentation).
    _lock: std::fs::File,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    running: bool,
}

impl EmbeddedPostgres {
    /// Starts (creating on first use) the cluster in `dir`.
    pub async fn start(dir: impl AsRef<Path>) -> Result<Self, EmbeddedPgError> {
        Self::start_with(dir, BinSearch::default()).await
    }

    /// [`EmbeddedPostgres::start`] with an explicit place to look for the binaries.
    pub async fn start_with(
        dir: impl AsRef<Path>,
        search: BinSearch,
    ) -> Result<Self, EmbeddedPgError> {
        let dir = dir.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::start_blocking(&dir, &search))
            .await
            .map_err(|e| EmbeddedPgError::Command {
                what: "starting PostgreSQL",
                detail: e.to_string(),
            })?
    }

    fn start_blocking(dir: &Path, search: &BinSearch) -> Result<Self, EmbeddedPgError> {
        let bin = search.find()?;
        let owner = if nix::unistd::geteuid().is_root() {
            Some(
                nix::unistd::User::from_name("postgres")
                    .ok()
                    .flatten()
                    .ok_or(EmbeddedPgError::NoPostgresUser)?,
            )
        } else {
            None
        };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(io(format!("resolving {}", dir.display())))?;
        let private = |path: &Path| -> Result<(), EmbeddedPgError> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("protecting {}", path.display())))?;
            if let Some(user) = &owner {
                nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| {
                    EmbeddedPgError::Io {
                        what: format!("handing {} to the postgres user", path.display()),
                        source: e.into(),
                    }
                })?;
            }
            Ok(())
        };
        if owner.is_some() {
            reachable_by_others(&dir)?;
        }
        private(&dir)?;
        let lock = lock_folder(&dir)?;
        let socket_dir = tempfile::Builder::new()
            .prefix("bridge-pg-")
            .tempdir()
            .map_err(io("creating the socket folder"))?;
        private(socket_dir.path())?;

        let mut pg = Self {
            _lock: lock,
            bin,
            data: dir.join("postgres"),
            socket_dir,
            port: free_port()?,
            as_postgres: owner.is_some(),
            running: false,
        };
        if !pg.data.join("PG_VERSION").is_file() {
            pg.initdb(&dir)?;
        } else {
            pg.stop_orphan();
        }
        let log = dir.join("postgres.log");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c unix_socket_permissions=0700",
            pg.port,
            pg.socket_dir.path().display()
        );
        let out = pg.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                pg.data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        )?;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log)
                .map(|l| l.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            return Err(EmbeddedPgError::Command {
                what: "pg_ctl start",
                detail: format!("{} {tail}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        pg.running = true;
        tracing::info!(port = pg.port, data = %pg.data.display(), "embedded PostgreSQL started");
        Ok(pg)
    }

    /// Stops a cluster left running in this folder by a server that was killed. Only called with the
    /// folder's lock held, so no live server owns that cluster.
    fn stop_orphan(&self) {
        let pid_file = self.data.join("postmaster.pid");
        let Ok(contents) = std::fs::read_to_string(&pid_file) else {
            return;
        };
        let pid = contents.lines().next().unwrap_or("").trim().to_string();
        // A postmaster runs in its data folder. A pid file whose process works elsewhere is stale (the
        // machine lost power, and the pid now names another process): that process is not ours to
        // stop, and the stale file would make PostgreSQL refuse to start, so it goes.
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let alive = !pid.is_empty() && proc_dir.is_dir();
        let ours = match std::fs::read_link(proc_dir.join("cwd")) {
            Ok(cwd) => cwd == self.data || self.data.canonicalize().is_ok_and(|d| d == cwd),
            // Where another user's working folder cannot be read, its name has to do.
            Err(_) => std::fs::read_to_string(proc_dir.join("comm"))
                .is_ok_and(|comm| comm.trim() == "postgres"),
        };
        if !ours {
            if alive {
                tracing::warn!(%pid, data = %self.data.display(),
                    "a stale postmaster.pid names a process that is not this cluster's: removing the file");
                let _ = std::fs::remove_file(&pid_file);
            }
            // Otherwise no such process: PostgreSQL removes the stale file itself when it starts.
            return;
        }
        let running = self
            .run(
                "pg_ctl",
                &["-D".as_ref(), self.data.as_os_str(), "status".as_ref()],
            )
            .is_ok_and(|out| out.status.success());
        if !running {
            return;
        }
        tracing::warn!(%pid, data = %self.data.display(),
            "stopping the PostgreSQL left running by a server that did not stop cleanly");
        if let Err(e) = stop_cluster(&self.bin, &self.data, self.as_postgres) {
            // pg_ctl start below then fails with PostgreSQL's own words, which say what is wrong.
            tracing::warn!(error = %e, "could not stop the orphaned PostgreSQL");
            return;
        }
        // Its socket folder (the fifth line of the pid file) was a temporary folder of the dead server.
        if let Some(socket_dir) = contents.lines().nth(4).map(|l| PathBuf::from(l.trim()))
            && socket_dir.parent() == Some(std::env::temp_dir().as_path())
            && socket_dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bridge-pg-"))
        {
            let _ = std::fs::remove_dir_all(&socket_dir);
        }
    }

    fn initdb(&self, dir: &Path) -> Result<(), EmbeddedPgError> {
        let pwfile = dir.join("postgres.password");
        let password = crate::auth::token::random_hex(16);
        std::fs::write(&pwfile, format!("{password}\n"))
            .map_err(io("writing the password file"))?;
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o600))
            .map_err(io("protecting the password file"))?;
        if self.as_postgres
            && let Ok(Some(user)) = nix::unistd::User::from_name("postgres")
        {
            let _ = nix::unistd::chown(&pwfile, Some(user.uid), Some(user.gid));
        }
        let mut pwfile_arg = OsString::from("--pwfile=");
        pwfile_arg.push(&pwfile);
        let out = self.run(
            "initdb",
            &[
                "-D".as_ref(),
                self.data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=scram-sha-256".as_ref(),
                pwfile_arg.as_os_str(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        if !out.status.success() {
            return Err(EmbeddedPgError::Command {
                what: "initdb",
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, EmbeddedPgError> {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        // The server must not inherit our working directory's permissions problems or our stdin.
        cmd.args(args)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(io(format!("running {}", exe.display())))
    }

    /// A URL for this cluster's `postgres` database, through the private socket.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// A URL for another database of this cluster.
    pub fn url_for(&self, database: &str) -> String {
        let socket: String = self
            .socket_dir
            .path()
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!(
            "postgres://postgres@localhost:{}/{database}?host={socket}",
            self.port
        )
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the cluster (fast shutdown: open connections are closed).
    pub async fn stop(mut self) -> Result<(), EmbeddedPgError> {
        let data = self.data.clone();
        let bin = self.bin.clone();
        let as_postgres = self.as_postgres;
        self.running = false;
        tokio::task::spawn_blocking(move || stop_cluster(&bin, &data, as_postgres))
            .await
            .map_err(|e| EmbeddedPgError::Command {
                what: "pg_ctl stop",
                detail: e.to_string(),
            })?
    }
}

fn stop_cluster(bin: &Path, data: &Path, as_postgres: bool) -> Result<(), EmbeddedPgError> {
    let exe = bin.join("pg_ctl");
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = cmd
        .arg("-D")
        .arg(data)
        .args(["-m", "fast", "-w", "stop"])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io(format!("running {}", exe.display())))?;
    if out.status.success() {
        tracing::info!("embedded PostgreSQL stopped");
        Ok(())
    } else {
        Err(EmbeddedPgError::Command {
            what: "pg_ctl stop",
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if self.running {
            self.running = false;
            if let Err(e) = stop_cluster(&self.bin, &self.data, self.as_postgres) {
                tracing::warn!(error = %e, "could not stop the embedded PostgreSQL");
            }
        }
    }
}

/// Takes the data folder's lock, or says which server holds it.
fn lock_folder(dir: &Path) -> Result<std::fs::File, EmbeddedPgError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(EmbeddedPgError::InUse {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io(format!("locking {}", path.display()))(e));
        }
    }
    // The holder's pid, for the message a second server prints.
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(io(format!("writing {}", path.display())))?;
    Ok(file)
}

/// Checks that every parent folder of `dir` lets other users pass, as the postgres user must.
fn reachable_by_others(dir: &Path) -> Result<(), EmbeddedPgError> {
    for ancestor in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(ancestor)
            .map_err(io(format!("reading {}", ancestor.display())))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(EmbeddedPgError::Unreachable(dir.to_path_buf()));
        }
    }
    Ok(())
}

/// A port of 127.0.0.1 that nothing listens on right now.
fn free_port() -> Result<u16, EmbeddedPgError> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(io("finding a free port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_binaries_is_a_one_line_error_that_says_what_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let search = BinSearch {
            path: Some(empty.path().as_os_str().to_owned()),
            versioned_root: empty.path().to_path_buf(),
        };
        let err = search.find().unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, EmbeddedPgError::NotInstalled));
        assert!(text.contains("apt-get install postgresql"), "{text}");
        assert!(!text.contains('\n'));
    }
}
