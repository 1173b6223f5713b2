//! The state the tasks of one simulator share: the dongle core behind a lock, the queues to the host
//! link and the bus, the events, the faults and the counters. The links and the simulator's own tasks
//! use it; the simulator builds it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use firmware_proto::stream::StreamStats;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::event::SimEvent;
use crate::faults::Faults;
use crate::frame::Frame;
use crate::transmitter::Transmitter;
use dongle_core::{Flash, Output};

/// The dongle core over tokio's clock, so that the simulator's tests can pause and advance it.
pub(crate) type Dongle = dongle_core::Dongle<Instant, rand::rngs::StdRng>;

/// Counters of the host link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// The stream decoder's counters (serial only): CRC and COBS errors, skipped bytes.
    pub rx: StreamStats,
    /// Packets sent to the host.
    pub tx_packets: u64,
    /// Packets dropped by the drop fault.
    pub tx_dropped: u64,
    /// Packets corrupted by the corruption fault.
    pub tx_corrupted: u64,
    /// Garbage bursts sent.
    pub tx_garbage_bursts: u64,
    /// Packets discarded because the link was unplugged (or no UDP host is known).
    pub tx_discarded_unplugged: u64,
    /// Writes that failed or timed out.
    pub tx_write_failures: u64,
    /// The longest a packet waited between its arrival (the kernel's receive time, UDP on Linux) and
    /// the link reading it: the simulator kept from running by its machine, or its link busy
    /// meanwhile (sending, or sleeping out the delay fault).
    pub rx_late_max: std::time::Duration,
}

/// Counters of the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Frames received from other members.
    pub received: u64,
    /// Frames sent to other members.
    pub sent: u64,
    /// Datagram deliveries that failed (a member's queue stayed full, or it vanished).
    pub lost: u64,
    /// Frames dropped because the bus queue was full.
    pub queue_full: u64,
    /// The dongle's own frames dropped because its transmit queue was full: the host sent them faster
    /// than the bus at its bitrate carries.
    pub tx_queue_full: u64,
}

/// The state shared by the tasks of one simulator.
pub(crate) struct Shared {
    pub(crate) core: Mutex<Dongle>,
    pub(crate) host_tx: mpsc::Sender<Vec<u8>>,
    /// Frames for the other members of the bus, each with the time it has left the transmitter.
    pub(crate) bus_tx: Option<mpsc::Sender<(Frame, Instant)>>,
    pub(crate) events: broadcast::Sender<SimEvent>,
    pub(crate) flash_tx: watch::Sender<Flash>,
    pub(crate) faults: Mutex<Faults>,
    pub(crate) link_stats: Mutex<LinkStats>,
    pub(crate) bus_stats: Mutex<BusStats>,
    /// The transmit queue, unless the bus is unlimited.
    pub(crate) transmitter: Option<Mutex<Transmitter>>,
    /// Bumped at every power cycle, so that answers delayed across one are not sent.
    pub(crate) epoch: AtomicU64,
    pub(crate) plugged: watch::Sender<bool>,
    pub(crate) link_up: watch::Sender<bool>,
    pub(crate) serial_path: watch::Sender<Option<PathBuf>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock would be a bug; the data is still usable, so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Runs `f` on the dongle and carries out what it asks for.
    pub(crate) fn with_core<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Dongle, &mut Vec<Output>) -> R,
    ) -> R {
        self.with_core_since(None, f)
    }

    /// [`Self::with_core`] for what a packet that arrived at `arrived` asks; see [`Self::dispatch`].
    fn with_core_since<R>(
        self: &Arc<Self>,
        arrived: Option<Instant>,
        f: impl FnOnce(&mut Dongle, &mut Vec<Output>) -> R,
    ) -> R {
        let mut core = lock(&self.core);
        let mut out = Vec::new();
        let result = f(&mut core, &mut out);
        self.dispatch(&mut core, out, arrived);
        result
    }

    /// Carries out the core's outputs. Frames for the bus are offered to the transmit queue as of
    /// `arrived`, when the packet that carried them reached the dongle, where that is known: a real
    /// controller queues a frame when it comes, and the simulator, which shares its machine, may read
    /// a packet long after (see [`LinkStats::rx_late_max`]). The core itself runs on the time it runs.
    fn dispatch(self: &Arc<Self>, core: &mut Dongle, out: Vec<Output>, arrived: Option<Instant>) {
        for output in out {
            match output {
                Output::ToHost(packet) => {
                    if self.host_tx.try_send(packet.to_vec()).is_err() {
                        core.note_lost_to_host(1);
                    }
                }
                Output::ToHostLater { after, reply } => {
                    let shared = Arc::clone(self);
                    let epoch = self.epoch.load(Ordering::SeqCst);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        if shared.epoch.load(Ordering::SeqCst) != epoch {
                            return;
                        }
                        shared.with_core(|core, out| {
                            out.extend(
                                core.encode_deferred(Instant::now(), &reply)
                                    .map(Output::ToHost),
                            );
                        });
                    });
                }
                Output::ToBus(frame) => {
                    let now = Instant::now();
                    let leaves = match &self.transmitter {
                        Some(transmitter) => lock(transmitter).offer(
                            arrived.unwrap_or(now).min(now),
                            &frame,
                            core.flash().can.bitrate,
                        ),
                        None => Some(now),
                    };
                    let Some(leaves) = leaves else {
                        lock(&self.bus_stats).tx_queue_full += 1;
                        // The dongle counts it too, and reports it in BUS_STATUS.
                        core.note_lost_to_bus(1);
                        continue;
                    };
                    if let Some(tx) = &self.bus_tx
                        && tx.try_send((frame, leaves)).is_err()
                    {
                        lock(&self.bus_stats).queue_full += 1;
                    }
                }
                Output::Event(event) => {
                    let _ = self.events.send(event.into());
                }
                Output::FlashChanged(flash) => {
                    self.flash_tx.send_replace(flash);
                }
            }
        }
    }

    /// Hands one link packet to the dongle; false when it did not decode. `arrived` is when it reached
    /// the dongle, where the link knows that it came before it was read (see [`Self::dispatch`]).
    pub(crate) fn handle_packet(self: &Arc<Self>, bytes: &[u8], arrived: Option<Instant>) -> bool {
        self.with_core_since(arrived, |core, out| {
            core.handle_packet(Instant::now(), bytes, out)
        })
    }

    pub(crate) fn event(&self, event: SimEvent) {
        let _ = self.events.send(event);
    }

    pub(crate) fn faults(&self) -> Faults {
        *lock(&self.faults)
    }

    pub(crate) fn link_stats(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut lock(&self.link_stats));
    }

    pub(crate) fn set_link(
        self: &Arc<Self>,
        description: &str,
        udp_port: u16,
        lan_ip: Option<[u8; 4]>,
    ) {
        lock(&self.core).set_link(description, udp_port, lan_ip);
    }

    /// The dongle loses power: RAM state goes, delayed answers are cancelled.
    pub(crate) fn power_cycle(self: &Arc<Self>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        lock(&self.core).power_cycle(Instant::now(), crate::state::unix_ms());
    }

    pub(crate) fn deliver_local(self: &Arc<Self>, frames: &[Frame]) {
        // Generated and replayed frames stand for traffic on the dongle's own bus: the dongle
        // sees them, and so does every other member of the virtual bus.
        self.with_core(|core, out| core.on_bus_frames(Instant::now(), frames, out));
        if let Some(tx) = &self.bus_tx {
            let now = Instant::now();
            for frame in frames {
                if tx.try_send((*frame, now)).is_err() {
                    lock(&self.bus_stats).queue_full += 1;
                }
            }
        }
    }
}
