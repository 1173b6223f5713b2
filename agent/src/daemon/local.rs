//! The server's requests for local CAN endpoints, which stand in for dongles but have neither a pairing
//! window, nor a token, nor a command console. A CAN configuration goes to the endpoint where its kind
//! can apply one, and is refused with [`ReplyErrorCode::NotSettable`] and the way to do it where it
//! cannot (SocketCAN takes its timing from `ip link`); a frame sent by hand goes onto the endpoint.

use std::str::FromStr;

use control_proto::{CanEffective, ReplyErrorCode, ReplyOk, ReplyResult, RequestBody};
use firmware_proto::ids::DeviceId;

use super::Shared;
use super::requests::{build_frame, error, ok};
use crate::endpoints::{CanEndpoint, EndpointConfig, EndpointError, EndpointMode};

impl Shared {
    /// Answers `body` when it names one of the agent's local endpoints; `None` when it names anything
    /// else (a dongle), which the dongle path then answers.
    pub(super) async fn local_request(&self, body: &RequestBody) -> Option<ReplyResult> {
        // Host commands are about the workstation: the same for an endpoint as for a dongle.
        if matches!(body, RequestBody::HostCommand { .. }) {
            return None;
        }
        let device_id = DeviceId::from_str(device_id_of(body)).ok()?;
        if !self.endpoints.contains(&device_id) {
            return None;
        }
        let endpoint = self.endpoints.endpoint(&device_id);
        Some(match body {
            RequestBody::PairingStart { .. } | RequestBody::PairingSubmit { .. } => error(
                ReplyErrorCode::Refused,
                format!(
                    "{device_id} is a local CAN endpoint of this agent: it belongs to the agent's user without pairing"
                ),
            ),
            // Nothing to forget: a local endpoint holds no token.
            RequestBody::Forget { .. } => ok(ReplyOk::Forgotten),
            RequestBody::Command { .. } => error(
                ReplyErrorCode::Refused,
                "a local CAN endpoint has no command console; commands run on dongles",
            ),
            RequestBody::CanConfig {
                bitrate,
                sample_point_permille,
                mode,
                use_raw,
                ..
            } => {
                let Some(mode) = EndpointMode::parse(mode) else {
                    return Some(error(
                        ReplyErrorCode::NotSettable,
                        format!("a local CAN endpoint has no {mode} mode"),
                    ));
                };
                let config = EndpointConfig {
                    bitrate: *bitrate,
                    data_bitrate: None,
                    mode,
                    sample_point_permille: (*sample_point_permille != 0)
                        .then_some(*sample_point_permille),
                    raw_timing: *use_raw,
                };
                self.configure_local(&device_id, &config).await
            }
            RequestBody::SendFrame {
                can_id,
                extended,
                rtr,
                data,
                fd,
                ..
            } => {
                let frame = match build_frame(*can_id, *extended, *rtr, data, *fd) {
                    Ok(frame) => frame,
                    Err(reply) => return Some(reply),
                };
                match endpoint {
                    Some(endpoint) => match endpoint.send_frames(&[frame]).await {
                        Ok(()) => ok(ReplyOk::FrameSent),
                        Err(e) => endpoint_error(&endpoint, e, ReplyErrorCode::Refused),
                    },
                    None => not_open(&device_id),
                }
            }
            // Answered by the workstation's own path (returned above).
            RequestBody::HostCommand { .. } => return None,
        })
    }

    async fn configure_local(&self, device_id: &DeviceId, config: &EndpointConfig) -> ReplyResult {
        let Some(endpoint) = self.endpoints.endpoint(device_id) else {
            return not_open(device_id);
        };
        match self.endpoints.configure(device_id, config).await {
            Ok(effective) => {
                for note in &effective.notes {
                    tracing::info!(%device_id, note = %note, "part of a CAN configuration not applied");
                }
                ok(ReplyOk::CanConfigApplied {
                    effective: CanEffective {
                        bitrate: effective.bitrate,
                        // 0: the adapter uses a sample point of its own, which the agent cannot read.
                        sample_point_permille: effective.sample_point_permille.unwrap_or(0),
                        prescaler: 0,
                        sjw: 0,
                        tseg1: 0,
                        tseg2: 0,
                        mode: effective.mode.name().to_string(),
                        use_raw: false,
                        auto_retx: false,
                        tx_pause: false,
                        protocol_exc: false,
                    },
                })
            }
            Err(e) => endpoint_error(&endpoint, e, ReplyErrorCode::NotSettable),
        }
    }
}

fn device_id_of(body: &RequestBody) -> &str {
    match body {
        RequestBody::PairingStart { device_id, .. }
        | RequestBody::PairingSubmit { device_id, .. }
        | RequestBody::Forget { device_id }
        | RequestBody::CanConfig { device_id, .. }
        | RequestBody::Command { device_id, .. }
        | RequestBody::HostCommand { device_id, .. }
        | RequestBody::SendFrame { device_id, .. } => device_id,
    }
}

fn not_open(device_id: &DeviceId) -> ReplyResult {
    error(
        ReplyErrorCode::UnknownDevice,
        format!("local endpoint {device_id} is not open now (unplugged, or it failed to open)"),
    )
}

/// An endpoint's error as the reply's: what the endpoint cannot do at all is `cannot` (`not_settable`
/// for a configuration, a refusal for a frame), a closed endpoint is one the agent no longer reaches,
/// and anything else a refusal, always with the endpoint's own words.
fn endpoint_error(endpoint: &CanEndpoint, e: EndpointError, cannot: ReplyErrorCode) -> ReplyResult {
    let code = match &e {
        EndpointError::TimingNotSettable { .. } | EndpointError::Unsupported { .. } => cannot,
        EndpointError::Closed { .. } => ReplyErrorCode::UnknownDevice,
        EndpointError::Timeout { .. } => ReplyErrorCode::DongleTimeout,
        _ => ReplyErrorCode::Refused,
    };
    tracing::debug!(endpoint = %endpoint.identity(), error = %e, "a request to a local endpoint failed");
    error(code, e.to_string())
}
