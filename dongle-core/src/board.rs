//! The dongle's main loop on a board whose host link is a byte stream (USB CDC serial, a UART).
//!
//! A firmware's `main` is then a thin driver: it reads bytes from its link and lines from its UART
//! console, reads its timer, and hands each to [`StreamHost`], which frames and unframes packets
//! (SPEC 4.3: COBS + CRC-32), runs them through the [`Dongle`], keeps the CLI answers that are due
//! later, and gives what is left to the [`Board`]: bytes for the host, frames for the bus, events for
//! the console, and a new flash image to store. Nothing here waits: the firmware calls
//! [`StreamHost::poll`] from its loop and sleeps until the next byte, tick or [`StreamHost::next_due`].
//!
//! Bounded by construction: the decoder holds one frame of at most [`MAX_FRAME_LEN`] bytes, at most
//! [`MAX_DEFERRED`] answers wait, and an answer that finds the queue full is dropped and counted in
//! [`HostStats::deferred_dropped`] (the host's request times out, as over a lossy link).

use alloc::vec::Vec;

use firmware_proto::MAX_FRAME_LEN;
use firmware_proto::stream::{StreamDecoder, StreamStats, encode_frame};

use crate::dongle::{Deferred, Dongle, Event, Output};
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
    /// Stores the flash contents (their [`Flash::to_image`]) so that they survive a restart.
    fn store_flash(&mut self, flash: &Flash);
}

/// Counters of a [`StreamHost`]. They only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// The link decoder's counters: packets, CRC and COBS errors, oversize frames.
    pub link: StreamStats,
    /// Packets framed and written to the host.
    pub packets_out: u64,
    /// Deferred answers dropped because [`MAX_DEFERRED`] were already waiting.
    pub deferred_dropped: u64,
}

/// The dongle's side of a byte-stream link, and the answers waiting for their time.
pub struct StreamHost<I: Instant> {
    decoder: StreamDecoder,
    deferred: Vec<(I, Deferred)>,
    frame: Vec<u8>,
    outputs: Vec<Output>,
    stats: HostStats,
    started: bool,
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
            deferred: Vec::with_capacity(MAX_DEFERRED),
            frame: alloc::vec![0; MAX_FRAME_LEN],
            outputs: Vec::new(),
            stats: HostStats::default(),
            started: false,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> HostStats {
        HostStats {
            link: self.decoder.stats(),
            ..self.stats
        }
    }

    /// Bytes from the host link: every packet they complete is handled.
    pub fn receive(
        &mut self,
        dongle: &mut Dongle<I>,
        now: I,
        bytes: &[u8],
        board: &mut impl Board,
    ) {
        let mut outputs = core::mem::take(&mut self.outputs);
        let mut rejected = 0u32;
        self.decoder.push(bytes, |packet| {
            if !dongle.handle_packet(now, packet, &mut outputs) {
                rejected += 1;
            }
        });
        for _ in 0..rejected {
            self.decoder.count_rejected();
        }
        self.carry_out(dongle, now, &mut outputs, board);
        self.outputs = outputs;
    }

    /// Frames the board's bus delivered.
    pub fn bus_frames(
        &mut self,
        dongle: &mut Dongle<I>,
        now: I,
        frames: &[Frame],
        board: &mut impl Board,
    ) {
        let mut outputs = core::mem::take(&mut self.outputs);
        dongle.on_bus_frames(now, frames, &mut outputs);
        self.carry_out(dongle, now, &mut outputs, board);
        self.outputs = outputs;
    }

    /// A line typed on the dongle's UART console.
    pub fn uart_command(
        &mut self,
        dongle: &mut Dongle<I>,
        now: I,
        line: &str,
        board: &mut impl Board,
    ) {
        let mut outputs = core::mem::take(&mut self.outputs);
        dongle.uart_command(now, line, &mut outputs);
        self.carry_out(dongle, now, &mut outputs, board);
        self.outputs = outputs;
    }

    /// Lets time pass: closes an expired pairing window and sends the answers now due.
    pub fn poll(&mut self, dongle: &mut Dongle<I>, now: I, board: &mut impl Board) {
        let mut outputs = core::mem::take(&mut self.outputs);
        dongle.tick(now, &mut outputs);
        let mut i = 0;
        while i < self.deferred.len() {
            if self.deferred[i].0 <= now {
                let (_, reply) = self.deferred.swap_remove(i);
                outputs.extend(dongle.encode_deferred(now, &reply).map(Output::ToHost));
            } else {
                i += 1;
            }
        }
        self.carry_out(dongle, now, &mut outputs, board);
        self.outputs = outputs;
    }

    /// When the next deferred answer is due, if one waits: the firmware may sleep until then.
    pub fn next_due(&self) -> Option<I> {
        self.deferred.iter().map(|(due, _)| *due).min()
    }

    /// Forgets the answers waiting and any partial frame, as a power cycle does.
    pub fn reset(&mut self) {
        self.deferred.clear();
        self.decoder.reset();
        self.started = false;
    }

    /// The host link went away and came back (a USB unplug and replug on a board that kept its
    /// power): a new host authenticates before it sees the bus, half a frame from the old one is no
    /// packet, and answers due to the old one are not sent to it. The dongle forgets what a power
    /// cycle forgets; `wall_now_ms` is the wall clock as [`Dongle::new`] takes it.
    pub fn link_restarted(&mut self, dongle: &mut Dongle<I>, now: I, wall_now_ms: u64) {
        self.reset();
        dongle.power_cycle(now, wall_now_ms);
    }

    fn carry_out(
        &mut self,
        dongle: &mut Dongle<I>,
        now: I,
        outputs: &mut Vec<Output>,
        board: &mut impl Board,
    ) {
        for output in outputs.drain(..) {
            match output {
                Output::ToHost(packet) => {
                    if !self.started {
                        self.started = true;
                        board.to_host(&[0]);
                    }
                    if let Ok(n) = encode_frame(&packet, &mut self.frame) {
                        self.stats.packets_out += 1;
                        board.to_host(&self.frame[..n]);
                    }
                }
                Output::ToHostLater { after, reply } => {
                    if self.deferred.len() < MAX_DEFERRED {
                        self.deferred.push((now + after, reply));
                    } else {
                        self.stats.deferred_dropped += 1;
                    }
                }
                Output::ToBus(frame) => {
                    if !board.to_bus(frame) {
                        dongle.note_lost_to_bus(1);
                    }
                }
                Output::Event(event) => board.event(event),
                Output::FlashChanged => board.store_flash(dongle.flash()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dongle::{DongleConfig, Extensions};
    use alloc::boxed::Box;
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
    }

    impl Board for Bench {
        fn to_host(&mut self, bytes: &[u8]) {
            self.wire.extend_from_slice(bytes);
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

    fn dongle() -> Dongle<Ticks> {
        let cfg = DongleConfig {
            extensions: Extensions::ALL,
            ..DongleConfig::default()
        };
        Dongle::new(
            cfg,
            Flash::new(ID),
            Ticks(0),
            0,
            Box::new(rand::rngs::StdRng::seed_from_u64(1)),
        )
    }

    fn pair(d: &mut Dongle<Ticks>, host: &mut StreamHost<Ticks>, bench: &mut Bench) -> [u8; 32] {
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
        host.uart_command(&mut d, Ticks(1), "factory-reset", &mut bench);
        assert_eq!(bench.flash.as_ref().map(|f| f.token.is_some()), Some(false));
        assert!(
            bench
                .events
                .iter()
                .any(|e| matches!(e, Event::FactoryReset))
        );
    }
}
