//! Windows: the agent's folder is under the user's profile, whose access list already admits only
//! that user (with SYSTEM and the administrators), so files are created plainly; the vault key is
//! sealed with DPAPI for this user, so a copy of the folder is of no use to another user or on another
//! machine. An access list of the agent's own is still to come (docs/QUICKSTART.md says so). Closing
//! the console window or a shutdown is how Windows stops a console program.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::ptr;

use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Cryptography::{
    CRYPT_INTEGER_BLOB, CRYPTPROTECT_UI_FORBIDDEN, CryptProtectData, CryptUnprotectData,
};

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

/// The vault key is sealed with DPAPI for the user the agent runs as.
pub const SEALS_KEYS: bool = true;

/// How long a key is in the clear: a vault key written before keys were sealed on Windows.
const CLEAR_KEY_LEN: usize = 32;

/// Seals the vault key with DPAPI in the user's scope, never asking anything on screen (the agent may
/// run with no desktop).
pub fn seal_key(key: &[u8]) -> io::Result<Vec<u8>> {
    dpapi(key, |input, output| {
        // SAFETY: `input` points at `key`, alive for the call; the optional arguments are null, which
        // DPAPI allows; `output` is a blob DPAPI fills and `dpapi` frees.
        unsafe {
            CryptProtectData(
                input,
                ptr::null(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                CRYPTPROTECT_UI_FORBIDDEN,
                output,
            )
        }
    })
}

/// The vault key from what is stored: a DPAPI blob, or a key in the clear that an earlier agent wrote
/// (which the vault then seals).
pub fn unseal_key(stored: &[u8]) -> io::Result<Vec<u8>> {
    if stored.len() == CLEAR_KEY_LEN {
        return Ok(stored.to_vec());
    }
    dpapi(stored, |input, output| {
        // SAFETY: as in `seal_key`; the description out-pointer is null, so none is allocated.
        unsafe {
            CryptUnprotectData(
                input,
                ptr::null_mut(),
                ptr::null(),
                ptr::null(),
                ptr::null(),
                CRYPTPROTECT_UI_FORBIDDEN,
                output,
            )
        }
    })
}

/// Runs one DPAPI call from `data` into a blob the system allocates, copies that blob out and frees it.
fn dpapi(
    data: &[u8],
    call: impl FnOnce(*const CRYPT_INTEGER_BLOB, *mut CRYPT_INTEGER_BLOB) -> i32,
) -> io::Result<Vec<u8>> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too long for DPAPI"))?;
    let input = CRYPT_INTEGER_BLOB {
        cbData: len,
        pbData: data.as_ptr().cast_mut(),
    };
    let mut output = CRYPT_INTEGER_BLOB {
        cbData: 0,
        pbData: ptr::null_mut(),
    };
    if call(&input, &mut output) == 0 {
        return Err(io::Error::last_os_error());
    }
    let out_len = output.cbData as usize;
    if out_len == 0 || output.pbData.is_null() {
        return Ok(Vec::new());
    }
    // SAFETY: on success DPAPI set `output` to a buffer of `cbData` bytes that it allocated with
    // LocalAlloc; it is read once here, wiped (it may hold the key in the clear) and freed.
    let bytes = unsafe { std::slice::from_raw_parts(output.pbData, out_len).to_vec() };
    // SAFETY: the same buffer, written within its length and then not used after the free.
    unsafe {
        ptr::write_bytes(output.pbData, 0, out_len);
        LocalFree(output.pbData.cast());
    }
    Ok(bytes)
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
