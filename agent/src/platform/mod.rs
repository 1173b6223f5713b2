//! What differs between the operating systems the agent runs on, one implementation per OS behind the
//! same functions: files and folders only this user may read, whether a process still runs, and the
//! signal a service manager sends to stop the agent. Everything else in the agent is shared.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;
