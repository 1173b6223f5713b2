//! A group's state and the names the database gives its sides and directions.

use control_proto::data::Side;
use serde::Serialize;
use utoipa::ToSchema;

/// The direction of the frames going TO `target`, as `relay_buffer.direction` names it.
pub fn direction_to(target: Side) -> &'static str {
    match target {
        Side::B => "a_to_b",
        Side::A => "b_to_a",
    }
}

/// A group's state, the `group_mode` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    Inactive,
    /// Both sides' agents have their data connection on this instance and nothing waits.
    Active,
    /// A side is away, or frames wait for it in the buffer.
    Degraded,
    /// Both sides are connected, to different instances: frames cross through the buffer and a
    /// notification (`groups::wake`).
    CrossInstance,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inactive => "INACTIVE",
            Mode::Active => "ACTIVE",
            Mode::Degraded => "DEGRADED",
            Mode::CrossInstance => "CROSS_INSTANCE",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "INACTIVE" => Some(Mode::Inactive),
            "ACTIVE" => Some(Mode::Active),
            "DEGRADED" => Some(Mode::Degraded),
            "CROSS_INSTANCE" => Some(Mode::CrossInstance),
            _ => None,
        }
    }

    /// The relay runs for the group.
    pub fn relaying(self) -> bool {
        self != Mode::Inactive
    }
}
