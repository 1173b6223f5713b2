//! Windows: the agent's folder is under the user's profile, whose access list already admits only
//! that user (with SYSTEM and the administrators), so files are created plainly; an access list of
//! the agent's own and DPAPI for the vault key are still to come (docs/QUICKSTART.md says so).
//! Closing the console window or a shutdown is how Windows stops a console program.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

/// Makes `dir` and its parents; they inherit the access list of the user's profile.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

/// Options that create a file; it inherits the access list of its folder.
pub fn private_file_options() -> OpenOptions {
    OpenOptions::new()
}

/// Nothing to narrow: the file inherits its folder's access list.
pub fn restrict(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Whether process `pid` still runs: not told on Windows yet.
pub fn process_alive(_pid: u32) -> Option<bool> {
    None
}

/// Resolves when the console window is closed or Windows shuts down.
pub async fn stop_requested() {
    let close = tokio::signal::windows::ctrl_close();
    let shutdown = tokio::signal::windows::ctrl_shutdown();
    match (close, shutdown) {
        (Ok(mut close), Ok(mut shutdown)) => {
            tokio::select! {
                _ = close.recv() => {}
                _ = shutdown.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
