//! Feeds arbitrary bytes, as a dongle on a serial port would send them, through the agent's own path:
//! the byte-stream transport (`transport::stream`: CRC-32 + COBS + 0x00 framing) into a `DongleSession`,
//! whose reader decodes Discovery and REMP packets and routes answers to waiting requests and CAN frames
//! to the frame queue.
//!
//! Requests wait while the bytes arrive (pairing start and CLI with fixed correlation ids, so that seeds
//! and mutations can answer them; CAN config and bus status, matched by type). When the bytes end, the
//! stream closes, and every request must have ended, answered or with `SessionError::Closed`: never
//! hanging, never timing out (the request timeout is an hour), never panicking. The frame counters must
//! agree with the frames delivered.
#![no_main]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bridge_agent::session::{DongleInfo, DongleSession, SessionConfig, SessionError};
use bridge_agent::transport::{LinkStats, stream};
use firmware_proto::caps;
use firmware_proto::ids::{CorrelationId, DeviceId, DongleToken};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

/// The dongle the session talks to; the seeds use the same values.
const DEVICE: DeviceId = DeviceId([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
const PAIRING_CORR: CorrelationId = CorrelationId([0x11; 16]);
const CLI_CORR: CorrelationId = CorrelationId([0x22; 16]);

/// Long enough that no request can time out within one input: a request that has not ended when the
/// stream closes is a hang, and the guard below reports it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the whole input may take before the target calls it a hang.
const GUARD: Duration = Duration::from_secs(20);

thread_local! {
    // One runtime for all inputs: building one per input would dominate the run time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

fn info() -> DongleInfo {
    DongleInfo {
        device_id: DEVICE,
        fw_build: "fuzz".into(),
        udp_port: 0,
        capabilities: caps::CAN_FD | caps::CAN_BATCH | caps::BUS_STATUS | caps::FORGET_TOKEN,
        proto_ver: 1,
        lan_ip: None,
        pairing_mode: false,
        pairing_nonce: None,
    }
}

/// A request ended as it may: answered, or told that the link closed.
fn ended<T>(what: &str, result: Result<T, SessionError>) {
    match result {
        Ok(_) | Err(SessionError::Closed) => {}
        Err(e) => panic!("{what} ended with {e}, not with an answer or Closed"),
    }
}

async fn run(chunk: usize, input: &[u8]) {
    let (near, mut far) = tokio::io::duplex(64 * 1024);
    let link = stream::spawn(near, "fuzz");
    let link_stats = link.stats.clone();
    let config = SessionConfig {
        request_timeout: REQUEST_TIMEOUT,
        frame_queue: 256,
        use_session_auth: false,
    };
    let session = Arc::new(DongleSession::start(link, info(), config).expect("version 1"));
    let mut frames = session.take_frames().expect("the frame queue");
    // Without session authentication this only keeps the token, so token-carrying requests can be sent.
    session
        .authenticate(DongleToken::from_bytes([0x42; 32]))
        .await
        .expect("token authentication is local");

    let s = session.clone();
    let pairing =
        tokio::spawn(async move { ended("PAIRING start", s.pairing_start(PAIRING_CORR).await) });
    let s = session.clone();
    let cli = tokio::spawn(async move {
        ended(
            "CLI",
            s.cli(CLI_CORR, "version", false, Duration::ZERO).await,
        )
    });
    let s = session.clone();
    let typed = tokio::spawn(async move {
        ended("CAN_CONFIG get", s.can_config_get().await);
        ended("BUS_STATUS", s.bus_status().await);
    });
    // Let the requests register and send before the dongle's bytes arrive.
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }

    for piece in input.chunks(chunk) {
        if far.write_all(piece).await.is_err() {
            break;
        }
    }
    // The dongle goes away: the stream ends, the link closes, and the session must notice.
    drop(far);
    session.closed().await;
    assert!(session.is_closed());
    pairing.await.expect("the pairing request does not panic");
    cli.await.expect("the CLI request does not panic");
    typed.await.expect("the typed requests do not panic");

    let mut delivered = 0u64;
    while let Ok(frame) = frames.try_recv() {
        assert!(frame.data().len() <= if frame.is_fd() { 64 } else { 8 });
        delivered += 1;
    }
    let stats = session.stats();
    assert_eq!(
        stats.frames_in.load(Ordering::Relaxed),
        delivered + stats.frames_dropped.load(Ordering::Relaxed)
    );
    assert!(LinkStats::get(&link_stats.bytes_in) <= input.len() as u64);
    assert!(LinkStats::get(&link_stats.bytes_skipped) <= input.len() as u64);
}

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the size of the writes, so that packets split across reads are fuzzed too.
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    RUNTIME.with(|rt| {
        rt.block_on(async {
            tokio::time::timeout(GUARD, run(chunk, input))
                .await
                .expect("the session ended every request once the stream closed");
        })
    });
});
