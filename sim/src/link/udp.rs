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
                    send(&shared, &link.discovery, from, announce).await;
                }
            }
            received = link.remp.recv_from(&mut remp_buf) => {
                let Ok((n, from)) = received else { continue };
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
                shared.handle_packet(bytes);
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
