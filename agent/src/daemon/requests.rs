//! The server's requests, turned into dongle requests: one function per request kind, each answering
//! with the reply the server expects. Nothing here touches the WebSocket; the connection sends what
//! these return.

use std::sync::Arc;
use std::time::Duration;

use control_proto::{
    CanEffective, CommandOutcome, CommandResult, ReplyErrorCode, ReplyOk, ReplyResult, RequestBody,
};
use firmware_proto::caps;
use firmware_proto::ext::ForgetStatus;
use firmware_proto::ids::{CanId, CorrelationId, DeviceId, DongleToken, Pin};
use firmware_proto::remp::{self, CliStatus, ConfigStatus, PairingStatus};
use uuid::Uuid;

use super::Shared;
use super::device::Device;
use super::reply::{error, ok, session_error};
use crate::frame::Frame;
use crate::journal::{Admission, JournalError};
use crate::session::{DongleSession, SessionError};

fn corr(id: Uuid) -> CorrelationId {
    CorrelationId::from_bytes(*id.as_bytes())
}

impl Shared {
    fn session_for(&self, id: &DeviceId) -> Result<Arc<DongleSession>, ReplyResult> {
        self.devices.dongles.session(id).ok_or_else(|| {
            error(
                ReplyErrorCode::UnknownDevice,
                format!("this agent does not see dongle {id} now"),
            )
        })
    }

    /// Answers one request. Commands answer at once and end later through [`Shared::run_command`].
    pub(super) async fn handle_request(self: &Arc<Self>, body: RequestBody) -> ReplyResult {
        // A local endpoint stands in for a dongle but has no pairing, token or console of its own.
        if !matches!(
            body,
            RequestBody::HostCommand { .. } | RequestBody::LatencyProbe { .. }
        ) && let id = body.device_id()
            && let Some(device @ Device::Local { .. }) = self.devices.get(&id)
        {
            return self.local_request(&id, &device, &body).await;
        }
        match body {
            RequestBody::PairingStart { device_id, corr_id } => {
                self.pairing_start(device_id, corr_id).await
            }
            RequestBody::PairingSubmit {
                device_id,
                corr_id,
                pin,
                pairing_nonce,
                token,
            } => {
                self.pairing_submit(device_id, corr_id, pin, &pairing_nonce, token)
                    .await
            }
            RequestBody::Forget { device_id } => self.forget(device_id).await,
            RequestBody::CanConfig {
                device_id,
                settings,
            } => self.can_config(&device_id, settings.to_remp()).await,
            RequestBody::Command {
                command_id,
                device_id,
                line,
                timeout_ms,
                allow_dangerous,
            } => {
                self.accept_command(command_id, device_id, line, timeout_ms, allow_dangerous)
                    .await
            }
            RequestBody::SendFrame {
                device_id,
                can_id,
                extended,
                rtr,
                data,
                fd,
            } => {
                self.send_frame(&device_id, can_id, extended, rtr, &data, fd)
                    .await
            }
            RequestBody::HostCommand {
                run_id,
                device_id,
                command,
            } => self.host_command(run_id, device_id, command).await,
            RequestBody::LatencyProbe {
                run_id,
                device_id,
                group_id,
                side,
                role,
            } => {
                self.latency_probe(run_id, device_id, group_id, side, role)
                    .await
            }
        }
    }

    async fn pairing_start(self: &Arc<Self>, id: DeviceId, corr_id: Uuid) -> ReplyResult {
        let session = match self.session_for(&id) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        match session.pairing_start(corr(corr_id)).await {
            Ok(ack) => match (ack.status, ack.pairing_nonce) {
                (PairingStatus::Ok, Some(nonce)) => {
                    let window = Duration::from_secs(u64::from(ack.seconds));
                    self.pairing_opened(id, window);
                    ok(ReplyOk::PairingStarted {
                        pairing_nonce: hex::encode(nonce),
                        expires_in_ms: window.as_millis() as u64,
                    })
                }
                (PairingStatus::Cooldown, _) => error(
                    ReplyErrorCode::Cooldown,
                    format!("the dongle refuses pairing for {} s more", ack.seconds),
                ),
                (status, _) => error(
                    ReplyErrorCode::Refused,
                    format!("the dongle refused to start pairing ({status:?})"),
                ),
            },
            Err(e) => session_error(e),
        }
    }

    async fn pairing_submit(
        self: &Arc<Self>,
        id: DeviceId,
        corr_id: Uuid,
        pin: Pin,
        nonce: &str,
        token: DongleToken,
    ) -> ReplyResult {
        let session = match self.session_for(&id) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        // The messages below never repeat the PIN or the token.
        let Some(nonce) = hex::decode(nonce)
            .ok()
            .and_then(|n| <[u8; 16]>::try_from(n).ok())
        else {
            return error(
                ReplyErrorCode::Internal,
                "the pairing nonce is not 16 bytes",
            );
        };
        match session
            .pairing_submit(corr(corr_id), pin, nonce, token)
            .await
        {
            Ok(ack) => match ack.status {
                PairingStatus::Ok => {
                    self.pairing_closed(&id);
                    // Kept at once: the server also sends it, but the dongle already uses it now.
                    self.store_token(id, token).await;
                    ok(ReplyOk::Paired)
                }
                PairingStatus::InvalidPin => error(ReplyErrorCode::InvalidPin, "wrong PIN"),
                PairingStatus::Cooldown => error(
                    ReplyErrorCode::Cooldown,
                    format!("too many wrong PINs: the dongle waits {} s", ack.seconds),
                ),
                PairingStatus::Error => error(
                    ReplyErrorCode::NotInPairingMode,
                    "the dongle has no pairing window open (it ended, or the nonce is stale)",
                ),
            },
            Err(e) => session_error(e),
        }
    }

    async fn forget(self: &Arc<Self>, id: DeviceId) -> ReplyResult {
        let session = self.devices.dongles.session(&id);
        // The dongle forgets first, while the agent still holds the token that authenticates the
        // request; the vault lets go either way, since the server no longer counts the dongle as ours.
        let outcome = match &session {
            Some(session) if session.info().has(caps::FORGET_TOKEN) => {
                match session.forget().await {
                    Ok(f) if f.status == ForgetStatus::Ok => Ok(()),
                    Ok(f) => Err(error(
                        ReplyErrorCode::Refused,
                        format!("the dongle did not forget its token ({:?})", f.status),
                    )),
                    Err(e) => Err(session_error(e)),
                }
            }
            _ => Ok(()),
        };
        if let Some(session) = &session {
            session.deauthenticate();
        }
        self.ready.lock().unwrap().remove(&id);
        if let Err(e) = self.vault.lock().unwrap().remove(&id) {
            tracing::warn!(device_id = %id, error = %e, "could not drop the token from the vault");
        }
        self.devices_changed();
        match outcome {
            Ok(()) => ok(ReplyOk::Forgotten),
            Err(reply) => reply,
        }
    }

    async fn can_config(
        self: &Arc<Self>,
        device_id: &DeviceId,
        config: remp::CanConfig,
    ) -> ReplyResult {
        let session = match self.session_for(device_id) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        match session.can_config_set(config).await {
            Ok(answer) if answer.status == ConfigStatus::Ok => ok(ReplyOk::CanConfigApplied {
                effective: CanEffective::from_remp(&answer),
            }),
            Ok(answer) => error(
                ReplyErrorCode::Refused,
                match answer.status {
                    ConfigStatus::Invalid => {
                        "the dongle refused the configuration as out of range; nothing changed"
                    }
                    _ => "the dongle's CAN controller refused the configuration",
                },
            ),
            Err(e) => session_error(e),
        }
    }

    async fn send_frame(
        self: &Arc<Self>,
        device_id: &DeviceId,
        can_id: u32,
        extended: bool,
        rtr: bool,
        data: &str,
        fd: bool,
    ) -> ReplyResult {
        let session = match self.session_for(device_id) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        match build_frame(can_id, extended, rtr, data, fd) {
            Ok(frame) => Device::Dongle(session).send_frame(frame).await,
            Err(reply) => reply,
        }
    }

    /// Journals a command and starts it, or recognises one already known; answers at once.
    async fn accept_command(
        self: &Arc<Self>,
        command_id: Uuid,
        device_id: DeviceId,
        line: String,
        timeout_ms: u64,
        allow_dangerous: bool,
    ) -> ReplyResult {
        // The journal syncs its file to disk: on a blocking thread, so that a slow disk holds up
        // neither the data plane nor the other requests on this runtime's workers.
        let admission = {
            let shared = self.clone();
            tokio::task::spawn_blocking(move || shared.journal.admit(command_id, device_id))
                .await
                .unwrap_or_else(|e| Err(JournalError::Interrupted(e.to_string())))
        };
        match admission {
            Ok(Admission::Run) => {
                let shared = self.clone();
                self.spawn(async move {
                    let result = shared
                        .run_command(command_id, device_id, &line, timeout_ms, allow_dangerous)
                        .await;
                    shared.command_finished(result).await;
                });
                ok(ReplyOk::CommandAccepted)
            }
            Ok(Admission::AlreadyRunning | Admission::AlreadyAcknowledged) => {
                ok(ReplyOk::CommandAccepted)
            }
            Ok(Admission::AlreadyFinished(result)) => {
                // The server asks again, so it may have missed the result: send it once more.
                self.send_result(result);
                ok(ReplyOk::CommandAccepted)
            }
            Err(e) => error(ReplyErrorCode::Internal, e.to_string()),
        }
    }

    async fn run_command(
        &self,
        command_id: Uuid,
        device_id: DeviceId,
        line: &str,
        timeout_ms: u64,
        allow_dangerous: bool,
    ) -> CommandResult {
        let failed = |message: String| CommandResult {
            command_id,
            device_id,
            outcome: CommandOutcome::Error,
            exit_code: -1,
            output: String::new(),
            truncated: false,
            message: Some(message),
        };
        let session = match self.session_for(&device_id) {
            Ok(s) => s,
            Err(_) => return failed(format!("this agent does not see dongle {device_id} now")),
        };
        let wait = Duration::from_millis(timeout_ms.min(600_000));
        match session
            .cli(corr(command_id), line, allow_dangerous, wait)
            .await
        {
            Ok(outcome) => CommandResult {
                command_id,
                device_id,
                outcome: match outcome.status {
                    CliStatus::Ok => CommandOutcome::Done,
                    CliStatus::Denied => CommandOutcome::Denied,
                    CliStatus::Error => CommandOutcome::Error,
                    CliStatus::Timeout => CommandOutcome::Timeout,
                },
                exit_code: i32::from(outcome.exit_code),
                output: outcome.output,
                truncated: outcome.truncated,
                message: None,
            },
            Err(SessionError::Timeout { after, .. }) => CommandResult {
                outcome: CommandOutcome::Timeout,
                message: Some(format!("the dongle did not answer within {after:?}")),
                ..failed(String::new())
            },
            Err(e) => failed(e.to_string()),
        }
    }
}

/// The frame a `send_frame` request asks for, or the reply that says why there is none.
pub(super) fn build_frame(
    can_id: u32,
    extended: bool,
    rtr: bool,
    data: &str,
    fd: bool,
) -> Result<Frame, ReplyResult> {
    if rtr {
        return Err(error(
            ReplyErrorCode::Unsupported,
            "remote frames cannot be sent through REMP",
        ));
    }
    let Ok(id) = CanId::new(can_id, extended) else {
        return Err(error(
            ReplyErrorCode::Refused,
            "the CAN id does not fit its format",
        ));
    };
    let Ok(data) = hex::decode(data) else {
        return Err(error(ReplyErrorCode::Refused, "the data is not hex"));
    };
    let frame = if fd {
        Frame::with_flags(id, firmware_proto::ext::batch::flags::FD, &data)
    } else {
        Frame::classic(id, &data)
    };
    frame.ok_or_else(|| error(ReplyErrorCode::Refused, "too many data bytes for the frame"))
}
