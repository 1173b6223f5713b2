//! The UDP link, as today's LAN dongles speak it.
//!
//! Two sockets: the discovery port answers each DISCOVER with an ANNOUNCE sent back to the
//! DISCOVER's source, and the REMP port takes requests and sends every REMP packet (answers and
//! frames alike) to the source address it last heard a well-formed REMP packet from, as the
//! firmware does. Unplugged, the dongle is silent: both sockets stay bound (so the addresses do
//! not change) but everything received is ignored and nothing is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::event::SimEvent;
use crate::faults;
use crate::shared::Shared;

/// The two bound sockets of a UDP dongle.
#[derive(Debug)]
pub struct UdpLink {
    /// REMP requests and answers.
    pub remp: UdpSocket,
    /// DISCOVER and ANNOUNCE.
    pub discovery: UdpSocket,
}

impl UdpLink {
    /// Binds REMP on `addr` and discovery on the same IP at `discovery_port` (0: any free port).
    pub async fn bind(addr: SocketAddr, discovery_port: u16) -> std::io::Result<Self> {
        let remp = UdpSocket::bind(addr).await?;
        if let Err(e) = arrival::enable(&remp) {
            // Frames then join the transmit queue when they are read, as without the stamps.
            tracing::warn!(error = %e, "the kernel does not stamp this socket's datagrams");
        }
        let discovery = UdpSocket::bind(SocketAddr::new(addr.ip(), discovery_port)).await?;
        Ok(Self { remp, discovery })
    }
}

/// Runs the UDP link until shutdown.
pub(crate) async fn run(
    shared: Arc<Shared>,
    link: UdpLink,
    mut host_rx: mpsc::Receiver<Vec<u8>>,
    mut garbage_rx: mpsc::Receiver<usize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut plugged = shared.plugged.subscribe();
    let mut up = *plugged.borrow_and_update();
    shared.link_up.send_replace(up);
    let mut peer: Option<SocketAddr> = None;
    let mut remp_buf = vec![0u8; 2048];
    let mut disc_buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = plugged.changed() => {
                let now_up = *plugged.borrow_and_update();
                if now_up != up {
                    up = now_up;
                    if !up {
                        peer = None;
                        shared.power_cycle();
                        shared.event(SimEvent::Unplugged);
                    } else {
                        shared.event(SimEvent::Plugged { serial_path: None });
                    }
                    shared.link_up.send_replace(up);
                }
            }
            received = link.discovery.recv_from(&mut disc_buf) => {
                let Ok((n, from)) = received else { continue };
                if !up {
                    continue;
                }
                let bytes = disc_buf.get(..n).unwrap_or(&[]);
                let reply = shared.with_core(|core, _| core.discovery_reply(Instant::now(), bytes));
                if let Ok(Some(announce)) = reply {
                    send(&shared, &link.discovery, from, announce.to_vec()).await;
                }
            }
            received = arrival::recv_from(&link.remp, &mut remp_buf) => {
                let Ok((n, from, arrived)) = received else { continue };
                if !up {
                    continue;
                }
                let bytes = remp_buf.get(..n).unwrap_or(&[]);
                // The firmware answers the source it last heard; it learns it from any packet
                // that decodes, before authentication.
                if firmware_proto::remp::decode_header(bytes).is_ok()
                    || firmware_proto::discovery::decode(bytes).is_ok()
                {
                    peer = Some(from);
                }
                if let Some(arrived) = arrived {
                    let waited = Instant::now().saturating_duration_since(arrived);
                    shared.link_stats(|s| s.rx_late_max = s.rx_late_max.max(waited));
                }
                shared.handle_packet(bytes, arrived);
            }
            Some(packet) = host_rx.recv() => match peer.filter(|_| up) {
                Some(to) => send(&shared, &link.remp, to, packet).await,
                None => shared.link_stats(|s| s.tx_discarded_unplugged += 1),
            },
            Some(_) = garbage_rx.recv() => {
                if let Some(to) = peer.filter(|_| up) {
                    let garbage = faults::datagram_garbage(&mut rand::rng());
                    if link.remp.send_to(&garbage, to).await.is_ok() {
                        shared.link_stats(|s| s.tx_garbage_bursts += 1);
                    }
                }
            }
        }
    }
}

async fn send(shared: &Shared, socket: &UdpSocket, to: SocketAddr, mut datagram: Vec<u8>) {
    let faults = shared.faults();
    let decision = faults.decide(&mut rand::rng());
    if decision.drop {
        shared.link_stats(|s| s.tx_dropped += 1);
        return;
    }
    if !faults.delay.is_zero() {
        tokio::time::sleep(faults.delay).await;
    }
    if decision.garbage {
        let garbage = faults::datagram_garbage(&mut rand::rng());
        if socket.send_to(&garbage, to).await.is_ok() {
            shared.link_stats(|s| s.tx_garbage_bursts += 1);
        }
    }
    if decision.corrupt {
        faults::corrupt_datagram(&mut datagram, &mut rand::rng());
        shared.link_stats(|s| s.tx_corrupted += 1);
    }
    match socket.send_to(&datagram, to).await {
        Ok(_) => shared.link_stats(|s| s.tx_packets += 1),
        Err(_) => shared.link_stats(|s| s.tx_write_failures += 1),
    }
}

/// When a datagram arrived, from the kernel's receive timestamp (`SO_TIMESTAMPNS`, Linux): the
/// simulator runs beside other programs and may read a datagram well after it came, while a dongle's
/// firmware takes it at once (see `Shared::dispatch`).
mod arrival {
    use std::io;
    use std::net::SocketAddr;
    #[cfg(target_os = "linux")]
    use std::time::Duration;

    use tokio::net::UdpSocket;
    use tokio::time::Instant;

    /// Asks the kernel to stamp every datagram `socket` receives.
    #[cfg(target_os = "linux")]
    pub fn enable(socket: &UdpSocket) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt::ReceiveTimestampns};
        setsockopt(socket, ReceiveTimestampns, &true).map_err(io::Error::from)
    }

    #[cfg(not(target_os = "linux"))]
    pub fn enable(_socket: &UdpSocket) -> io::Result<()> {
        Ok(())
    }

    /// Receives a datagram: its length, its source, and when it arrived on tokio's clock (`None`
    /// where the kernel gave no stamp). The kernel stamps with the wall clock, so the arrival is
    /// the wall clock's age of the stamp back from now, both clocks read together; the age is
    /// bounded by a second, against a wall clock set meanwhile.
    #[cfg(target_os = "linux")]
    pub async fn recv_from(
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<Instant>)> {
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
        use nix::sys::time::TimeSpec;
        use tokio::io::Interest;

        let (n, from, stamp) = socket
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(buf)];
                let mut space = nix::cmsg_space!(TimeSpec);
                let msg = recvmsg::<SockaddrStorage>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)?;
                let stamp = msg.cmsgs().ok().and_then(|mut cmsgs| {
                    cmsgs.find_map(|c| match c {
                        ControlMessageOwned::ScmTimestampns(ts) => Some(Duration::from(ts)),
                        _ => None,
                    })
                });
                let from = msg.address.and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(*v4))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
                });
                Ok((msg.bytes, from, stamp))
            })
            .await?;
        let from = from.ok_or_else(|| io::Error::other("a datagram without a source address"))?;
        let arrived = stamp.map(|stamp| {
            let (wall, now) = (std::time::SystemTime::UNIX_EPOCH.elapsed(), Instant::now());
            let age = wall
                .unwrap_or_default()
                .saturating_sub(stamp)
                .min(Duration::from_secs(1));
            now.checked_sub(age).unwrap_or(now)
        });
        Ok((n, from, arrived))
    }

    #[cfg(not(target_os = "linux"))]
    pub async fn recv_from(
        socket: &UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr, Option<Instant>)> {
        let (n, from) = socket.recv_from(buf).await?;
        Ok((n, from, None))
    }
}
