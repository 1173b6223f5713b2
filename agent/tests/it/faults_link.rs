//! Faults on the dongle link, end to end: a simulated dongle on a real pseudo-terminal and the agent's own
//! transport and `DongleSession`.
//!
//! - 1 % of the serial bytes from the dongle are corrupted while it streams frames: nothing crashes, the
//!   damaged packets are rejected and counted in `LinkStats`, every frame delivered is intact, and the
//!   session still answers afterwards.
//! - The simulator's own fault injection (garbage bursts and corrupted packets) is counted the same way.
//! - A burst larger than one batch, to a dongle with and without session MACs, reaches its bus whole.
//! - The dongle is unplugged in the middle of a command: the command fails with `SessionError::Closed`
//!   at once, not after its timeout, and so does a request made after the unplug.

use std::io;
use std::pin::Pin as StdPin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bridge_agent::session::{DongleSession, Frame, SessionConfig, SessionError};
use bridge_agent::transport::{self, LinkStats};
use dongle_sim::{Faults, SimConfig, SimEvent, SimHandle, Simulator};
use firmware_proto::ids::{CanId, CorrelationId, DongleToken};
use firmware_proto::remp::PairingStatus;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;

/// The identifier of the test frames; their data is a sequence number and its complement, so that a
/// damaged frame could not pass for an intact one.
const FRAME_ID: u16 = 0x100;

fn frame(seq: u32) -> dongle_sim::Frame {
    let mut data = [0u8; 8];
    data[..4].copy_from_slice(&seq.to_be_bytes());
    data[4..].copy_from_slice(&(!seq).to_be_bytes());
    dongle_sim::Frame::classic(CanId::standard(FRAME_ID).unwrap(), &data).unwrap()
}

/// The sequence number of a delivered frame, after checking that it is one of ours, undamaged.
fn intact_seq(f: &Frame) -> u32 {
    assert_eq!(
        f.id,
        CanId::standard(FRAME_ID).unwrap(),
        "a frame with a damaged id: {f:?}"
    );
    let data = f.data();
    assert_eq!(data.len(), 8, "a frame with a damaged length: {f:?}");
    let seq = u32::from_be_bytes(data[..4].try_into().unwrap());
    let check = u32::from_be_bytes(data[4..].try_into().unwrap());
    assert_eq!(check, !seq, "a frame with damaged data: {f:?}");
    seq
}

fn config(request_timeout: Duration) -> SessionConfig {
    SessionConfig {
        request_timeout,
        ..SessionConfig::default()
    }
}

async fn serial_sim(dir: &tempfile::TempDir) -> SimHandle {
    Simulator::start(SimConfig::serial(dir.path().join("flash.json")))
        .await
        .expect("the simulator starts")
}

/// Pairs the dongle through `session` and authenticates with the new token, which also makes the dongle
/// forward its bus frames to this host (it does so only after an authenticated packet).
async fn pair_and_authenticate(sim: &SimHandle, session: &DongleSession) {
    let mut events = sim.events();
    let start = session
        .pairing_start(CorrelationId([1; 16]))
        .await
        .expect("pairing start is answered");
    assert_eq!(start.status, PairingStatus::Ok);
    let pin = loop {
        match tokio::time::timeout(Duration::from_secs(2), events.recv()).await {
            Ok(Ok(SimEvent::Dongle(dongle_sim::Event::Pin { pin, .. }))) => break pin,
            Ok(Ok(_)) => continue,
            other => panic!("no PIN shown: {other:?}"),
        }
    };
    let token = DongleToken::from_bytes([0x5a; 32]);
    let ack = session
        .pairing_submit(
            CorrelationId([2; 16]),
            pin,
            start.pairing_nonce.expect("a nonce"),
            token,
        )
        .await
        .expect("pairing submit is answered");
    assert_eq!(ack.status, PairingStatus::Ok);
    session.authenticate(token).await.unwrap();
    session
        .can_config_get()
        .await
        .expect("an authenticated request is answered");
}

/// Injects `count` frames onto the dongle's bus in small bursts, so that its host queue never overflows.
async fn stream_frames(sim: &SimHandle, count: u32) {
    let mut seq = 0;
    while seq < count {
        let burst: Vec<_> = (seq..(seq + 50).min(count)).map(frame).collect();
        seq += burst.len() as u32;
        sim.inject_bus_frames(&burst);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Receives frames until none has come for a while; checks each and returns their sequence numbers.
async fn drain(frames: &mut mpsc::Receiver<Frame>) -> Vec<u32> {
    let mut seqs = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_millis(500), frames.recv()).await {
        seqs.push(intact_seq(&f));
    }
    seqs
}

/// The frames the dongle really wrote to its host: those it forwarded minus those its full queue lost
/// (one frame per packet without the batch extension).
fn frames_sent(sim: &SimHandle) -> u64 {
    let stats = sim.stats();
    stats.dongle.frames_to_host - stats.dongle.lost_to_host
}

/// A byte stream that corrupts the bytes it reads at a settable rate (parts per million), as a noisy
/// serial line would: each hit byte is XORed with a non-zero value, so it may also become a frame
/// delimiter (0x00) or stop being one.
struct Corrupting<T> {
    inner: T,
    per_million: Arc<AtomicU32>,
    corrupted: Arc<AtomicU64>,
    rng: u64,
}

impl<T> Corrupting<T> {
    /// xorshift64*: deterministic, so a failure replays with the same damage.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corrupting<T> {
    fn poll_read(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = StdPin::new(&mut this.inner).poll_read(cx, buf);
        let rate = u64::from(this.per_million.load(Ordering::Relaxed));
        if rate > 0 && matches!(result, Poll::Ready(Ok(()))) {
            let end = buf.filled().len();
            for i in before..end {
                if this.next() % 1_000_000 < rate {
                    let flip = (this.next() % 255 + 1) as u8;
                    buf.filled_mut()[i] ^= flip;
                    this.corrupted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corrupting<T> {
    fn poll_write(
        self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        StdPin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        StdPin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: StdPin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        StdPin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn one_percent_of_serial_bytes_corrupted_costs_only_the_packets_hit() {
    let dir = tempfile::tempdir().unwrap();
    let sim = serial_sim(&dir).await;
    let path = sim.serial_path().expect("a serial dongle");
    let port = tokio_serial::new(path.to_string_lossy(), 115_200)
        .open_native_async()
        .expect("the pseudo-terminal opens");
    let per_million = Arc::new(AtomicU32::new(0));
    let corrupted = Arc::new(AtomicU64::new(0));
    let noisy = Corrupting {
        inner: port,
        per_million: per_million.clone(),
        corrupted: corrupted.clone(),
        rng: 0x9e37_79b9_7f4a_7c15,
    };
    let link = transport::stream::spawn(noisy, path.display().to_string());
    let link_stats = link.stats.clone();
    let session = DongleSession::open(link, config(Duration::from_secs(2)))
        .await
        .expect("the dongle answers DISCOVER");
    pair_and_authenticate(&sim, &session).await;
    let mut frames = session.take_frames().unwrap();
    let rejected_before = LinkStats::get(&link_stats.packets_rejected);

    // 1 % of the bytes from the dongle while it streams 2000 frames.
    per_million.store(10_000, Ordering::Relaxed);
    stream_frames(&sim, 2000).await;
    let seqs = drain(&mut frames).await;
    per_million.store(0, Ordering::Relaxed);

    let sent = frames_sent(&sim);
    let delivered = seqs.len() as u64;
    let lost = sent - delivered;
    let rejected = LinkStats::get(&link_stats.packets_rejected) - rejected_before;
    let hit = corrupted.load(Ordering::Relaxed);
    eprintln!(
        "sent {sent}, delivered {delivered}, lost {lost}, bytes corrupted {hit}, packets rejected {rejected}, bytes skipped {}",
        LinkStats::get(&link_stats.bytes_skipped)
    );
    assert_eq!(sent, 2000, "the simulator wrote every frame");
    assert!(hit > 0, "the line corrupted bytes");
    // Each frame is about 55 bytes on the wire, so about 0.99^55 = 58 % arrive undamaged.
    assert!(
        delivered >= sent * 4 / 10,
        "only {delivered} of {sent} frames arrived"
    );
    assert!(lost > 0 && rejected > 0, "the damage was noticed");
    // A damaged frame is rejected whole; a hit delimiter can merge two frames into one rejection.
    assert!(
        lost <= 2 * rejected,
        "{lost} frames lost but only {rejected} packets rejected"
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "frames arrive in order, none twice"
    );
    assert!(seqs.iter().all(|&s| s < 2000));
    assert_eq!(session.stats().frames_in.load(Ordering::Relaxed), delivered);

    // The line is clean again: the session still works, nothing was left broken.
    session
        .can_config_get()
        .await
        .expect("the session answers after the noise");
    assert!(!session.is_closed());
    sim.shutdown().await;
}

#[tokio::test]
async fn simulated_garbage_and_corrupted_packets_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let sim = serial_sim(&dir).await;
    let path = sim.serial_path().expect("a serial dongle");
    let link = transport::serial::open(&path).await.unwrap();
    let link_stats = link.stats.clone();
    let session = DongleSession::open(link, config(Duration::from_secs(2)))
        .await
        .unwrap();
    pair_and_authenticate(&sim, &session).await;
    let mut frames = session.take_frames().unwrap();
    let rejected_before = LinkStats::get(&link_stats.packets_rejected);
    let link_before = sim.stats().link;

    sim.set_faults(Faults {
        garbage: true,
        corrupt_pct: 5,
        ..Faults::default()
    });
    stream_frames(&sim, 1000).await;
    let seqs = drain(&mut frames).await;
    sim.set_faults(Faults::default());

    let link_after = sim.stats().link;
    let corrupted = link_after.tx_corrupted - link_before.tx_corrupted;
    let bursts = link_after.tx_garbage_bursts - link_before.tx_garbage_bursts;
    let rejected = LinkStats::get(&link_stats.packets_rejected) - rejected_before;
    eprintln!(
        "delivered {}, corrupted {corrupted}, garbage bursts {bursts}, rejected {rejected}, packets {}, write failures {}",
        seqs.len(),
        link_after.tx_packets - link_before.tx_packets,
        link_after.tx_write_failures - link_before.tx_write_failures,
    );
    assert_eq!(frames_sent(&sim), 1000);
    assert!(corrupted > 0 && bursts >= 1000);
    // Garbage never costs a good frame: exactly the corrupted packets are missing.
    assert_eq!(seqs.len() as u64, 1000 - corrupted);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // Every corrupted packet is rejected; a garbage burst is rejected too, or skipped as noise.
    assert!(
        rejected >= corrupted && rejected <= corrupted + bursts,
        "{rejected} rejected for {corrupted} corrupted packets and {bursts} bursts"
    );
    session
        .can_config_get()
        .await
        .expect("the session answers after the faults");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_command_on_an_unplugged_dongle_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let sim = serial_sim(&dir).await;
    let path = sim.serial_path().expect("a serial dongle");
    // Long timeouts: an error within a second can only come from noticing the unplug.
    let session = Arc::new(
        DongleSession::open(
            transport::serial::open(&path).await.unwrap(),
            config(Duration::from_secs(20)),
        )
        .await
        .unwrap(),
    );
    pair_and_authenticate(&sim, &session).await;

    // A command that takes 3 s on the dongle, waited for up to 3 + 20 s.
    let s = session.clone();
    let command = tokio::spawn(async move {
        let started = Instant::now();
        let result = s
            .cli(
                CorrelationId([3; 16]),
                "sleep 3000",
                false,
                Duration::from_secs(3),
            )
            .await;
        (result, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unplugged_at = Instant::now();
    sim.unplug().await;
    let (result, _) = tokio::time::timeout(Duration::from_secs(5), command)
        .await
        .expect("the command ends soon after the unplug, not at its timeout")
        .unwrap();
    let after_unplug = unplugged_at.elapsed();
    assert!(
        matches!(result, Err(SessionError::Closed)),
        "the command ended with {result:?}"
    );
    assert!(
        after_unplug < Duration::from_secs(2),
        "the command failed {after_unplug:?} after the unplug"
    );
    tokio::time::timeout(Duration::from_secs(2), session.closed())
        .await
        .expect("the session knows its link closed");

    // A request made after the unplug fails at once too, rather than waiting for an answer that
    // cannot come.
    let started = Instant::now();
    let late = tokio::time::timeout(Duration::from_secs(5), session.can_config_get())
        .await
        .expect("a request on a closed session ends at once");
    assert!(matches!(late, Err(SessionError::Closed)), "{late:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let late = tokio::time::timeout(
        Duration::from_secs(5),
        session.cli(
            CorrelationId([4; 16]),
            "version",
            false,
            Duration::from_secs(1),
        ),
    )
    .await
    .expect("a command on a closed session ends at once");
    assert!(matches!(late, Err(SessionError::Closed)), "{late:?}");
    sim.shutdown().await;
}

/// A burst of frames to a dongle with the batch extension, larger than one batch, and over a sealed
/// session: every frame reaches the bus, in order (a batch buffer of a whole packet once made every
/// burst of about 65 frames or more fail to encode, and the data plane counted them all dropped).
#[tokio::test]
async fn a_burst_larger_than_one_batch_reaches_the_bus_whole() {
    for extensions in [dongle_sim::Extensions::ALL, {
        let mut e = dongle_sim::Extensions::ALL;
        e.session = false;
        e
    }] {
        let dir = tempfile::tempdir().unwrap();
        let bus_root = tempfile::tempdir().unwrap();
        let mut sim_config = SimConfig::serial(dir.path().join("flash.json"))
            .with_bus("burst")
            .with_extensions(extensions);
        sim_config.bus_root = Some(bus_root.path().to_path_buf());
        let sim = Simulator::start(sim_config).await.unwrap();
        let mut tap = dongle_sim::BusTap::recorder_at(bus_root.path(), "burst").unwrap();
        assert!(tap.wait_for_peers(1, Duration::from_secs(5)).await);
        let path = sim.serial_path().expect("a serial dongle");
        let session = DongleSession::open(
            transport::serial::open(&path).await.unwrap(),
            config(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        assert!(session.info().has(firmware_proto::caps::CAN_BATCH));
        pair_and_authenticate(&sim, &session).await;
        let burst: Vec<Frame> = (0..500u32)
            .map(|seq| {
                let [a, b, c, d] = seq.to_be_bytes();
                Frame::classic(CanId::standard(0x321).unwrap(), &[a, b, c, d]).unwrap()
            })
            .collect();
        session
            .send_frames(&burst)
            .await
            .expect("the burst is sent");
        for seq in 0..500u32 {
            let f = tokio::time::timeout(Duration::from_secs(5), tap.recv())
                .await
                .unwrap_or_else(|_| panic!("frame {seq} never reached the bus ({extensions:?})"))
                .unwrap();
            assert_eq!(f.data(), seq.to_be_bytes(), "{extensions:?}");
        }
        sim.shutdown().await;
    }
}
