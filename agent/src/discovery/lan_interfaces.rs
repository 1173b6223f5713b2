//! Which network interfaces the LAN discovery broadcasts DISCOVER on.
//!
//! The rule is the v0.7 one: an interface that is up, is not loopback, has an IPv4 address and a broadcast
//! address, and whose name does not mark it as a tunnel, VPN, container or virtual-machine bridge. Dongles
//! live on physical LANs; broadcasting into a VPN or a container bridge only wastes packets and can leak
//! the scan onto networks that are not the workstation's.

use std::net::Ipv4Addr;

/// Interface name prefixes that never carry dongles.
pub const EXCLUDED_PREFIXES: [&str; 9] = [
    "tun", "tap", "wg", "utun", "ppp", "docker", "br-", "vbox", "vmnet",
];

/// What the scan needs to know about one IPv4 address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub name: String,
    pub up: bool,
    pub loopback: bool,
    pub addr: Ipv4Addr,
    pub broadcast: Option<Ipv4Addr>,
}

/// Where to send one DISCOVER broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastTarget {
    pub interface: String,
    pub local_addr: Ipv4Addr,
    pub broadcast: Ipv4Addr,
}

/// Why an interface address is not scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    Down,
    Loopback,
    /// A tunnel, VPN, container or virtual-machine bridge, by its name's prefix.
    Virtual(&'static str),
    NoBroadcast,
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exclusion::Down => f.write_str("down"),
            Exclusion::Loopback => f.write_str("loopback"),
            Exclusion::Virtual(prefix) => write!(
                f,
                "a tunnel, VPN or virtual bridge (name starts with {prefix:?})"
            ),
            Exclusion::NoBroadcast => f.write_str("no IPv4 broadcast address"),
        }
    }
}

/// Where to broadcast for this interface address, or why not.
pub fn verdict(i: &InterfaceInfo) -> Result<Ipv4Addr, Exclusion> {
    if !i.up {
        return Err(Exclusion::Down);
    }
    if i.loopback || i.addr.is_loopback() {
        return Err(Exclusion::Loopback);
    }
    if let Some(prefix) = EXCLUDED_PREFIXES.iter().find(|p| i.name.starts_with(*p)) {
        return Err(Exclusion::Virtual(prefix));
    }
    i.broadcast
        .filter(|b| !b.is_unspecified())
        .ok_or(Exclusion::NoBroadcast)
}

/// The broadcast targets among `interfaces`, in their order, one per (interface, address).
pub fn eligible(interfaces: &[InterfaceInfo]) -> Vec<BroadcastTarget> {
    interfaces
        .iter()
        .filter_map(|i| {
            Some(BroadcastTarget {
                interface: i.name.clone(),
                local_addr: i.addr,
                broadcast: verdict(i).ok()?,
            })
        })
        .collect()
}

/// The interfaces as the agent reports them to the server: one entry per name, in their order, with
/// its addresses, and whether discovery uses it (any of its addresses) or why not (its first
/// address's reason).
pub fn report(interfaces: &[InterfaceInfo]) -> Vec<control_proto::InterfaceReport> {
    let mut reports: Vec<control_proto::InterfaceReport> = Vec::new();
    for i in interfaces {
        let verdict = verdict(i);
        let index = match reports.iter().position(|r| r.name == i.name) {
            Some(index) => index,
            None => {
                reports.push(control_proto::InterfaceReport {
                    name: i.name.clone(),
                    addresses: Vec::new(),
                    used_for_discovery: false,
                    excluded_because: verdict.err().map(|e| e.to_string()),
                });
                reports.len() - 1
            }
        };
        let r = &mut reports[index];
        r.addresses.push(i.addr.to_string());
        if verdict.is_ok() {
            r.used_for_discovery = true;
            r.excluded_because = None;
        }
    }
    reports
}

/// The IPv4 addresses of this machine's interfaces, as the operating system reports them (through
/// `if-addrs`, on every OS). An interface counts as up when it runs (up with a carrier, on Unix;
/// operationally up, on Windows): one without a link cannot reach a dongle.
pub fn system_interfaces() -> std::io::Result<Vec<InterfaceInfo>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .filter_map(|ifa| {
            let if_addrs::IfAddr::V4(v4) = &ifa.addr else {
                return None;
            };
            Some(InterfaceInfo {
                up: ifa.is_oper_up(),
                loopback: v4.ip.is_loopback(),
                addr: v4.ip,
                broadcast: v4.broadcast,
                name: ifa.name.clone(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(
        name: &str,
        up: bool,
        loopback: bool,
        addr: [u8; 4],
        bcast: Option<[u8; 4]>,
    ) -> InterfaceInfo {
        InterfaceInfo {
            name: name.to_string(),
            up,
            loopback,
            addr: addr.into(),
            broadcast: bcast.map(Into::into),
        }
    }

    #[test]
    fn the_report_says_which_interfaces_are_scanned_and_why_not_the_others() {
        let all = vec![
            iface("lo", true, true, [127, 0, 0, 1], None),
            iface(
                "eth0",
                true,
                false,
                [192, 168, 1, 20],
                Some([192, 168, 1, 255]),
            ),
            iface("eth0", true, false, [10, 1, 0, 2], Some([10, 1, 0, 255])),
            iface("wg0", true, false, [10, 9, 0, 1], Some([10, 9, 0, 255])),
            iface("enp3s0", false, false, [10, 0, 0, 2], Some([10, 0, 0, 255])),
        ];
        let report = report(&all);
        let names: Vec<&str> = report.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["lo", "eth0", "wg0", "enp3s0"]);
        assert_eq!(report[1].addresses, ["192.168.1.20", "10.1.0.2"]);
        assert!(report[1].used_for_discovery && report[1].excluded_because.is_none());
        let why = |n: usize| report[n].excluded_because.clone().unwrap();
        assert_eq!(why(0), "loopback");
        assert!(why(2).contains("VPN"), "{}", why(2));
        assert_eq!(why(3), "down");
        assert!(report.iter().filter(|r| r.used_for_discovery).count() == 1);
    }

    #[test]
    fn only_physical_lans_with_broadcast_are_scanned() {
        let all = vec![
            iface("lo", true, true, [127, 0, 0, 1], None),
            iface(
                "eth0",
                true,
                false,
                [192, 168, 1, 20],
                Some([192, 168, 1, 255]),
            ),
            iface("enp3s0", false, false, [10, 0, 0, 2], Some([10, 0, 0, 255])),
            iface(
                "wlan0",
                true,
                false,
                [172, 16, 4, 9],
                Some([172, 16, 7, 255]),
            ),
            iface("eth1", true, false, [10, 1, 0, 2], None),
        ];
        let excluded = EXCLUDED_PREFIXES.iter().map(|p| {
            iface(
                &format!("{p}0"),
                true,
                false,
                [10, 9, 0, 1],
                Some([10, 9, 0, 255]),
            )
        });
        let mut interfaces = all.clone();
        interfaces.extend(excluded);

        let targets = eligible(&interfaces);
        assert_eq!(
            targets,
            vec![
                BroadcastTarget {
                    interface: "eth0".into(),
                    local_addr: [192, 168, 1, 20].into(),
                    broadcast: [192, 168, 1, 255].into(),
                },
                BroadcastTarget {
                    interface: "wlan0".into(),
                    local_addr: [172, 16, 4, 9].into(),
                    broadcast: [172, 16, 7, 255].into(),
                },
            ]
        );
    }

    #[test]
    fn a_name_that_merely_contains_an_excluded_word_is_kept() {
        let targets = eligible(&[iface(
            "eth-tun",
            true,
            false,
            [10, 0, 0, 1],
            Some([10, 0, 0, 255]),
        )]);
        assert_eq!(targets.len(), 1);
    }

    #[test]
    fn the_system_list_can_be_read() {
        // Every Linux machine has at least a loopback interface with 127.0.0.1.
        let interfaces = system_interfaces().unwrap();
        assert!(
            interfaces
                .iter()
                .any(|i| i.loopback && i.addr == Ipv4Addr::LOCALHOST)
        );
        assert!(eligible(&interfaces).iter().all(|t| t.interface != "lo"));
    }
}
