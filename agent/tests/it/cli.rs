//! `bridge-agent` as a user runs it: a real process against simulators on a pseudo-terminal and on UDP.

use std::process::Command;

use dongle_sim::{Extensions, SimConfig, Simulator};

fn agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bridge-agent"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("bridge-agent runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn list_shows_a_serial_and_a_lan_dongle_merged_by_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let serial = Simulator::start(SimConfig::serial(dir.path().join("a.json")))
        .await
        .unwrap();
    let lan = Simulator::start(
        SimConfig::udp(dir.path().join("b.json")).with_extensions(Extensions::ALL),
    )
    .await
    .unwrap();
    let port = serial.serial_path().unwrap();
    let discovery = lan.discovery_addr().unwrap().to_string();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        agent(&[
            "list",
            "--no-broadcast",
            "--port",
            port.to_str().unwrap(),
            "--udp",
            &discovery,
            "--wait-ms",
            "800",
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let serial_line = lines
        .iter()
        .find(|l| l.starts_with(&serial.device_id().to_string()))
        .expect("the serial dongle is listed");
    assert!(serial_line.contains("usb /dev/pts/"), "{serial_line}");
    let lan_line = lines
        .iter()
        .find(|l| l.starts_with(&lan.device_id().to_string()))
        .expect("the LAN dongle is listed");
    assert!(
        lan_line.contains("batch,bus-status,forget,session"),
        "{lan_line}"
    );
    assert!(
        lan_line.contains(&format!("lan {}", lan.udp_addr().unwrap())),
        "{lan_line}"
    );
    serial.shutdown().await;
    lan.shutdown().await;
}

#[test]
fn proto_decode_explains_bad_input_and_help_explains_itself() {
    let (ok, _, stderr) = agent(&["proto", "decode", "zz"]);
    assert!(!ok);
    assert!(stderr.contains("that is not hex"), "{stderr}");
    let (ok, stdout, _) = agent(&["--help"]);
    assert!(ok);
    assert!(
        stdout.contains("list") && stdout.contains("proto"),
        "{stdout}"
    );
}
