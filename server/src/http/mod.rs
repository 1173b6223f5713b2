//! HTTP plumbing shared by every route: the error type and shape, the request id, and extractors whose
//! rejections keep that shape.

pub mod bounded;
pub mod error;
pub mod extract;
pub mod first_byte;
pub mod request_id;

pub use error::{ApiError, ErrorCode};

/// The prefix of the JSON API.
pub const API_PREFIX: &str = "/api/v1";

pub use extract::{ApiJson, ApiQuery, ClientInfo, PathId, PathIds};
