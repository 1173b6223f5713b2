//! The server's requests for local CAN endpoints, which stand in for dongles but have neither a pairing
//! window, nor a token, nor a command console. A CAN configuration goes to the endpoint where its kind
//! can apply one, and is refused with [`ReplyErrorCode::NotSettable`] and the way to do it where it
//! cannot (SocketCAN takes its timing from `ip link`); a frame sent by hand goes onto the endpoint.

use control_proto::{CanEffective, CanSettings, ReplyErrorCode, ReplyOk, ReplyResult, RequestBody};
use firmware_proto::ids::DeviceId;

use super::Shared;
use super::device::{Device, endpoint_error, not_open};
use super::reply::{error, ok};
use super::requests::build_frame;

impl Shared {
    /// Answers `body` for `device`, the local endpoint `device_id` (open or not). Host commands and
    /// latency probes never come here: they are about the workstation or a group side, the same for an
    /// endpoint as for a dongle.
    pub(super) async fn local_request(
        &self,
        device_id: &DeviceId,
        device: &Device,
        body: &RequestBody,
    ) -> ReplyResult {
        match body {
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
            RequestBody::CanConfig { settings, .. } => {
                self.configure_local(device_id, settings).await
            }
            RequestBody::SendFrame {
                can_id,
                extended,
                rtr,
                data,
                fd,
                ..
            } => match build_frame(*can_id, *extended, *rtr, data, *fd) {
                Ok(frame) => device.send_frame(frame).await,
                Err(reply) => reply,
            },
            RequestBody::HostCommand { .. } | RequestBody::LatencyProbe { .. } => error(
                ReplyErrorCode::Internal,
                "a request about the workstation or a group reached the local endpoints' path",
            ),
        }
    }

    async fn configure_local(&self, device_id: &DeviceId, config: &CanSettings) -> ReplyResult {
        let Some(endpoint) = self.devices.endpoints.endpoint(device_id) else {
            return not_open(device_id);
        };
        match self.devices.endpoints.configure(device_id, config).await {
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
                        mode: effective.mode,
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
