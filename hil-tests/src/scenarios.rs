//! The scenarios, written once over [`Target`]. Each starts from a factory-reset dongle and says, in
//! its assertions, what the firmware must do.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bridge_agent::session::{DongleSession, Frame, SessionConfig, SessionError};
use firmware_proto::caps;
use firmware_proto::ids::{CanId, CorrelationId, DongleToken, Pin};
use firmware_proto::remp::{
    CanConfig, CanMode, CliStatus, ConfigAction, ConfigStatus, PairingStatus,
};
use rand::RngExt;

use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use crate::report::{Outcome, Report};
use crate::target::Target;

/// The longest one scenario may take, a window expiry on hardware (120 s) included.
pub const SCENARIO_LIMIT: Duration = Duration::from_secs(180);

/// The names of the scenarios, in the order they run.
pub const SCENARIOS: [&str; 13] = [
    "announce_and_version",
    "pairing_with_the_right_pin",
    "five_wrong_pins_start_the_cooldown",
    "the_pairing_window_expires",
    "a_wrong_token_is_refused",
    "can_config_get_set_and_invalid",
    "loopback_frames_at_rate_nothing_lost",
    "commands_normal_truncated_denied_timeout",
    "unplug_and_replug",
    "factory_reset_is_detectable",
    "session_mac_replaces_the_token",
    "forget_token_unpairs",
    "bus_status_is_reported",
];

/// Runs every scenario against `target`, recording each outcome in `report`.
pub async fn run_all<T: Target>(target: &mut T, report: &mut Report) {
    macro_rules! run {
        ($scenario:ident) => {{
            if let Some(reason) = target.cannot_serve(stringify!($scenario)) {
                report.skip(target.name(), stringify!($scenario), reason);
            } else {
                run!(@now $scenario);
            }
        }};
        (@now $scenario:ident) => {{
            let started = std::time::Instant::now();
            let result = AssertUnwindSafe(tokio::time::timeout(SCENARIO_LIMIT, $scenario(target)))
                .catch_unwind()
                .await;
            let outcome = match result {
                Ok(Ok(Ok(()))) => Outcome::Passed,
                Ok(Ok(Err(e))) => Outcome::Failed {
                    message: format!("{e:#}"),
                    log: target.log(),
                },
                Ok(Err(_)) => Outcome::Failed {
                    message: format!("did not finish within {SCENARIO_LIMIT:?}"),
                    log: target.log(),
                },
                Err(_) => Outcome::Failed {
                    message: "panicked".into(),
                    log: target.log(),
                },
            };
            report.record(
                target.name(),
                stringify!($scenario),
                started.elapsed(),
                outcome,
            );
        }};
        ($scenario:ident if $cap:expr) => {
            if target.expected_capabilities() & $cap == $cap {
                run!($scenario);
            } else {
                report.skip(
                    target.name(),
                    stringify!($scenario),
                    "the target does not announce the extension this scenario needs",
                );
            }
        };
    }
    run!(announce_and_version);
    run!(pairing_with_the_right_pin);
    run!(five_wrong_pins_start_the_cooldown);
    run!(the_pairing_window_expires);
    run!(a_wrong_token_is_refused);
    run!(can_config_get_set_and_invalid);
    run!(loopback_frames_at_rate_nothing_lost);
    run!(commands_normal_truncated_denied_timeout);
    run!(unplug_and_replug);
    run!(factory_reset_is_detectable);
    run!(session_mac_replaces_the_token if caps::SESSION_AUTH);
    run!(forget_token_unpairs if caps::FORGET_TOKEN);
    run!(bus_status_is_reported if caps::BUS_STATUS);
}

fn config() -> SessionConfig {
    SessionConfig {
        request_timeout: Duration::from_millis(1500),
        ..SessionConfig::default()
    }
}

fn corr() -> CorrelationId {
    CorrelationId(rand::rng().random())
}

fn new_token() -> DongleToken {
    DongleToken::from_bytes(rand::rng().random())
}

/// A fresh, unpaired dongle and a session to it.
async fn fresh<T: Target>(target: &mut T) -> anyhow::Result<DongleSession> {
    target.factory_reset().await?;
    target.connect(config()).await
}

/// Pairs the dongle with a new token and returns it.
async fn pair<T: Target>(target: &mut T, session: &DongleSession) -> anyhow::Result<DongleToken> {
    let ack = session.pairing_start(corr()).await?;
    ensure!(
        ack.status == PairingStatus::Ok,
        "pairing start answered {:?}",
        ack.status
    );
    let nonce = ack
        .pairing_nonce
        .context("a successful start ack carries the pairing nonce")?;
    let pin = target.next_pin(Duration::from_secs(2)).await?;
    let token = new_token();
    let ack = session.pairing_submit(corr(), pin, nonce, token).await?;
    ensure!(
        ack.status == PairingStatus::Ok,
        "the right PIN answered {:?}",
        ack.status
    );
    Ok(token)
}

/// A PIN that differs from `pin` in its last digit.
fn wrong(pin: &Pin) -> Pin {
    let mut digits: Vec<u8> = pin.as_str().bytes().collect();
    digits[5] = if digits[5] == b'9' {
        b'0'
    } else {
        digits[5] + 1
    };
    Pin::parse(std::str::from_utf8(&digits).unwrap()).unwrap()
}

async fn announce_and_version<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let info = session.info();
    ensure!(info.proto_ver == 1, "REMP version {}", info.proto_ver);
    ensure!(
        info.device_id.as_bytes() != &[0; 8],
        "an all-zero device id"
    );
    ensure!(
        !info.fw_build.is_empty(),
        "no firmware build in the ANNOUNCE"
    );
    let wanted = target.expected_capabilities();
    ensure!(
        info.capabilities & caps::ALL_EXTENSIONS == wanted,
        "announced extensions 0x{:08x}, expected 0x{wanted:08x}",
        info.capabilities & caps::ALL_EXTENSIONS
    );
    ensure!(!info.pairing_mode, "a fresh dongle announces pairing mode");
    Ok(())
}

async fn pairing_with_the_right_pin<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let start = session.pairing_start(corr()).await?;
    ensure!(start.status == PairingStatus::Ok);
    let window = target.pairing_window().as_secs_f64().ceil() as u64;
    ensure!(
        u64::from(start.seconds) <= window && start.seconds > 0,
        "the start ack reports a {} s window, expected up to {window} s",
        start.seconds
    );
    let pin = target.next_pin(Duration::from_secs(2)).await?;
    let token = new_token();
    let ack = session
        .pairing_submit(corr(), pin, start.pairing_nonce.context("no nonce")?, token)
        .await?;
    ensure!(
        ack.status == PairingStatus::Ok,
        "submit answered {:?}",
        ack.status
    );

    // The dongle now holds the token: an authenticated request works.
    session.authenticate(token).await?;
    let config = session.can_config_get().await?;
    ensure!(config.action == ConfigAction::Response);

    // A paired dongle refuses a new pairing until it forgets its token.
    let again = session.pairing_start(corr()).await?;
    ensure!(
        again.status != PairingStatus::Ok,
        "a claimed dongle opened a new pairing window"
    );
    Ok(())
}

async fn five_wrong_pins_start_the_cooldown<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let start = session.pairing_start(corr()).await?;
    let nonce = start.pairing_nonce.context("no nonce")?;
    let pin = target.next_pin(Duration::from_secs(2)).await?;
    let bad = wrong(&pin);
    for attempt in 1..=4 {
        let ack = session
            .pairing_submit(corr(), bad, nonce, new_token())
            .await?;
        ensure!(
            ack.status == PairingStatus::InvalidPin,
            "wrong PIN {attempt} answered {:?}",
            ack.status
        );
    }
    let fifth = session
        .pairing_submit(corr(), bad, nonce, new_token())
        .await?;
    ensure!(
        matches!(
            fifth.status,
            PairingStatus::InvalidPin | PairingStatus::Cooldown
        ),
        "the fifth wrong PIN answered {:?}",
        fifth.status
    );
    // Now even the right PIN is refused, with the cool-down left.
    let right = session
        .pairing_submit(corr(), pin, nonce, new_token())
        .await?;
    ensure!(
        right.status == PairingStatus::Cooldown,
        "after five wrong PINs: {:?}",
        right.status
    );
    ensure!(right.seconds > 0, "a cool-down of 0 s");
    Ok(())
}

async fn the_pairing_window_expires<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let start = session.pairing_start(corr()).await?;
    let nonce = start.pairing_nonce.context("no nonce")?;
    let pin = target.next_pin(Duration::from_secs(2)).await?;
    tokio::time::sleep(target.pairing_window() + Duration::from_millis(300)).await;
    let late = session
        .pairing_submit(corr(), pin, nonce, new_token())
        .await?;
    ensure!(
        late.status != PairingStatus::Ok,
        "the right PIN was accepted after the window closed"
    );
    Ok(())
}

async fn a_wrong_token_is_refused<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    drop(session);

    let session = target.connect(config()).await?;
    match session.authenticate(new_token()).await {
        // Session authentication refuses the wrong token at once.
        Err(SessionError::AuthRefused(_)) => {}
        Err(e) => bail!("authenticating with a wrong token failed oddly: {e}"),
        // Plain REMP v1: the token travels in each packet, and the dongle refuses the packet.
        Ok(()) => match session.can_config_get().await {
            Err(SessionError::Timeout { .. }) => {}
            Err(e) => bail!("a wrong token failed oddly: {e}"),
            Ok(c) => bail!("a wrong token was served: {c:?}"),
        },
    }
    drop(session);
    let session = target.connect(config()).await?;
    session.authenticate(token).await?;
    session
        .can_config_get()
        .await
        .context("the right token after a wrong one")?;
    Ok(())
}

fn classic_500k() -> CanConfig {
    CanConfig {
        action: ConfigAction::Set,
        status: ConfigStatus::Ok,
        bitrate: 500_000,
        sample_point_permille: 875,
        prescaler: 0,
        sjw: 0,
        tseg1: 0,
        tseg2: 0,
        mode: CanMode::Normal,
        flags: CanConfig::FLAG_AUTO_RETX,
    }
}

async fn can_config_get_set_and_invalid<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;

    let before = session.can_config_get().await?;
    ensure!(before.status == ConfigStatus::Ok);

    let applied = session.can_config_set(classic_500k()).await?;
    ensure!(
        applied.status == ConfigStatus::Ok,
        "500 kbit/s answered {:?}",
        applied.status
    );
    ensure!(
        applied.bitrate == 500_000,
        "effective bitrate {}",
        applied.bitrate
    );
    let sp = i32::from(applied.sample_point_permille);
    ensure!((sp - 875).abs() <= 25, "effective sample point {sp}");
    ensure!(
        applied.prescaler > 0 && applied.tseg1 > 0 && applied.tseg2 > 0 && applied.sjw > 0,
        "the answer carries no effective timing: {applied:?}"
    );

    // sjw above tseg2 is outside the bxCAN ranges.
    let invalid = CanConfig {
        flags: CanConfig::FLAG_USE_RAW,
        prescaler: 4,
        tseg1: 13,
        tseg2: 2,
        sjw: 4,
        ..classic_500k()
    };
    let refused = session.can_config_set(invalid).await?;
    ensure!(
        refused.status == ConfigStatus::Invalid,
        "sjw > tseg2 answered {:?}",
        refused.status
    );

    let after = session.can_config_get().await?;
    ensure!(
        after.bitrate == 500_000,
        "an invalid request changed the config: {after:?}"
    );
    Ok(())
}

async fn loopback_frames_at_rate_nothing_lost<T: Target>(target: &mut T) -> anyhow::Result<()> {
    const FRAMES: u32 = 1000;
    const RATE: u32 = 2000;
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;
    let config = session
        .can_config_set(CanConfig {
            mode: CanMode::Loopback,
            ..classic_500k()
        })
        .await?;
    ensure!(config.status == ConfigStatus::Ok && config.mode == CanMode::Loopback);
    let mut frames = session.take_frames().context("the frame queue")?;

    let id = CanId::standard(0x123)?;
    let mut interval = tokio::time::interval(Duration::from_secs(1) / (RATE / 50));
    for chunk in 0..FRAMES / 50 {
        interval.tick().await;
        let batch: Vec<Frame> = (chunk * 50..chunk * 50 + 50)
            .map(|n| Frame::classic(id, &n.to_be_bytes()).expect("4 bytes"))
            .collect();
        session.send_frames(&batch).await?;
    }
    for expected in 0..FRAMES {
        let frame = tokio::time::timeout(Duration::from_secs(2), frames.recv())
            .await
            .with_context(|| format!("frame {expected} of {FRAMES} never came back"))?
            .context("the session closed")?;
        ensure!(
            frame.loopback,
            "frame {expected} is not marked as a loopback echo"
        );
        let n = u32::from_be_bytes(frame.data().try_into().context("4 data bytes")?);
        ensure!(n == expected, "frame {n} arrived where {expected} was due");
    }
    let dropped = session
        .stats()
        .frames_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(dropped == 0, "{dropped} frames dropped");
    Ok(())
}

async fn commands_normal_truncated_denied_timeout<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;
    let wait = Duration::from_secs(2);

    let version = session.cli(corr(), "version", false, wait).await?;
    ensure!(
        version.status == CliStatus::Ok && !version.output.is_empty(),
        "version: {version:?}"
    );
    ensure!(!version.truncated);

    // Longer than any dongle's output limit (the simulator's is 512 bytes), shorter than a packet.
    let long = "x".repeat(1000);
    let echo = session
        .cli(corr(), &format!("echo {long}"), false, wait)
        .await?;
    ensure!(echo.status == CliStatus::Ok, "echo: {:?}", echo.status);
    ensure!(
        echo.truncated,
        "1000 bytes of output were not flagged truncated"
    );
    ensure!(echo.output.len() < long.len());

    let denied = session.cli(corr(), "rm -rf /", false, wait).await?;
    ensure!(
        denied.status == CliStatus::Denied,
        "an unknown command answered {:?}",
        denied.status
    );

    match session.cli(corr(), "sleep 60000", false, wait).await {
        Ok(outcome) => ensure!(outcome.status == CliStatus::Timeout, "sleep: {outcome:?}"),
        Err(SessionError::Timeout { .. }) => {}
        Err(e) => bail!("sleep failed oddly: {e}"),
    }
    Ok(())
}

async fn unplug_and_replug<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let device_id = session.device_id();
    target.unplug().await?;
    // Over serial the link closes; over UDP the dongle goes silent. Either way a request fails.
    let result = tokio::time::timeout(Duration::from_secs(3), session.pairing_start(corr())).await;
    ensure!(
        !matches!(result, Ok(Ok(_))),
        "the dongle answered while unplugged"
    );
    drop(session);
    target.replug().await?;
    let session = target.connect(config()).await.context("after replug")?;
    ensure!(
        session.device_id() == device_id,
        "another device id after replug"
    );
    Ok(())
}

async fn factory_reset_is_detectable<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    drop(session);
    target.factory_reset().await?;
    let session = target.connect(config()).await?;
    // The reset dongle no longer honours the token it was given: the agent reports that, and the
    // server marks the dongle RESET_DETECTED.
    let refused = match session.authenticate(token).await {
        Err(SessionError::AuthRefused(_)) => true,
        Err(e) => bail!("authenticating after a reset failed oddly: {e}"),
        Ok(()) => session.can_config_get().await.is_err(),
    };
    ensure!(
        refused,
        "a factory-reset dongle still accepts its old token"
    );
    // And it can be paired again.
    pair(target, &session).await?;
    Ok(())
}

async fn session_mac_replaces_the_token<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;
    let config = session.can_config_get().await?;
    ensure!(config.status == ConfigStatus::Ok);
    let out = session
        .cli(corr(), "version", false, Duration::from_secs(2))
        .await?;
    ensure!(out.status == CliStatus::Ok);
    Ok(())
}

async fn forget_token_unpairs<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;
    let ack = session.forget().await?;
    ensure!(
        ack.status == firmware_proto::ext::ForgetStatus::Ok,
        "forget answered {:?}",
        ack.status
    );
    drop(session);
    let session = target.connect(config()).await?;
    let start = session.pairing_start(corr()).await?;
    ensure!(
        start.status == PairingStatus::Ok,
        "a dongle that forgot its token refuses pairing"
    );
    Ok(())
}

async fn bus_status_is_reported<T: Target>(target: &mut T) -> anyhow::Result<()> {
    let session = fresh(target).await?;
    let token = pair(target, &session).await?;
    session.authenticate(token).await?;
    let status = session.bus_status().await?;
    ensure!(
        status.state == firmware_proto::ext::BusState::ErrorActive,
        "an idle bus reports {:?}",
        status.state
    );
    Ok(())
}
