//! LAN dongles over UDP: one long-lived socket for all of them.
//!
//! A dongle answers to the source port it last heard, so every packet to every LAN dongle must leave from
//! the same socket, discovery broadcasts included. The hub owns that socket: it sends DISCOVER to
//! broadcast or unicast targets, hands ANNOUNCE answers to whoever listens, and routes REMP packets to the
//! link of the dongle whose device id they carry.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use firmware_proto::discovery;
use firmware_proto::ids::DeviceId;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};

use super::{LINK_QUEUE, Link, LinkStats};

/// The receive buffer asked for the hub's socket (the system may cap it: `net.core.rmem_max`).
pub const RECV_BUFFER: usize = 4 << 20;

/// A datagram that looked like a Discovery packet, and where it came from.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

type Routes = Arc<Mutex<HashMap<DeviceId, mpsc::Sender<Vec<u8>>>>>;

/// The shared UDP socket and its routing table.
#[derive(Clone)]
pub struct UdpHub {
    socket: Arc<UdpSocket>,
    routes: Routes,
    announces: broadcast::Sender<Datagram>,
    stats: Arc<LinkStats>,
}

impl UdpHub {
    /// Binds the socket (use port 0 for any) with broadcast allowed, and starts its reader.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr).await?;
        socket.set_broadcast(true)?;
        // Every LAN dongle's packets land in this one socket's buffer while the reader waits for a
        // core. The system caps the request (Linux: net.core.rmem_max, 208 KiB unless raised), and a
        // smaller buffer still works, so a shortfall is said once, with what to do, and not refused.
        let buffer = socket2::SockRef::from(&socket);
        let _ = buffer.set_recv_buffer_size(RECV_BUFFER);
        // Linux reports twice what it keeps for its own bookkeeping.
        if let Ok(got) = buffer.recv_buffer_size()
            && got < RECV_BUFFER
        {
            tracing::warn!(
                wanted = RECV_BUFFER,
                got,
                "the UDP receive buffer for LAN dongles is smaller than asked: a busy workstation may \
                 lose their frames in bursts; on Linux raise it with `sysctl -w net.core.rmem_max={}`",
                RECV_BUFFER
            );
        }
        let hub = Self {
            socket: Arc::new(socket),
            routes: Arc::default(),
            announces: broadcast::channel(256).0,
            stats: Arc::default(),
        };
        tokio::spawn(read_loop(hub.clone()));
        Ok(hub)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Counters over every dongle of the hub.
    pub fn stats(&self) -> &Arc<LinkStats> {
        &self.stats
    }

    /// Every Discovery packet that arrives from now on.
    pub fn announces(&self) -> broadcast::Receiver<Datagram> {
        self.announces.subscribe()
    }

    /// Sends a DISCOVER to `target`: a broadcast address or one dongle.
    pub async fn discover(&self, target: SocketAddr, seq: u32) -> io::Result<()> {
        let mut buf = [0u8; 64];
        let n = discovery::encode_discover(seq, &mut buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.socket.send_to(&buf[..n], target).await?;
        Ok(())
    }

    /// A link to the dongle `device_id` at `peer`. REMP packets carrying that device id are routed to it
    /// from now on, whichever address they come from; a second link for the same dongle replaces the
    /// first. The route goes when the link's `incoming` is dropped.
    pub fn link(&self, device_id: DeviceId, peer: SocketAddr) -> Link {
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(LINK_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(LINK_QUEUE);
        self.routes.lock().unwrap().insert(device_id, in_tx);
        let stats = Arc::new(LinkStats::default());
        let socket = self.socket.clone();
        let link_stats = stats.clone();
        tokio::spawn(async move {
            while let Some(packet) = out_rx.recv().await {
                match socket.send_to(&packet, peer).await {
                    Ok(n) => {
                        LinkStats::add(&link_stats.packets_out, 1);
                        LinkStats::add(&link_stats.bytes_out, n as u64);
                    }
                    // UDP has no connection to lose: an unreachable dongle shows as unanswered
                    // requests, which the session times out.
                    Err(e) => tracing::debug!(%peer, error = %e, "UDP send failed"),
                }
            }
        });
        Link {
            outgoing: out_tx,
            incoming: in_rx,
            stats,
            peer: peer.to_string(),
        }
    }

    /// Stops routing packets of `device_id`, which closes its link's `incoming`.
    pub fn unlink(&self, device_id: &DeviceId) {
        self.routes.lock().unwrap().remove(device_id);
    }
}

async fn read_loop(hub: UdpHub) {
    // 64 KiB holds any datagram; larger packets than the protocol allows are dropped by the decoders.
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match hub.socket.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP port-unreachable answers surface as errors on some systems; they say nothing about
            // the other dongles, so the hub keeps reading.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the UDP hub socket failed");
                return;
            }
        };
        LinkStats::add(&hub.stats.packets_in, 1);
        LinkStats::add(&hub.stats.bytes_in, n as u64);
        let bytes = &buf[..n];
        if bytes.starts_with(&discovery::MAGIC) {
            let _ = hub.announces.send(Datagram {
                from,
                bytes: bytes.to_vec(),
            });
            continue;
        }
        let Ok((header, _)) = firmware_proto::remp::decode_header(bytes) else {
            LinkStats::add(&hub.stats.packets_rejected, 1);
            continue;
        };
        let route = hub.routes.lock().unwrap().get(&header.device_id).cloned();
        match route {
            Some(tx) => {
                // A full queue drops the datagram, as the network would: UDP never blocks the hub
                // for one slow dongle.
                match tx.try_send(bytes.to_vec()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        LinkStats::add(&hub.stats.packets_dropped, 1);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        hub.routes.lock().unwrap().remove(&header.device_id);
                    }
                }
            }
            None => LinkStats::add(&hub.stats.packets_rejected, 1),
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Many LAN dongles share the hub's one socket, and a busy workstation may not read it for a few
    /// milliseconds: with the system's default buffer (about 200 KiB, a few hundred datagrams) a burst
    /// was dropped by the kernel, unseen by the agent (32 groups both ways lost 1 164 frames in
    /// `bench-relay --both-directions`).
    // Linux only: it reports twice the size it keeps, which is what tells an applied request from the
    // system's default on a kernel whose cap is the default itself.
    #[tokio::test]
    async fn the_socket_holds_a_burst_of_many_dongles() {
        let hub = UdpHub::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let size = socket2::SockRef::from(hub.socket.as_ref())
            .recv_buffer_size()
            .unwrap();
        // The kernel caps the request at net.core.rmem_max and reports twice what it keeps; without
        // the request it reports net.core.rmem_default (208 KiB, once), which is below this bound
        // whatever the cap.
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(RECV_BUFFER);
        assert!(
            size >= 2 * RECV_BUFFER.min(cap),
            "receive buffer {size} bytes, wanted {RECV_BUFFER} (capped at {cap})"
        );
    }
}
