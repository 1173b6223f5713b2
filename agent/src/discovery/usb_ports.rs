//! Which serial ports may be dongles: the USB VID:PID filter and the sysfs scan behind it.
//!
//! A port that passes the filter is only a candidate: it becomes a dongle after it answers DISCOVER with a
//! valid ANNOUNCE. On Linux the scan reads sysfs directly (`/sys/class/tty/*/device` and the USB device
//! above it): that needs no C library (the serial-port library's Linux enumeration wants libudev, and
//! without it panics where /sys/class/tty is missing, as in some containers), and lets tests build a fake
//! tree in a temporary folder. On Windows and macOS the serial-port library enumerates the ports (COM
//! ports with their USB ids from the registry; /dev/cu.* from IOKit).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A USB vendor and product id, written `0483:5740`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsbId {
    pub vid: u16,
    pub pid: u16,
}

/// The STM32 virtual COM port, which the dongle firmware enumerates as.
pub const STM32_VCP: UsbId = UsbId {
    vid: 0x0483,
    pid: 0x5740,
};

impl fmt::Display for UsbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vid, self.pid)
    }
}

/// Why a VID:PID filter entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a USB id: write it as four hex digits, a colon and four hex digits, e.g. 0483:5740"
)]
pub struct BadUsbId(pub String);

impl FromStr for UsbId {
    type Err = BadUsbId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadUsbId(s.to_string());
        let (vid, pid) = s.trim().split_once(':').ok_or_else(bad)?;
        if vid.len() != 4 || pid.len() != 4 {
            return Err(bad());
        }
        Ok(Self {
            vid: u16::from_str_radix(vid, 16).map_err(|_| bad())?,
            pid: u16::from_str_radix(pid, 16).map_err(|_| bad())?,
        })
    }
}

/// One serial port and what USB says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialPortInfo {
    /// The device node, e.g. `/dev/ttyACM0`.
    pub path: PathBuf,
    pub usb_id: Option<UsbId>,
    pub serial_number: Option<String>,
}

/// Lists the tty devices under `sys_class_tty` (normally `/sys/class/tty`) that sit on a USB device,
/// with the device nodes they would have under `/dev`.
pub fn scan_sysfs(sys_class_tty: &Path, dev: &Path) -> Vec<SerialPortInfo> {
    let Ok(entries) = std::fs::read_dir(sys_class_tty) else {
        return Vec::new();
    };
    let mut ports: Vec<SerialPortInfo> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            // The device link resolves to the USB interface; the USB device with its ids is one of the
            // next few folders up (one for CDC ACM, two for some USB-serial bridges).
            let device = std::fs::canonicalize(entry.path().join("device")).ok()?;
            let usb_dir = device
                .ancestors()
                .take(4)
                .find(|d| d.join("idVendor").is_file())?;
            let read = |f: &str| {
                std::fs::read_to_string(usb_dir.join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            let usb_id = match (read("idVendor"), read("idProduct")) {
                (Some(v), Some(p)) => format!("{v}:{p}").parse().ok(),
                _ => None,
            };
            Some(SerialPortInfo {
                path: dev.join(&name),
                usb_id,
                serial_number: read("serial"),
            })
        })
        .collect();
    ports.sort_by(|a, b| a.path.cmp(&b.path));
    ports
}

/// The serial ports of this machine, with what USB says of them.
pub fn available() -> Vec<SerialPortInfo> {
    #[cfg(target_os = "linux")]
    {
        scan_sysfs(Path::new("/sys/class/tty"), Path::new("/dev"))
    }
    #[cfg(not(target_os = "linux"))]
    {
        // An error here (no permission to the registry, say) leaves only the explicit --port ones.
        from_serialport(tokio_serial::available_ports().unwrap_or_default())
    }
}

/// The serial-port library's view of the ports in ours: the port's name is its path (`COM7`,
/// `/dev/cu.usbmodem1101`), and only USB ports carry ids.
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn from_serialport(ports: Vec<tokio_serial::SerialPortInfo>) -> Vec<SerialPortInfo> {
    let mut ports: Vec<SerialPortInfo> = ports
        .into_iter()
        .map(|port| {
            let (usb_id, serial_number) = match port.port_type {
                tokio_serial::SerialPortType::UsbPort(usb) => (
                    Some(UsbId {
                        vid: usb.vid,
                        pid: usb.pid,
                    }),
                    usb.serial_number,
                ),
                _ => (None, None),
            };
            SerialPortInfo {
                path: PathBuf::from(port.port_name),
                usb_id,
                serial_number,
            }
        })
        .collect();
    ports.sort_by(|a, b| a.path.cmp(&b.path));
    ports
}

/// The ports whose USB id is in `filter`.
pub fn matching(ports: Vec<SerialPortInfo>, filter: &[UsbId]) -> Vec<SerialPortInfo> {
    ports
        .into_iter()
        .filter(|p| p.usb_id.is_some_and(|id| filter.contains(&id)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::fs;

    #[test]
    fn usb_ids_parse_strictly() {
        assert_eq!("0483:5740".parse::<UsbId>(), Ok(STM32_VCP));
        assert_eq!(STM32_VCP.to_string(), "0483:5740");
        for bad in [
            "",
            "0483",
            "0483:574",
            "0483-5740",
            "zzzz:5740",
            "04835:740",
        ] {
            assert!(bad.parse::<UsbId>().is_err(), "{bad}");
        }
    }

    /// Builds a sysfs-like tree: one STM32 CDC ACM port, one FTDI bridge, one on-board UART. Its
    /// device links are symbolic links, as Linux's are, so these tests run where those exist.
    #[cfg(unix)]
    fn fake_sysfs(root: &Path) {
        let usb = root.join("devices/pci0/usb1");
        let stm = usb.join("1-1");
        fs::create_dir_all(stm.join("1-1:1.0/tty/ttyACM0")).unwrap();
        fs::write(stm.join("idVendor"), "0483\n").unwrap();
        fs::write(stm.join("idProduct"), "5740\n").unwrap();
        fs::write(stm.join("serial"), "205E3358484E\n").unwrap();
        let ftdi = usb.join("1-2");
        fs::create_dir_all(ftdi.join("1-2:1.0/ttyUSB0")).unwrap();
        fs::write(ftdi.join("idVendor"), "0403\n").unwrap();
        fs::write(ftdi.join("idProduct"), "6001\n").unwrap();
        let uart = root.join("devices/platform/serial8250");
        fs::create_dir_all(&uart).unwrap();

        let class = root.join("class/tty");
        for (name, target) in [
            ("ttyACM0", stm.join("1-1:1.0")),
            ("ttyUSB0", ftdi.join("1-2:1.0/ttyUSB0")),
            ("ttyS0", uart),
        ] {
            fs::create_dir_all(class.join(name)).unwrap();
            std::os::unix::fs::symlink(target, class.join(name).join("device")).unwrap();
        }
    }

    #[test]
    #[cfg(unix)]
    fn the_scan_finds_usb_ports_and_the_filter_keeps_dongles() {
        let root = tempfile::tempdir().unwrap();
        fake_sysfs(root.path());
        let ports = scan_sysfs(&root.path().join("class/tty"), Path::new("/dev"));
        assert_eq!(
            ports,
            vec![
                SerialPortInfo {
                    path: "/dev/ttyACM0".into(),
                    usb_id: Some(STM32_VCP),
                    serial_number: Some("205E3358484E".into()),
                },
                SerialPortInfo {
                    path: "/dev/ttyUSB0".into(),
                    usb_id: Some(UsbId {
                        vid: 0x0403,
                        pid: 0x6001
                    }),
                    serial_number: None,
                },
            ]
        );
        let dongles = matching(ports, &[STM32_VCP]);
        assert_eq!(dongles.len(), 1);
        assert_eq!(dongles[0].path, Path::new("/dev/ttyACM0"));
    }

    #[test]
    fn the_serial_port_librarys_ports_keep_their_names_and_usb_ids() {
        use tokio_serial::{SerialPortInfo as Lib, SerialPortType, UsbPortInfo};
        let ports = from_serialport(vec![
            Lib {
                port_name: "COM7".into(),
                port_type: SerialPortType::UsbPort(UsbPortInfo {
                    vid: 0x0483,
                    pid: 0x5740,
                    serial_number: Some("205E3358484E".into()),
                    manufacturer: Some("STMicroelectronics".into()),
                    product: Some("CAN dongle".into()),
                    interface: Some(0),
                }),
            },
            Lib {
                port_name: "COM1".into(),
                port_type: SerialPortType::PciPort,
            },
        ]);
        assert_eq!(
            ports,
            vec![
                SerialPortInfo {
                    path: "COM1".into(),
                    usb_id: None,
                    serial_number: None,
                },
                SerialPortInfo {
                    path: "COM7".into(),
                    usb_id: Some(STM32_VCP),
                    serial_number: Some("205E3358484E".into()),
                },
            ]
        );
        let dongles = matching(ports, &[STM32_VCP]);
        assert_eq!(dongles.len(), 1);
        assert_eq!(dongles[0].path, Path::new("COM7"));
    }

    #[test]
    fn a_missing_sysfs_is_an_empty_list() {
        assert!(scan_sysfs(Path::new("/nonexistent/class/tty"), Path::new("/dev")).is_empty());
    }
}
