//! Who is on the other end of a request, as the audit log and the rate limits record it. The HTTP
//! layer fills it in (`crate::http::extract`); everything below only reads it.

use std::net::IpAddr;

/// Who is on the other end: the client's IP address and user agent, for rate limits and the audit log.
///
/// The address is the socket's peer, or, when that peer is one of the configured trusted proxies, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub user_agent: Option<String>,
}
