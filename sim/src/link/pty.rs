//! The serial link: a pseudo-terminal standing in for the dongle's USB CDC port.
//!
//! The simulator holds the master side and also keeps the slave side open for as long as the
//! link is "plugged in": without an open slave, reads on the master fail with EIO whenever the
//! host closes its end, and a host reopening the port would find a dead terminal. The slave is
//! put in raw mode so that the line discipline passes every byte unchanged (no echo, no CR/LF
//! translation). Unplugging closes both sides, which the host sees as a hang-up; replugging
//! opens a new pseudo-terminal and points the `--link` symlink at it.
//!
//! Framing is `firmware_proto::stream`: each packet plus CRC-32, COBS-encoded, ends with 0x00.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use firmware_proto::stream::{StreamDecoder, encode_frame, max_frame_len};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::event::SimEvent;
use crate::faults;
use crate::shared::{LinkStats, Shared};

/// How long one frame may wait for room in the terminal's buffer (a host that stopped
/// reading) before it is dropped and counted.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// An open pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<OwnedFd>,
    _slave: OwnedFd,
    path: PathBuf,
}

impl Pty {
    /// Opens a new pseudo-terminal in raw mode.
    pub fn open() -> io::Result<Self> {
        let pair = nix::pty::openpty(None, None)?;
        // openpty leaves both ends inheritable: a process started meanwhile (an agent under test) would
        // keep a copy of them, and pulling the plug would then never reach the host as a hang-up.
        for fd in [&pair.master, &pair.slave] {
            fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        }
        let mut termios = tcgetattr(&pair.slave)?;
        cfmakeraw(&mut termios);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &termios)?;
        let flags = OFlag::from_bits_truncate(fcntl(&pair.master, FcntlArg::F_GETFL)?);
        fcntl(&pair.master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        let path = nix::unistd::ttyname(&pair.slave)?;
        let interest = Interest::READABLE | Interest::WRITABLE;
        // SAFETY: an `OwnedFd` is a valid open descriptor, and its `as_raw_fd` returns the same
        // descriptor until it is dropped; the `AsyncFd` owns it and nothing else closes or
        // replaces it, which is all `register_with_interest` asks.
        #[allow(unsafe_code)]
        let master = unsafe { AsyncFd::register_with_interest(pair.master, interest) }
            .map_err(io::Error::from)?;
        Ok(Self {
            master,
            _slave: pair.slave,
            path,
        })
    }

    /// The slave's path, the one a host opens (e.g. `/dev/pts/7`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what the host wrote.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `bytes`.
    pub async fn write_all(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), bytes).map_err(io::Error::from))
            {
                Ok(Ok(n)) => bytes = bytes.get(n..).unwrap_or(&[]),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Points `link` at `target` atomically (a temporary symlink renamed over it).
pub fn make_link(link: &Path, target: &Path) -> io::Result<()> {
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = link.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

/// Removes `link` if it still points at `target` (another process may have taken it over).
pub fn remove_link(link: &Path, target: &Path) {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        let _ = std::fs::remove_file(link);
    }
}

/// Runs the serial link until shutdown: opens a terminal whenever plugged, moves packets both
/// ways, and closes it when unplugged.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut first: Option<Pty>,
    link: Option<PathBuf>,
    mut host_rx: mpsc::Receiver<Vec<u8>>,
    mut garbage_rx: mpsc::Receiver<usize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut plugged = shared.plugged.subscribe();
    loop {
        // Unplugged: wait, discarding what the dongle would have sent.
        while !*plugged.borrow_and_update() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = plugged.changed() => {}
                Some(_) = host_rx.recv() => shared.link_stats(|s| s.tx_discarded_unplugged += 1),
                Some(_) = garbage_rx.recv() => {}
            }
        }
        let pty = match first.take().map_or_else(Pty::open, Ok) {
            Ok(pty) => pty,
            Err(e) => {
                tracing::error!("cannot open a pseudo-terminal: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let path = pty.path().to_path_buf();
        if let Some(link) = &link
            && let Err(e) = make_link(link, &path)
        {
            tracing::error!("cannot make the link {}: {e}", link.display());
        }
        shared.set_link(&format!("serial {}", path.display()), 0, None);
        shared.serial_path.send_replace(Some(path.clone()));
        shared.link_up.send_replace(true);
        shared.event(SimEvent::Plugged {
            serial_path: Some(path.clone()),
        });
        tracing::info!("serial link up on {}", path.display());

        let stop = serve(
            &shared,
            &pty,
            &mut host_rx,
            &mut garbage_rx,
            &mut shutdown,
            &mut plugged,
        )
        .await;

        drop(pty);
        if let Some(link) = &link {
            remove_link(link, &path);
        }
        shared.serial_path.send_replace(None);
        shared.power_cycle();
        shared.link_up.send_replace(false);
        if stop {
            return;
        }
        shared.event(SimEvent::Unplugged);
        tracing::info!("serial link unplugged");
    }
}

/// Serves one plugged-in period; returns true on shutdown, false on unplug.
async fn serve(
    shared: &Arc<Shared>,
    pty: &Pty,
    host_rx: &mut mpsc::Receiver<Vec<u8>>,
    garbage_rx: &mut mpsc::Receiver<usize>,
    shutdown: &mut watch::Receiver<bool>,
    plugged: &mut watch::Receiver<bool>,
) -> bool {
    let mut decoder: Box<StreamDecoder> = Box::default();
    let mut buf = [0u8; 4096];
    // A lone 0x00 first ends whatever partial frame the host's decoder may hold.
    let mut resync = true;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return true,
            _ = plugged.changed() => {
                if !*plugged.borrow_and_update() {
                    return false;
                }
            }
            read = pty.read(&mut buf) => match read {
                Ok(n) => {
                    let mut packets = Vec::new();
                    decoder.push(buf.get(..n).unwrap_or(&[]), |p| packets.push(p.to_vec()));
                    for packet in packets {
                        if !shared.handle_packet(&packet, None) {
                            decoder.count_rejected();
                        }
                    }
                    let stats = decoder.stats();
                    shared.link_stats(|s| s.rx = stats);
                }
                Err(e) => {
                    tracing::warn!("serial read failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(packet) = host_rx.recv() => send(shared, pty, &packet, &mut resync).await,
            Some(len) = garbage_rx.recv() => {
                let garbage = faults::stream_garbage(&mut rand::rng(), len);
                if pty.write_all(&garbage).await.is_ok() {
                    shared.link_stats(|s| s.tx_garbage_bursts += 1);
                }
            }
        }
    }
}

async fn send(shared: &Shared, pty: &Pty, packet: &[u8], resync: &mut bool) {
    let faults = shared.faults();
    let decision = faults.decide(&mut rand::rng());
    if decision.drop {
        shared.link_stats(|s| s.tx_dropped += 1);
        return;
    }
    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }
    let mut bytes = Vec::with_capacity(max_frame_len(packet.len()) + 40);
    if std::mem::take(resync) {
        bytes.push(0);
    }
    if decision.garbage {
        let mut rng = rand::rng();
        let len = rand::RngExt::random_range(&mut rng, 1..=32usize);
        bytes.extend(faults::stream_garbage(&mut rng, len));
        shared.link_stats(|s| s.tx_garbage_bursts += 1);
    }
    let mut frame = vec![0u8; max_frame_len(packet.len())];
    let Ok(n) = encode_frame(packet, &mut frame) else {
        shared.link_stats(|s| s.tx_dropped += 1);
        return;
    };
    frame.truncate(n);
    if decision.corrupt {
        faults::corrupt_stream_frame(&mut frame, &mut rand::rng());
        shared.link_stats(|s| s.tx_corrupted += 1);
    }
    bytes.extend_from_slice(&frame);
    match tokio::time::timeout(WRITE_TIMEOUT, pty.write_all(&bytes)).await {
        Ok(Ok(())) => shared.link_stats(|s: &mut LinkStats| s.tx_packets += 1),
        _ => {
            // Part of the frame may be out: start the next one with a resynchronising 0x00.
            *resync = true;
            shared.link_stats(|s| s.tx_write_failures += 1);
        }
    }
}
