//! Endpoint specs: how a person names a local endpoint on the command line and in `endpoints.json`.
//!
//! | spec | meaning |
//! |---|---|
//! | `socketcan:IFACE` | the SocketCAN interface `IFACE` (`can0`, `vcan0`); Linux only |
//! | `slcan:PATH[@BITRATE][,OPTION...]` | an slcan adapter on the serial port `PATH`, at CAN bitrate `BITRATE` (default 500000; `500k` and `1M` work too) |
//! | `socketcand:[IP:]PORT` | a socketcand-compatible TCP server on `IP:PORT` (default IP 127.0.0.1) |
//!
//! slcan options: `fd` or `fd=DATA_BITRATE` (CAN FD through the `d/D/b/B` extension, data phase at
//! 2 Mbit/s unless given), `baud=N` (the serial port's baud rate, default 115200, which USB adapters
//! ignore), `listen` (open listen-only, `L` instead of `O`), `timestamps` (ask the adapter for its
//! millisecond timestamps with `Z1`).
//!
//! An endpoint's identity ([`EndpointSpec::identity`]) is its kind and place without its settings:
//! changing an adapter's bitrate keeps its identity, and so its device id.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The default CAN bitrate of an slcan adapter.
pub const DEFAULT_SLCAN_BITRATE: u32 = 500_000;
/// The default data-phase bitrate of an slcan FD adapter.
pub const DEFAULT_SLCAN_DATA_BITRATE: u32 = 2_000_000;
/// The default serial baud rate, which USB CDC adapters ignore and UART bridges need.
pub const DEFAULT_SLCAN_BAUD: u32 = 115_200;
/// socketcand's registered port.
pub const DEFAULT_SOCKETCAND_PORT: u16 = 29536;
/// The longest SocketCAN interface name (Linux's IFNAMSIZ less its terminating zero).
pub const MAX_IFNAME: usize = 15;

/// The kinds of local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointKind {
    SocketCan,
    Slcan,
    Socketcand,
}

impl EndpointKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::SocketCan => "socketcan",
            Self::Slcan => "slcan",
            Self::Socketcand => "socketcand",
        }
    }
}

impl fmt::Display for EndpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The settings of an slcan endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlcanSettings {
    pub path: PathBuf,
    /// The nominal CAN bitrate, one of slcan's `S0`..`S8`.
    pub bitrate: u32,
    /// The data-phase bitrate; `Some` makes the endpoint a CAN FD one.
    pub data_bitrate: Option<u32>,
    /// The serial port's baud rate.
    pub baud: u32,
    pub listen_only: bool,
    pub timestamps: bool,
}

impl SlcanSettings {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            bitrate: DEFAULT_SLCAN_BITRATE,
            data_bitrate: None,
            baud: DEFAULT_SLCAN_BAUD,
            listen_only: false,
            timestamps: false,
        }
    }
}

/// A local endpoint, as named by a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    SocketCan { interface: String },
    Slcan(SlcanSettings),
    Socketcand { addr: SocketAddr },
}

/// Why a spec does not parse. The message shows the forms that do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{problem} in endpoint spec {spec:?}: use socketcan:IFACE, slcan:PATH[@BITRATE][,fd[=BITRATE]][,baud=N][,listen][,timestamps] or socketcand:[IP:]PORT"
)]
pub struct SpecError {
    pub spec: String,
    pub problem: String,
}

impl EndpointSpec {
    pub fn kind(&self) -> EndpointKind {
        match self {
            Self::SocketCan { .. } => EndpointKind::SocketCan,
            Self::Slcan(_) => EndpointKind::Slcan,
            Self::Socketcand { .. } => EndpointKind::Socketcand,
        }
    }

    /// The kind and place without the settings: `socketcan:can0`, `slcan:/dev/ttyACM0`,
    /// `socketcand:127.0.0.1:29536`. The input of the endpoint's device id.
    pub fn identity(&self) -> String {
        match self {
            Self::SocketCan { interface } => format!("socketcan:{interface}"),
            Self::Slcan(s) => format!("slcan:{}", s.path.display()),
            Self::Socketcand { addr } => format!("socketcand:{addr}"),
        }
    }
}

impl fmt::Display for EndpointSpec {
    /// The canonical spec: what `endpoints.json` keeps and `endpoint list` shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SocketCan { .. } | Self::Socketcand { .. } => f.write_str(&self.identity()),
            Self::Slcan(s) => {
                write!(f, "slcan:{}@{}", s.path.display(), s.bitrate)?;
                if let Some(d) = s.data_bitrate {
                    write!(f, ",fd={d}")?;
                }
                if s.baud != DEFAULT_SLCAN_BAUD {
                    write!(f, ",baud={}", s.baud)?;
                }
                if s.listen_only {
                    f.write_str(",listen")?;
                }
                if s.timestamps {
                    f.write_str(",timestamps")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for EndpointSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let err = |problem: &str| SpecError {
            spec: text.to_string(),
            problem: problem.to_string(),
        };
        let text = text.trim();
        let Some((kind, rest)) = text.split_once(':') else {
            return Err(err("no kind"));
        };
        match kind {
            "socketcan" => {
                let valid = !rest.is_empty()
                    && rest.len() <= MAX_IFNAME
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
                if !valid {
                    return Err(err(
                        "an interface name is 1 to 15 letters, digits, '_', '-' or '.'",
                    ));
                }
                Ok(Self::SocketCan {
                    interface: rest.to_string(),
                })
            }
            "slcan" => parse_slcan(rest).map(Self::Slcan).map_err(|p| err(&p)),
            "socketcand" => {
                let addr = if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                    let port = rest
                        .parse::<u16>()
                        .map_err(|_| err("the port is too large"))?;
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
                } else {
                    rest.parse::<SocketAddr>()
                        .map_err(|_| err("expected PORT or IP:PORT (an IP address, not a name)"))?
                };
                Ok(Self::Socketcand { addr })
            }
            _ => Err(err("unknown kind")),
        }
    }
}

fn parse_slcan(rest: &str) -> Result<SlcanSettings, String> {
    let mut parts = rest.split(',');
    let head = parts.next().unwrap_or_default();
    let (path, bitrate) = match head.rsplit_once('@') {
        Some((path, rate)) => (path, Some(parse_rate(rate)?)),
        None => (head, None),
    };
    if path.is_empty() {
        return Err("no serial port".into());
    }
    let mut settings = SlcanSettings::new(path);
    if let Some(bitrate) = bitrate {
        settings.bitrate = bitrate;
    }
    for option in parts {
        match option.split_once('=') {
            None if option == "fd" => settings.data_bitrate = Some(DEFAULT_SLCAN_DATA_BITRATE),
            None if option == "listen" => settings.listen_only = true,
            None if option == "timestamps" => settings.timestamps = true,
            Some(("fd", rate)) => settings.data_bitrate = Some(parse_rate(rate)?),
            Some(("baud", rate)) => settings.baud = parse_rate(rate)?,
            _ => return Err(format!("unknown slcan option {option:?}")),
        }
    }
    if super::slcan_rates::bitrate_code(settings.bitrate).is_none() {
        return Err(format!(
            "slcan sets only these bitrates: {}",
            super::slcan_rates::bitrate_list()
        ));
    }
    if let Some(d) = settings.data_bitrate
        && super::slcan_rates::data_bitrate_code(d).is_none()
    {
        return Err(format!(
            "slcan sets only these FD data bitrates: {}",
            super::slcan_rates::data_bitrate_list()
        ));
    }
    Ok(settings)
}

/// A rate in bit/s: digits, optionally with a `k` or `M` multiplier (`500k`, `1M`, `83.3k` is not).
fn parse_rate(text: &str) -> Result<u32, String> {
    let (digits, factor) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1_000),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 1_000_000),
        _ => (text, 1),
    };
    digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a rate in bit/s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> EndpointSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_three_kinds_parse_and_print_canonically() {
        let can = parse("socketcan:can0");
        assert_eq!(can.kind(), EndpointKind::SocketCan);
        assert_eq!(can.to_string(), "socketcan:can0");
        assert_eq!(can.identity(), "socketcan:can0");

        let sl = parse("slcan:/dev/ttyACM0@500000");
        assert_eq!(sl.to_string(), "slcan:/dev/ttyACM0@500000");
        assert_eq!(sl.identity(), "slcan:/dev/ttyACM0");
        let EndpointSpec::Slcan(s) =
            parse("slcan:/dev/ttyUSB0@1M,fd=5M,baud=921600,listen,timestamps")
        else {
            panic!()
        };
        assert_eq!(
            (
                s.bitrate,
                s.data_bitrate,
                s.baud,
                s.listen_only,
                s.timestamps
            ),
            (1_000_000, Some(5_000_000), 921_600, true, true)
        );
        assert_eq!(
            parse("slcan:/dev/ttyUSB0@1M,fd=5M,baud=921600,listen,timestamps").to_string(),
            "slcan:/dev/ttyUSB0@1000000,fd=5000000,baud=921600,listen,timestamps"
        );
        let EndpointSpec::Slcan(d) = parse("slcan:/dev/pts/3") else {
            panic!()
        };
        assert_eq!((d.bitrate, d.baud), (500_000, 115_200));
        assert_eq!(
            parse("slcan:/dev/pts/3,fd").to_string(),
            "slcan:/dev/pts/3@500000,fd=2000000"
        );

        assert_eq!(
            parse("socketcand:29536").to_string(),
            "socketcand:127.0.0.1:29536"
        );
        assert_eq!(
            parse("socketcand:127.0.0.1:29536"),
            parse("socketcand:29536")
        );
        assert_eq!(
            parse("socketcand:[::1]:4000").identity(),
            "socketcand:[::1]:4000"
        );
    }

    #[test]
    fn the_identity_ignores_settings() {
        assert_eq!(
            parse("slcan:/dev/ttyACM0@250k").identity(),
            parse("slcan:/dev/ttyACM0@1M,fd").identity()
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong_and_what_works() {
        for bad in [
            "",
            "can0",
            "usb:/dev/ttyACM0",
            "socketcan:",
            "socketcan:a-very-long-interface-name",
            "socketcan:can 0",
            "slcan:",
            "slcan:@500000",
            "slcan:/dev/ttyACM0@300000",
            "slcan:/dev/ttyACM0@fast",
            "slcan:/dev/ttyACM0,fd=3M",
            "slcan:/dev/ttyACM0,turbo",
            "socketcand:localhost:29536",
            "socketcand:99999",
        ] {
            let e = bad.parse::<EndpointSpec>().unwrap_err().to_string();
            assert!(e.contains("socketcan:IFACE"), "{bad}: {e}");
        }
        let e = "slcan:/dev/ttyACM0@300000"
            .parse::<EndpointSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("500000"), "{e}");
    }
}
