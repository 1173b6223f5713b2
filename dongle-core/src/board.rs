//! The dongle's main loop on a board whose host link is a byte stream (USB CDC serial, a UART).
//!
//! A firmware's `main` is then a thin driver: it reads bytes from its link and lines from its UART
//! console, reads its timer, and hands each to [`StreamHost`], which frames and unframes packets
//! (SPEC 4.3: COBS + CRC-32), runs them through the [`Dongle`], keeps the CLI answers that are due
//! later, and gives what is left to the [`Board`]: bytes for the host, frames for the bus, events for
//! the console, and a new flash image to store. Nothing here waits: the firmware calls
//! [`StreamHost::poll`] from its loop and sleeps until the next byte, tick or [`StreamHost::next_due`].
//!
//! Bounded by construction, with no heap: the decoder holds one frame of at most [`MAX_FRAME_LEN`]
//! bytes, each output is carried out as the dongle makes it (nothing gathers them), at most
//! [`MAX_DEFERRED`] answers wait, and an answer that finds the queue full is dropped and counted in
//! [`HostStats::deferred_dropped`] (the host's request times out, as over a lossy link). A
//! `StreamHost` is therefore a fixed size (about 14 KiB), known when the firmware links.

use firmware_proto::MAX_FRAME_LEN;
use firmware_proto::stream::{StreamDecoder, StreamStats, encode_frame};
use rand::Rng;

use crate::dongle::{Deferred, Dongle, Event, Output, Outputs};
use crate::flash::Flash;
use crate::frame::Frame;
use crate::time::Instant;

/// The most CLI answers that may wait for their time at once.
pub const MAX_DEFERRED: usize = 8;

/// What a board does for its dongle.
pub trait Board {
    /// Writes one framed packet (a lone 0x00 included, when resynchronising) to the host link.
    fn to_host(&mut self, bytes: &[u8]);
    /// Puts a frame on the CAN bus; false when its transmit queue was full and the frame is dropped
    /// (the dongle counts it, and reports it in BUS_STATUS). A board that learns of a drop only later
    /// counts it with [`Dongle::note_lost_to_bus`].
    fn to_bus(&mut self, frame: Frame) -> bool;
    /// Shows an event on the dongle's display or console (the PIN is one).
    fn event(&mut self, event: Event);
    /// Stores the flash contents (their [`Flash::to_image`]) so that they survive a restart. Called
    /// when they change, before anything that follows the change goes to the host: a board that
    /// stores later (an erase takes long) must hold back what it sends meanwhile, so that the host
    /// never hears "paired" from a dongle that has not stored its token.
    fn store_flash(&mut self, flash: &Flash);
}

/// Counters of a [`StreamHost`]. They only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// The link decoder's counters: packets, CRC and COBS errors, oversize frames.
    pub link: StreamStats,
    /// Packets framed and handed to the board for the host (a board that then drops one counts it
    /// itself).
    pub packets_out: u64,
    /// Deferred answers dropped because [`MAX_DEFERRED`] were already waiting.
    pub deferred_dropped: u64,
}

/// The framing side of the host link: what turns a packet into bytes on the wire.
struct LinkWriter {
    frame: [u8; MAX_FRAME_LEN],
    /// Whether the resynchronising 0x00 went out.
    started: bool,
    packets_out: u64,
}

impl LinkWriter {
    fn write(&mut self, packet: &[u8], board: &mut impl Board) {
        if !self.started {
            self.started = true;
            board.to_host(&[0]);
        }
        if let Ok(n) = encode_frame(packet, &mut self.frame) {
            self.packets_out += 1;
            board.to_host(&self.frame[..n]);
        }
    }
}

/// The answers waiting for their time.
type DeferredQueue<I> = heapless::Vec<(I, Deferred), MAX_DEFERRED>;

/// Carries out each of the dongle's outputs as it is made, in order. What needs the dongle itself (a
/// lost frame's count) is noted and done once the dongle has returned.
struct Carrier<'a, I: Instant, B: Board> {
    now: I,
    link: &'a mut LinkWriter,
    deferred: &'a mut DeferredQueue<I>,
    deferred_dropped: &'a mut u64,
    board: &'a mut B,
    lost_to_bus: u64,
}

impl<I: Instant, B: Board> Outputs for Carrier<'_, I, B> {
    fn push(&mut self, output: Output) {
        match output {
            Output::ToHost(packet) => self.link.write(&packet, self.board),
            Output::ToHostLater { after, reply } => {
                if self.deferred.push((self.now + after, reply)).is_err() {
                    *self.deferred_dropped += 1;
                }
            }
            Output::ToBus(frame) => {
                if !self.board.to_bus(frame) {
                    self.lost_to_bus += 1;
                }
            }
            Output::Event(event) => self.board.event(event),
            Output::FlashChanged(flash) => self.board.store_flash(&flash),
        }
    }
}

impl<I: Instant, B: Board> Carrier<'_, I, B> {
    /// Does what waited for the dongle to return.
    fn finish<R: Rng>(self, dongle: &mut Dongle<I, R>) {
        if self.lost_to_bus > 0 {
            dongle.note_lost_to_bus(self.lost_to_bus);
        }
    }
}

/// Where the dongle's outputs go: the link's writer and the answers waiting for their time.
struct Outbox<I: Instant> {
    link: LinkWriter,
    deferred: DeferredQueue<I>,
    deferred_dropped: u64,
}

impl<I: Instant> Outbox<I> {
    fn carrier<'a, B: Board>(&'a mut self, now: I, board: &'a mut B) -> Carrier<'a, I, B> {
        Carrier {
            now,
            link: &mut self.link,
            deferred: &mut self.deferred,
            deferred_dropped: &mut self.deferred_dropped,
            board,
            lost_to_bus: 0,
        }
    }
}

/// The dongle's side of a byte-stream link, and the answers waiting for their time.
pub struct StreamHost<I: Instant> {
    decoder: StreamDecoder,
    outbox: Outbox<I>,
}

impl<I: Instant> Default for StreamHost<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I: Instant> StreamHost<I> {
    /// A host with an empty decoder. Its first write to the link is a lone 0x00, which ends whatever
    /// partial frame the other side holds from before a reset.
    pub fn new() -> Self {
        Self {
            decoder: StreamDecoder::new(),
            outbox: Outbox {
                link: LinkWriter {
                    frame: [0; MAX_FRAME_LEN],
                    started: false,
                    packets_out: 0,
                },
                deferred: heapless::Vec::new(),
                deferred_dropped: 0,
            },
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> HostStats {
        HostStats {
            link: self.decoder.stats(),
            packets_out: self.outbox.link.packets_out,
            deferred_dropped: self.outbox.deferred_dropped,
        }
    }

    /// Bytes from the host link: every packet they complete is handled.
    pub fn receive<R: Rng>(
        &mut self,
        dongle: &mut Dongle<I, R>,
        now: I,
        bytes: &[u8],
        board: &mut impl Board,
    ) {
        let mut rejected = 0u32;
        // The decoder hands out packets while it is borrowed; the carrier borrows only the outbox.
        let mut carrier = self.outbox.carrier(now, board);
        self.decoder.push(bytes, |packet| {
            if !dongle.handle_packet(now, packet, &mut carrier) {
                rejected += 1;
            }
        });
        carrier.finish(dongle);
        for _ in 0..rejected {
            self.decoder.count_rejected();
        }
    }

    /// Frames the board's bus delivered.
    pub fn bus_frames<R: Rng>(
        &mut self,
        dongle: &mut Dongle<I, R>,
        now: I,
        frames: &[Frame],
        board: &mut impl Board,
    ) {
        let mut carrier = self.outbox.carrier(now, board);
        dongle.on_bus_frames(now, frames, &mut carrier);
        carrier.finish(dongle);
    }

    /// A line typed on the dongle's UART console.
    pub fn uart_command<R: Rng>(
        &mut self,
        dongle: &mut Dongle<I, R>,
        now: I,
        line: &str,
        board: &mut impl Board,
    ) {
        let mut carrier = self.outbox.carrier(now, board);
        dongle.uart_command(now, line, &mut carrier);
        carrier.finish(dongle);
    }

    /// Lets time pass: closes an expired pairing window and sends the answers now due.
    pub fn poll<R: Rng>(&mut self, dongle: &mut Dongle<I, R>, now: I, board: &mut impl Board) {
        let mut carrier = self.outbox.carrier(now, board);
        dongle.tick(now, &mut carrier);
        carrier.finish(dongle);
        let mut i = 0;
        let outbox = &mut self.outbox;
        while i < outbox.deferred.len() {
            if outbox.deferred[i].0 <= now {
                let (_, reply) = outbox.deferred.swap_remove(i);
                if let Some(packet) = dongle.encode_deferred(now, &reply) {
                    outbox.link.write(&packet, board);
                }
            } else {
                i += 1;
            }
        }
    }

    /// When the next deferred answer is due, if one waits: the firmware may sleep until then.
    pub fn next_due(&self) -> Option<I> {
        self.outbox.deferred.iter().map(|(due, _)| *due).min()
    }

    /// Forgets the answers waiting and any partial frame, as a power cycle does.
    pub fn reset(&mut self) {
        self.outbox.deferred.clear();
        self.decoder.reset();
        self.outbox.link.started = false;
    }

    /// The host link went away and came back (a USB unplug and replug on a board that kept its
    /// power): a new host authenticates before it sees the bus, half a frame from the old one is no
    /// packet, and answers due to the old one are not sent to it. The dongle forgets what a power
    /// cycle forgets; `wall_now_ms` is the wall clock as [`Dongle::new`] takes it.
    pub fn link_restarted<R: Rng>(&mut self, dongle: &mut Dongle<I, R>, now: I, wall_now_ms: u64) {
        self.reset();
        dongle.power_cycle(now, wall_now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dongle::{DongleConfig, Extensions};
    use alloc::string::String;
    use firmware_proto::discovery;
    use firmware_proto::ids::{CorrelationId, DeviceId, DongleToken};
    use firmware_proto::remp::{
        self, CliRequest, Header, Packet, PairingStart, PairingSubmit, Payload,
    };
    use firmware_proto::{MAX_PACKET_LEN, stream::max_frame_len};
    use rand::SeedableRng;

    use crate::time::Ticks;

    const ID: DeviceId = DeviceId([8, 7, 6, 5, 4, 3, 2, 1]);

    /// A board that keeps what it is given, and a decoder for what the dongle sent.
    #[derive(Default)]
    struct Bench {
        wire: Vec<u8>,
        bus: Vec<Frame>,
        /// Frames the bus takes before its transmit queue is full (None: all).
        bus_room: Option<usize>,
        events: Vec<Event>,
        flash: Option<Flash>,
        /// How many times the flash was stored.
        stores: usize,
        /// What the board did, in order: `h` a write to the host, `f` a store of the flash.
        order: String,
    }

    impl Board for Bench {
        fn to_host(&mut self, bytes: &[u8]) {
            self.wire.extend_from_slice(bytes);
            self.order.push('h');
        }
        fn to_bus(&mut self, frame: Frame) -> bool {
            if self.bus_room.is_some_and(|room| self.bus.len() >= room) {
                return false;
            }
            self.bus.push(frame);
            true
        }
        fn event(&mut self, event: Event) {
            self.events.push(event);
        }
        fn store_flash(&mut self, flash: &Flash) {
            self.flash = Some(flash.clone());
            self.stores += 1;
            self.order.push('f');
        }
    }

    impl Bench {
        fn packets(&mut self) -> Vec<Vec<u8>> {
            let mut decoder: StreamDecoder = StreamDecoder::new();
            let mut packets = Vec::new();
            decoder.push(&core::mem::take(&mut self.wire), |p| {
                packets.push(p.to_vec())
            });
            packets
        }
    }

    fn framed(packet: &[u8]) -> Vec<u8> {
        let mut out = alloc::vec![0; max_frame_len(packet.len())];
        let n = encode_frame(packet, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn remp_packet(payload: Payload<'_>, token: &[u8], seq: u32) -> Vec<u8> {
        let mut header = Header::new(payload.msg_type().unwrap(), ID, seq);
        header.token = token;
        let mut buf = alloc::vec![0u8; MAX_PACKET_LEN];
        let n = remp::encode(&Packet { header, payload }, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn dongle() -> Dongle<Ticks, rand::rngs::StdRng> {
        let cfg = DongleConfig {
            extensions: Extensions::ALL,
            ..DongleConfig::default()
        };
        Dongle::new(
            cfg,
            Flash::new(ID),
            Ticks(0),
            0,
            rand::rngs::StdRng::seed_from_u64(1),
        )
    }

    fn pair(
        d: &mut Dongle<Ticks, rand::rngs::StdRng>,
        host: &mut StreamHost<Ticks>,
        bench: &mut Bench,
    ) -> [u8; 32] {
        let start = PairingStart {
            corr_id: CorrelationId([1; 16]),
        };
        host.receive(
            d,
            Ticks(0),
            &framed(&remp_packet(Payload::PairingStart(start), &[], 1)),
            bench,
        );
        let pin = bench
            .events
            .iter()
            .find_map(|e| match e {
                Event::Pin { pin, .. } => Some(*pin),
                _ => None,
            })
            .expect("a PIN on the console");
        let ack = bench.packets().pop().unwrap();
        let Payload::PairingAck(ack) = remp::decode(&ack).unwrap().payload else {
            panic!("not a pairing ack");
        };
        let token = [0x5a; 32];
        let submit = PairingSubmit {
            corr_id: CorrelationId([2; 16]),
            pin,
            pairing_nonce: ack.pairing_nonce.unwrap(),
            token: DongleToken::from_bytes(token),
        };
        host.receive(
            d,
            Ticks(0),
            &framed(&remp_packet(Payload::PairingSubmit(submit), &[], 2)),
            bench,
        );
        bench.packets();
        token
    }

    #[test]
    fn a_discover_in_pieces_is_answered_after_one_resynchronising_zero() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        let mut discover = [0u8; 64];
        let n = discovery::encode_discover(9, &mut discover).unwrap();
        let wire = framed(&discover[..n]);
        let (a, b) = wire.split_at(3);
        host.receive(&mut d, Ticks(0), a, &mut bench);
        assert!(bench.wire.is_empty(), "half a frame is not a packet");
        host.receive(&mut d, Ticks(0), b, &mut bench);
        assert_eq!(
            bench.wire.first(),
            Some(&0),
            "the first write resynchronises"
        );
        let packets = bench.packets();
        assert_eq!(packets.len(), 1);
        let announce = discovery::decode(&packets[0]).unwrap();
        assert_eq!(announce.header.seq, 9);
        assert_eq!(host.stats().packets_out, 1);
    }

    #[test]
    fn garbage_is_counted_and_the_link_recovers() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        // A frame that is not COBS, then one longer than any packet.
        host.receive(&mut d, Ticks(0), &[1, 2, 3, 0], &mut bench);
        host.receive(&mut d, Ticks(0), &[0xff; 2000], &mut bench);
        let mut discover = [0u8; 64];
        let n = discovery::encode_discover(1, &mut discover).unwrap();
        host.receive(&mut d, Ticks(0), &[0], &mut bench);
        host.receive(&mut d, Ticks(0), &framed(&discover[..n]), &mut bench);
        assert_eq!(bench.packets().len(), 1);
        let stats = host.stats().link;
        assert!(
            stats.cobs_errors + stats.crc_errors + stats.oversize > 0,
            "{stats:?}"
        );
    }

    #[test]
    fn a_slow_command_is_answered_when_due_and_not_before() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        let token = pair(&mut d, &mut host, &mut bench);
        let request = CliRequest {
            corr_id: CorrelationId([3; 16]),
            flags: 0,
            command: "sleep 50",
        };
        host.receive(
            &mut d,
            Ticks(0),
            &framed(&remp_packet(Payload::CliRequest(request), &token, 3)),
            &mut bench,
        );
        assert!(bench.packets().is_empty());
        assert_eq!(host.next_due(), Some(Ticks(50_000)));
        host.poll(&mut d, Ticks(49_999), &mut bench);
        assert!(bench.packets().is_empty(), "not due yet");
        host.poll(&mut d, Ticks(50_000), &mut bench);
        let answers = bench.packets();
        assert_eq!(answers.len(), 1);
        let Payload::CliResponse(r) = remp::decode(&answers[0]).unwrap().payload else {
            panic!("not a CLI response");
        };
        assert_eq!(String::from_utf8_lossy(r.output), "slept 50 ms\n");
        assert_eq!(host.next_due(), None);
    }

    #[test]
    fn answers_past_the_queue_are_dropped_and_counted() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        let token = pair(&mut d, &mut host, &mut bench);
        for seq in 0..(MAX_DEFERRED as u32 + 3) {
            let request = CliRequest {
                corr_id: CorrelationId([4; 16]),
                flags: 0,
                command: "sleep 10",
            };
            host.receive(
                &mut d,
                Ticks(0),
                &framed(&remp_packet(Payload::CliRequest(request), &token, 10 + seq)),
                &mut bench,
            );
        }
        assert_eq!(host.stats().deferred_dropped, 3);
        host.poll(&mut d, Ticks(10_000), &mut bench);
        assert_eq!(bench.packets().len(), MAX_DEFERRED);
    }

    #[test]
    fn after_the_link_restarts_the_bus_waits_for_the_new_host_to_authenticate() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        let token = pair(&mut d, &mut host, &mut bench);
        // The first host authenticates (any token request does) and then sees the bus.
        let slow = CliRequest {
            corr_id: CorrelationId([5; 16]),
            flags: 0,
            command: "sleep 50",
        };
        host.receive(
            &mut d,
            Ticks(0),
            &framed(&remp_packet(Payload::CliRequest(slow), &token, 3)),
            &mut bench,
        );
        let frame =
            Frame::classic(firmware_proto::ids::CanId::standard(0x123).unwrap(), &[1]).unwrap();
        host.bus_frames(&mut d, Ticks(1), &[frame], &mut bench);
        assert_eq!(
            bench.packets().len(),
            1,
            "the authenticated host gets the frame"
        );
        // Unplugged and plugged again: a new host has sent nothing yet.
        host.link_restarted(&mut d, Ticks(2), 0);
        host.bus_frames(&mut d, Ticks(3), &[frame], &mut bench);
        host.poll(&mut d, Ticks(60_000), &mut bench);
        assert!(
            bench.packets().is_empty(),
            "neither the bus nor the old host's answer reaches the new host"
        );
        assert_eq!(host.next_due(), None);
    }

    #[test]
    fn frames_the_boards_full_queue_drops_are_reported_in_bus_status() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench {
            bus_room: Some(2),
            ..Bench::default()
        };
        let token = pair(&mut d, &mut host, &mut bench);
        let frame = |i: u8| {
            firmware_proto::remp::CanFrame::new(
                firmware_proto::ids::CanId::standard(0x10).unwrap(),
                &[i],
            )
            .unwrap()
        };
        for i in 0..5u8 {
            host.receive(
                &mut d,
                Ticks(1),
                &framed(&remp_packet(
                    Payload::Can(frame(i)),
                    &token,
                    10 + u32::from(i),
                )),
                &mut bench,
            );
        }
        assert_eq!(bench.bus.len(), 2);
        assert_eq!(d.counters().lost_to_bus, 3);
        bench.packets();
        let request = firmware_proto::ext::BusStatus::request();
        host.receive(
            &mut d,
            Ticks(2),
            &framed(&remp_packet(Payload::BusStatus(request), &token, 20)),
            &mut bench,
        );
        let report = bench.packets().pop().expect("a report");
        let Payload::BusStatus(report) = remp::decode(&report).unwrap().payload else {
            panic!("not a bus status");
        };
        assert_eq!(report.lost_frames, 3);
    }

    #[test]
    fn pairing_stores_the_flash_and_shows_the_pin() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        let token = pair(&mut d, &mut host, &mut bench);
        // The token is stored before the answer that says "paired" goes out: a dongle that loses
        // power in between must not have told the host it holds a token it forgot.
        assert!(
            bench.order.ends_with("fh"),
            "the host heard before the flash was stored: {}",
            bench.order
        );
        let stored = bench.flash.clone().expect("the token was stored");
        assert_eq!(stored.token.map(|t| *t.as_bytes()), Some(token));
        assert!(bench.events.iter().any(|e| matches!(e, Event::Paired)));
    }

    #[test]
    fn a_uart_factory_reset_erases_the_token() {
        let mut d = dongle();
        let mut host = StreamHost::new();
        let mut bench = Bench::default();
        pair(&mut d, &mut host, &mut bench);
        let stores = bench.stores;
        host.uart_command(&mut d, Ticks(1), "factory-reset", &mut bench);
        assert_eq!(bench.flash.as_ref().map(|f| f.token.is_some()), Some(false));
        assert_eq!(bench.stores, stores + 1);
        assert!(
            bench
                .events
                .iter()
                .any(|e| matches!(e, Event::FactoryReset))
        );
    }
}
