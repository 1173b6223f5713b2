//! USB CDC serial ports (and pseudo-terminals) as links.

use std::path::Path;
use std::time::Duration;

use tokio_serial::SerialPortBuilderExt;

use super::{Link, stream};

/// Why a serial port could not be opened.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not open the serial port {path}: {source} (is it plugged in, and may this user open it? on Linux, join the 'dialout' group)"
)]
pub struct OpenError {
    pub path: String,
    #[source]
    pub source: tokio_serial::Error,
}

/// How long [`open`] keeps trying while another handle still holds the port's exclusive lock.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Opens `path` exclusively and serves it as a link. The baud rate is irrelevant to USB CDC, but a
/// real UART bridge needs one, so the firmware's 115 200 is set.
///
/// A port that a just-dropped link is still closing is locked for a few milliseconds; `open` waits for
/// it up to [`LOCK_WAIT`] rather than failing, so that reconnecting at once works.
pub async fn open(path: &Path) -> Result<Link, OpenError> {
    let display = path.display().to_string();
    let deadline = tokio::time::Instant::now() + LOCK_WAIT;
    loop {
        match tokio_serial::new(display.clone(), 115_200).open_native_async() {
            Ok(port) => return Ok(stream::spawn(port, display)),
            Err(e) if is_lock_busy(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => {
                return Err(OpenError {
                    path: display,
                    source,
                });
            }
        }
    }
}

fn is_lock_busy(e: &tokio_serial::Error) -> bool {
    e.description.contains("exclusive lock")
}
