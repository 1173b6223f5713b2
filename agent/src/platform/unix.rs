//! Unix (Linux, macOS): private files are mode 0600 in folders of mode 0700; process liveness by
//! signal 0; SIGTERM is how systemd and launchd stop a service.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Makes `dir` and its parents, the last one readable by this user only (mode 0700, also when it
/// existed with wider permissions).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Options that create a file readable by this user only (mode 0600).
pub fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// Makes an open file readable by this user only: a file left by an older version may have wider
/// permissions, and the creation mode applies only on creation.
pub fn restrict(file: &File) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(0o600))
}

/// Whether the vault key is sealed by the operating system at rest. On Unix it is not: the file's mode
/// 0600 in a 0700 folder is what keeps other users out (macOS's keychain is not used yet).
pub const SEALS_KEYS: bool = false;

/// The vault key as it is stored: as it is, see [`SEALS_KEYS`].
pub fn seal_key(key: &[u8]) -> io::Result<Vec<u8>> {
    Ok(key.to_vec())
}

/// The vault key from what is stored.
pub fn unseal_key(stored: &[u8]) -> io::Result<Vec<u8>> {
    Ok(stored.to_vec())
}

/// Whether process `pid` still runs; `None` when this cannot be told.
pub fn process_alive(pid: u32) -> Option<bool> {
    let pid = i32::try_from(pid).ok()?;
    Some(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// Resolves when the service manager asks the agent to stop (SIGTERM); never, if that cannot be
/// listened for.
pub async fn stop_requested() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
