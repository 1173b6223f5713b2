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

/// The broadcast targets among `interfaces`, in their order, one per (interface, address).
pub fn eligible(interfaces: &[InterfaceInfo]) -> Vec<BroadcastTarget> {
    interfaces
        .iter()
        .filter(|i| i.up && !i.loopback && !i.addr.is_loopback())
        .filter(|i| !EXCLUDED_PREFIXES.iter().any(|p| i.name.starts_with(p)))
        .filter_map(|i| {
            Some(BroadcastTarget {
                interface: i.name.clone(),
                local_addr: i.addr,
                broadcast: i.broadcast.filter(|b| !b.is_unspecified())?,
            })
        })
        .collect()
}

/// The IPv4 addresses of this machine's interfaces, as the operating system reports them.
pub fn system_interfaces() -> std::io::Result<Vec<InterfaceInfo>> {
    use nix::net::if_::InterfaceFlags;
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|ifa| {
            let addr = ifa.address.as_ref()?.as_sockaddr_in()?.ip();
            let broadcast = ifa
                .broadcast
                .as_ref()
                .and_then(|b| b.as_sockaddr_in())
                .map(|b| b.ip());
            Some(InterfaceInfo {
                up: ifa.flags.contains(InterfaceFlags::IFF_UP),
                loopback: ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                name: ifa.interface_name,
                addr,
                broadcast,
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
