//! Sending one CAN frame by hand (SPEC 3.8b): the owner injects a frame (an OBD-II request, say)
//! through the agent serving the dongle.
//!
//! The frame is checked before anything is sent: the id fits its format (11 or 29 bits), the data is
//! even-length hex of at most 8 bytes, or, for an FD frame on a dongle that announces CAN FD, one of the
//! FD data lengths up to 64. Sends are rate-limited per dongle, whoever sends, since they all land on the
//! same bus.

use control_proto::{ReplyOk, RequestBody};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::audit::{self, Entry, Target};
use crate::auth::Caller;
use crate::client::ClientInfo;
use crate::console::{self, ConsoleEvent, FrameView, StreamKey};
use crate::dongles;
use crate::dongles::DongleError;
use crate::dongles::Services;
use crate::error_code::ErrorCode;
use crate::rate_limit::{self, Scope};

/// The largest standard (11-bit) identifier.
pub const MAX_STANDARD_ID: i64 = 0x7FF;
/// The largest extended (29-bit) identifier.
pub const MAX_EXTENDED_ID: i64 = 0x1FFF_FFFF;
/// The data lengths a CAN FD frame can have (its DLC table).
pub const FD_LENGTHS: [usize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];

/// A CAN identifier as clients send it: a JSON integer (`2015`), or a hex string with or without `0x`
/// (`"0x7DF"`, `"7DF"`), as v0.7 clients do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CanIdValue {
    Number(i64),
    Hex(String),
}

impl From<i64> for CanIdValue {
    fn from(n: i64) -> Self {
        Self::Number(n)
    }
}

impl CanIdValue {
    /// The identifier's value, or None for a string that is not 1 to 8 hex digits.
    fn value(&self) -> Option<i64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Hex(text) => {
                let text = text.trim();
                let digits = text
                    .strip_prefix("0x")
                    .or_else(|| text.strip_prefix("0X"))
                    .unwrap_or(text);
                if digits.is_empty()
                    || digits.len() > 8
                    || !digits.bytes().all(|b| b.is_ascii_hexdigit())
                {
                    return None;
                }
                u32::from_str_radix(digits, 16).ok().map(i64::from)
            }
        }
    }
}

/// `POST /dongles/:id/can/send`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct SendFrameRequest {
    /// The identifier: 0..=0x7FF, or 0..=0x1FFFFFFF with `is_extended`; an integer, or hex as a string
    /// (`"0x7DF"` or `"7DF"`).
    pub can_id: CanIdValue,
    /// A 29-bit identifier (default false).
    #[serde(default)]
    pub is_extended: bool,
    /// The data bytes as hex, e.g. `0201000000000000`: even length, at most 8 bytes (64 with `fd`).
    pub data_hex: String,
    /// A CAN FD frame; only for dongles that announce CAN FD (default false).
    #[serde(default)]
    pub fd: bool,
}

/// The answer to a frame the dongle took for transmission.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FrameSent {
    pub sent: bool,
}

/// A frame that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub can_id: u32,
    pub extended: bool,
    /// Lower-case hex.
    pub data_hex: String,
    pub len: usize,
    pub fd: bool,
}

fn invalid(field: &'static str, message: impl Into<String>) -> DongleError {
    DongleError::Invalid {
        field,
        message: message.into(),
    }
}

/// Checks a frame for a dongle that does (`can_fd`) or does not announce CAN FD.
pub fn validate(req: &SendFrameRequest, can_fd: bool) -> Result<Frame, DongleError> {
    let max_id = if req.is_extended {
        MAX_EXTENDED_ID
    } else {
        MAX_STANDARD_ID
    };
    let Some(can_id) = req.can_id.value() else {
        return Err(invalid(
            "can_id",
            "can_id must be an integer, or hex in a string such as \"0x7DF\" or \"7DF\".",
        ));
    };
    if !(0..=max_id).contains(&can_id) {
        return Err(invalid(
            "can_id",
            format!(
                "can_id must be between 0 and {max_id:#X} for a{} identifier.",
                if req.is_extended {
                    "n extended (29-bit)"
                } else {
                    " standard (11-bit)"
                }
            ),
        ));
    }
    if req.fd && !can_fd {
        return Err(invalid(
            "fd",
            "This dongle does not announce CAN FD: send a classic frame (fd false).",
        ));
    }
    let hex = req.data_hex.trim();
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "data_hex",
            "data_hex must be an even number of hex digits.",
        ));
    }
    let len = hex.len() / 2;
    if req.fd {
        if !FD_LENGTHS.contains(&len) {
            return Err(invalid(
                "data_hex",
                "A CAN FD frame carries 0 to 8, 12, 16, 20, 24, 32, 48 or 64 bytes.",
            ));
        }
    } else if len > 8 {
        return Err(invalid(
            "data_hex",
            if can_fd {
                "A classic frame carries at most 8 bytes; set fd for up to 64."
            } else {
                "A classic frame carries at most 8 bytes."
            },
        ));
    }
    Ok(Frame {
        can_id: can_id as u32,
        extended: req.is_extended,
        data_hex: hex.to_ascii_lowercase(),
        len,
        fd: req.fd,
    })
}

/// `POST /dongles/:id/can/send`: checks, counts against the dongle's limit, and sends through the
/// serving agent; answers once the dongle took the frame.
pub async fn send(
    svc: Services<'_>,
    caller: &Caller,
    client: &ClientInfo,
    dongle_id: Uuid,
    req: &SendFrameRequest,
) -> Result<FrameSent, DongleError> {
    let dongle = dongles::owned_or_404(svc.pool, caller.user_id(), dongle_id).await?;
    let frame = validate(req, dongle.can_fd())?;
    rate_limit::enforce(
        svc.pool,
        Scope::CanSendDongle,
        &dongle.id.to_string(),
        svc.rate_limits.can_send_per_dongle,
    )
    .await?;
    rate_limit::agent_request(svc.pool, svc.rate_limits, caller.user_id()).await?;
    let agent_id = dongles::owned::serving_agent_or_offline(
        svc.pool,
        svc.hub,
        dongle.id,
        caller.user_id(),
        caller.agent_id(),
    )
    .await?;
    let reply = svc
        .hub
        .request(
            agent_id,
            RequestBody::SendFrame {
                device_id: dongle.device_id,
                can_id: frame.can_id,
                extended: frame.extended,
                rtr: false,
                data: frame.data_hex.clone(),
                fd: frame.fd,
            },
            svc.dongle_request_timeout,
        )
        .await;
    let outcome = match reply {
        Ok(ReplyOk::FrameSent) => Ok(()),
        Ok(other) => {
            tracing::warn!(%agent_id, reply = ?other, "an agent answered a frame oddly");
            Err(DongleError::UnexpectedReply(
                "The agent answered the frame with something else than the dongle's acceptance.",
            ))
        }
        Err(e) => Err(DongleError::Request {
            error: e,
            refused: ErrorCode::CanSendRejected,
        }),
    };
    let details = serde_json::json!({
        "agent_id": agent_id,
        "can_id": frame.can_id,
        "is_extended": frame.extended,
        "fd": frame.fd,
        "len": frame.len,
        "data_hex": frame.data_hex,
        "sent": outcome.is_ok(),
        "code": outcome.as_ref().err().map(DongleError::code),
        "via_agent": caller.agent_id().is_some(),
    });
    let entry = Entry::new("can.send", Some(caller.user_id()), client)
        .target(Target {
            kind: "dongle",
            id: dongle.id.to_string(),
        })
        .details(details);
    match &outcome {
        // A frame that went out is audited, or the answer says why not.
        Ok(()) => {
            audit::record(svc.pool, entry).await?;
        }
        // A frame that did not is audited when possible; the answer is the dongle's error either way.
        Err(_) => {
            if let Err(e) = audit::record(svc.pool, entry).await {
                tracing::warn!(dongle_id = %dongle.id, error = %e, "could not audit a failed frame");
            }
        }
    }
    outcome?;
    let data = hex::decode(&frame.data_hex).unwrap_or_default();
    svc.console.bus_meter.add(
        dongle.id,
        1,
        console::bus_load::frame_bits(frame.extended, frame.len),
    );
    svc.console.publish(
        StreamKey::Dongle(dongle.id),
        ConsoleEvent::can_frame(
            dongle.id,
            "tx",
            &console::timestamp(chrono::Utc::now()),
            FrameView {
                can_id: frame.can_id,
                is_extended: frame.extended,
                fd: frame.fd,
                data: &data,
                dongle_ts_us: 0,
            },
            None,
        ),
    );
    Ok(FrameSent { sent: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(can_id: i64, is_extended: bool, data_hex: &str, fd: bool) -> SendFrameRequest {
        SendFrameRequest {
            can_id: can_id.into(),
            is_extended,
            data_hex: data_hex.into(),
            fd,
        }
    }

    fn field(r: Result<Frame, DongleError>) -> String {
        format!("{:?}", r.unwrap_err())
    }

    #[test]
    fn identifiers_fit_their_format() {
        assert!(validate(&req(0x7FF, false, "", false), false).is_ok());
        assert!(field(validate(&req(0x800, false, "", false), false)).contains("can_id"));
        assert!(validate(&req(0x1FFF_FFFF, true, "", false), false).is_ok());
        assert!(field(validate(&req(0x2000_0000, true, "", false), false)).contains("can_id"));
        assert!(field(validate(&req(-1, true, "", false), false)).contains("can_id"));
    }

    #[test]
    fn identifiers_may_be_hex_strings_as_v07_clients_send_them() {
        let hex = |text: &str| SendFrameRequest {
            can_id: CanIdValue::Hex(text.into()),
            ..req(0, false, "", false)
        };
        for text in ["0x7DF", "0X7df", "7DF", " 7df "] {
            assert_eq!(validate(&hex(text), false).unwrap().can_id, 0x7DF, "{text}");
        }
        let extended = SendFrameRequest {
            is_extended: true,
            ..hex("0x18DB33F1")
        };
        assert_eq!(validate(&extended, false).unwrap().can_id, 0x18DB_33F1);
        for bad in ["", "0x", "7DG", "0x123456789", "-1", "0x-1", "+7", "0x+7"] {
            assert!(
                field(validate(&hex(bad), false)).contains("can_id"),
                "{bad}"
            );
        }
        assert!(field(validate(&hex("800"), false)).contains("can_id"));
        let parsed: SendFrameRequest =
            serde_json::from_str(r#"{"can_id": "0x7DF", "data_hex": ""}"#).unwrap();
        assert_eq!(parsed.can_id, CanIdValue::Hex("0x7DF".into()));
        let parsed: SendFrameRequest =
            serde_json::from_str(r#"{"can_id": 2015, "data_hex": ""}"#).unwrap();
        assert_eq!(parsed.can_id, CanIdValue::Number(2015));
    }

    #[test]
    fn data_is_even_hex_of_a_valid_length() {
        let f = validate(&req(0x7DF, false, "02010D", false), false).unwrap();
        assert_eq!((f.data_hex.as_str(), f.len), ("02010d", 3));
        assert!(validate(&req(1, false, "0", false), false).is_err());
        assert!(validate(&req(1, false, "zz", false), false).is_err());
        assert!(validate(&req(1, false, &"00".repeat(9), false), true).is_err());
        // FD only where announced, and only at FD lengths.
        assert!(validate(&req(1, false, &"00".repeat(12), true), false).is_err());
        assert!(validate(&req(1, false, &"00".repeat(12), true), true).is_ok());
        assert!(validate(&req(1, false, &"00".repeat(64), true), true).is_ok());
        assert!(validate(&req(1, false, &"00".repeat(9), true), true).is_err());
        assert!(validate(&req(1, false, &"00".repeat(65), true), true).is_err());
    }
}
