//! The daemon's one view of a CAN device it serves, whether a dongle (through its session) or one of the
//! agent's local endpoints: its frames in, frames from the server onto its bus, and a frame sent by
//! hand. What only a dongle has (pairing, its token, its command console) stays with the session, and
//! what only an endpoint has (a configuration in the agent's terms) with the endpoint set; [`Devices`]
//! holds both kinds, so the daemon asks one place for a device by its id.

use std::sync::Arc;

use control_proto::{ReplyErrorCode, ReplyOk, ReplyResult};
use firmware_proto::ids::DeviceId;
use tokio::sync::mpsc;

use super::reply::{error, ok, session_error};
use crate::dongles::DongleManager;
use crate::endpoints::{CanEndpoint, EndpointError, EndpointSet};
use crate::frame::Frame;
use crate::session::{DongleSession, SessionError};

/// The registry of the devices the daemon serves: the dongles it finds, and its local endpoints.
pub(super) struct Devices {
    pub(super) dongles: DongleManager,
    pub(super) endpoints: EndpointSet,
}

impl Devices {
    /// The device `id` names: one of this agent's local endpoints (open or not), else a dongle whose
    /// session is open now.
    pub(super) fn get(&self, id: &DeviceId) -> Option<Device> {
        // One look at the endpoints: this runs for every batch of frames from the server.
        match self.endpoints.lookup(id) {
            Some(endpoint) => Some(Device::Local {
                device_id: *id,
                endpoint,
            }),
            None => self.dongles.session(id).map(Device::Dongle),
        }
    }
}

/// A CAN device the daemon serves.
pub(super) enum Device {
    Dongle(Arc<DongleSession>),
    /// A local endpoint of the agent; `endpoint` is `None` while it is not open (unplugged, or it
    /// failed to open).
    Local {
        device_id: DeviceId,
        endpoint: Option<Arc<CanEndpoint>>,
    },
}

/// What became of frames handed to a device, in order: the first `delivered` are on its link, and
/// `rest` says what became of the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Handed {
    pub(super) delivered: usize,
    pub(super) rest: Rest,
}

/// The frames after the delivered ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rest {
    /// There are none.
    None,
    /// They can never go (too large, CAN FD on a classic bus): sending them again cannot help, so they
    /// are dropped and counted.
    Refused,
    /// They wait until the device takes frames again (its link closed, or its token went).
    Stalled,
}

impl Handed {
    pub(super) fn new(delivered: usize, rest: Rest) -> Self {
        Self { delivered, rest }
    }
}

impl Device {
    /// The queue of the frames the device receives from its bus, handed out once per session or
    /// opening; `None` when it was taken already, or the endpoint is not open.
    pub(super) fn take_frames(&self) -> Option<mpsc::Receiver<Frame>> {
        match self {
            Device::Dongle(session) => session.take_frames(),
            Device::Local { endpoint, .. } => endpoint.as_ref()?.take_frames(),
        }
    }

    /// Puts frames from the server onto the device's bus, in order, and says how far that went.
    /// The caller checks first that the device may take them ([`super::Shared::can_deliver`]).
    pub(super) async fn send_frames(&self, frames: &[Frame]) -> Handed {
        match self {
            Device::Dongle(session) => match session.send_frames_counting(frames).await {
                (n, Ok(())) => {
                    hops::mark_all(hops::Hop::ReceiverSent, frames.iter().map(Frame::data));
                    Handed::new(n, Rest::None)
                }
                (n, Err(SessionError::Encode(_) | SessionError::Unsupported(_))) => {
                    Handed::new(n, Rest::Refused)
                }
                (n, Err(_)) => Handed::new(n, Rest::Stalled),
            },
            Device::Local {
                endpoint: Some(endpoint),
                ..
            } => match endpoint.send_frames(frames).await {
                Ok(()) => Handed::new(frames.len(), Rest::None),
                // The endpoint closed: it may open again.
                Err(EndpointError::Closed { .. }) => Handed::new(0, Rest::Stalled),
                // A frame the endpoint can never carry (each is checked before any is sent).
                Err(_) => Handed::new(0, Rest::Refused),
            },
            Device::Local { endpoint: None, .. } => Handed::new(0, Rest::Stalled),
        }
    }

    /// Sends one frame by hand (the server's `send_frame`) and answers as the reply.
    pub(super) async fn send_frame(&self, frame: Frame) -> ReplyResult {
        match self {
            Device::Dongle(session) => match session.send_frames(&[frame]).await {
                Ok(()) => ok(ReplyOk::FrameSent),
                Err(e) => session_error(e),
            },
            Device::Local {
                endpoint: Some(endpoint),
                ..
            } => match endpoint.send_frames(&[frame]).await {
                Ok(()) => ok(ReplyOk::FrameSent),
                Err(e) => endpoint_error(endpoint, e, ReplyErrorCode::Refused),
            },
            Device::Local {
                device_id,
                endpoint: None,
            } => not_open(device_id),
        }
    }
}

/// The reply for a local endpoint that is configured but not open.
pub(super) fn not_open(device_id: &DeviceId) -> ReplyResult {
    error(
        ReplyErrorCode::UnknownDevice,
        format!("local endpoint {device_id} is not open now (unplugged, or it failed to open)"),
    )
}

/// An endpoint's error as the reply's: what the endpoint cannot do at all is `cannot` (`not_settable`
/// for a configuration, a refusal for a frame), a closed endpoint is one the agent no longer reaches,
/// and anything else a refusal, always with the endpoint's own words.
pub(super) fn endpoint_error(
    endpoint: &CanEndpoint,
    e: EndpointError,
    cannot: ReplyErrorCode,
) -> ReplyResult {
    let code = match &e {
        EndpointError::TimingNotSettable { .. } | EndpointError::Unsupported { .. } => cannot,
        EndpointError::Closed { .. } => ReplyErrorCode::UnknownDevice,
        EndpointError::Timeout { .. } => ReplyErrorCode::DongleTimeout,
        _ => ReplyErrorCode::Refused,
    };
    tracing::debug!(endpoint = %endpoint.identity(), error = %e, "a request to a local endpoint failed");
    error(code, e.to_string())
}
