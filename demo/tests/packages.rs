//! The packages as a user installs them: `scripts/package` makes the .deb files (and the Windows zip)
//! from the debug binaries this test run built, then dpkg installs them into a throwaway root, runs the
//! maintainer scripts there, and the installed files are checked: binaries that run and tell the
//! workspace's version, the systemd units pointing at them, manual pages, completions, and the server's
//! configuration file with a fresh key that a purge removes again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace's root and the folder of this run's binaries (target/debug).
fn paths() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    // This test's executable is target/debug/deps/packages-<hash>.
    let exe = std::env::current_exe().unwrap();
    let bin_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    for bin in ["bridge-server", "bridge-agent"] {
        assert!(
            bin_dir.join(bin).is_file(),
            "{} is missing: run the whole workspace's tests (scripts/test), which build it, or \
             `cargo build --bin bridge-server --bin bridge-agent` first",
            bin_dir.join(bin).display()
        );
    }
    (root, bin_dir)
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).unwrap()
}

/// An empty dpkg database under `root`, as a fresh system has.
/// Checks that `binary` needs no shared library beyond libc6's (and libgcc_s), read with `objdump`
/// (the one for the binary's architecture); `loader` is the architecture's dynamic loader.
fn assert_needs_only_libc(binary: &Path, objdump: &str, loader: &str) {
    let needed = stdout(Command::new(objdump).arg("-p").arg(binary));
    let libs: Vec<&str> = needed
        .lines()
        .filter(|l| l.trim_start().starts_with("NEEDED"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        libs.contains(&"libc.so.6"),
        "{}: {needed}",
        binary.display()
    );
    for lib in libs {
        assert!(
            ["libc.so.6", "libm.so.6", "libgcc_s.so.1", loader].contains(&lib)
                || lib.starts_with("libpthread")
                || lib.starts_with("libdl"),
            "{} needs {lib}, which its package does not depend on",
            binary.display()
        );
    }
}

fn dpkg_root(root: &Path) {
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
}

/// dpkg acting on the throwaway root: the maintainer scripts run without chroot (with DPKG_ROOT set, which
/// they honour), and the dependencies (adduser, libc6), which that root lacks, are not asked for.
fn dpkg(root: &Path) -> Command {
    let mut command = Command::new("dpkg");
    command
        .arg(format!("--root={}", root.display()))
        .args([
            "--force-script-chrootless",
            "--force-depends",
            "--force-not-root",
            "--log=/dev/null",
        ])
        // Without this dpkg asks for the root's own ldconfig and start-stop-daemon on PATH.
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    command
}

#[test]
fn the_debian_packages_install_run_and_purge() {
    let (root, bin_dir) = paths();
    let out = tempfile::tempdir().unwrap();
    run(Command::new(root.join("scripts/package"))
        .args(["--arch", "amd64", "--no-windows", "--fast", "--binaries"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path()));
    let version = env!("CARGO_PKG_VERSION");
    let server_deb = out
        .path()
        .join(format!("bridge-server_{version}_amd64.deb"));
    let agent_deb = out.path().join(format!("bridge-agent_{version}_amd64.deb"));

    // The control fields a package manager reads.
    let info = stdout(Command::new("dpkg-deb").args(["--field"]).arg(&server_deb));
    for field in [
        "Package: bridge-server".to_string(),
        format!("Version: {version}"),
        "Architecture: amd64".to_string(),
        "Depends: adduser, libc6 (>= 2.34)".to_string(),
        "Recommends: postgresql".to_string(),
    ] {
        assert!(info.contains(&field), "{field} missing from:\n{info}");
    }
    // The binaries' shared libraries are all in libc6, which the packages depend on (and libgcc-s1,
    // which is essential).
    let agent_info = stdout(Command::new("dpkg-deb").args(["--field"]).arg(&agent_deb));
    assert!(agent_info.contains("libc6 (>= 2.34)"), "{agent_info}");
    for bin in ["bridge-server", "bridge-agent"] {
        assert_needs_only_libc(&bin_dir.join(bin), "objdump", "ld-linux-x86-64.so.2");
    }

    let target = tempfile::tempdir().unwrap();
    let target = target.path();
    dpkg_root(target);
    let installed = run(dpkg(target).arg("-i").arg(&server_deb).arg(&agent_deb));
    let said = String::from_utf8_lossy(&installed.stdout);
    assert!(
        said.contains("set DATABASE_URL there"),
        "the postinst tells what to do next: {said}"
    );

    // The installed binaries run and tell the packaged version.
    for bin in ["bridge-server", "bridge-agent"] {
        let path = target.join("usr/bin").join(bin);
        let version_line = stdout(Command::new(&path).arg("--version"));
        assert_eq!(version_line.trim(), format!("{bin} {version}"));
        // The unit starts the packaged binary, not one under /usr/local.
        let unit =
            std::fs::read_to_string(target.join(format!("usr/lib/systemd/system/{bin}.service")))
                .unwrap();
        assert!(
            unit.contains(&format!("ExecStart=/usr/bin/{bin} ")),
            "{unit}"
        );
        assert!(!unit.contains("/usr/local/"), "{unit}");
        // A manual page per subcommand, compressed, that man can read.
        let man = target.join("usr/share/man/man1");
        let page = stdout(
            Command::new("gzip")
                .arg("-dc")
                .arg(man.join(format!("{bin}.1.gz"))),
        );
        assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
        assert!(man.join(format!("{bin}-completions.1.gz")).is_file());
        // Completions for the three shells whose packages look in these folders.
        let bash = std::fs::read_to_string(
            target
                .join("usr/share/bash-completion/completions")
                .join(bin),
        )
        .unwrap();
        assert!(bash.contains("complete -F") && bash.contains(bin), "{bash}");
        assert!(
            target
                .join(format!("usr/share/zsh/vendor-completions/_{bin}"))
                .is_file()
        );
        assert!(
            target
                .join(format!("usr/share/fish/vendor_completions.d/{bin}.fish"))
                .is_file()
        );
    }
    let serve_page = stdout(
        Command::new("gzip")
            .arg("-dc")
            .arg(target.join("usr/share/man/man1/bridge-server-serve.1.gz")),
    );
    assert!(serve_page.contains("DATABASE_URL"), "{serve_page}");
    assert!(
        target
            .join("usr/share/man/man1/bridge-agent-run.1.gz")
            .is_file()
    );

    // The server's configuration: made on first install, root-only, with a 32-byte key of its own.
    let conf_path = target.join("etc/bridge-server/bridge-server.env");
    let conf = std::fs::read_to_string(&conf_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&conf_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key = conf
        .lines()
        .find_map(|l| l.strip_prefix("DONGLE_TOKEN_MASTER_KEY_V1=\""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("the postinst writes a key");
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .unwrap()
            .len(),
        32
    );

    // A second install (an upgrade) keeps the configuration and its key.
    run(dpkg(target).arg("-i").arg(&server_deb));
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), conf);

    // Removal takes the binaries; purge takes the configuration, key included.
    run(dpkg(target).args(["--remove", "bridge-server"]));
    assert!(!target.join("usr/bin/bridge-server").exists());
    assert!(conf_path.exists(), "removal keeps the configuration");
    run(dpkg(target).args(["--purge", "bridge-server", "bridge-agent"]));
    assert!(!conf_path.exists(), "purge removes the configuration");
    assert!(!target.join("usr/bin/bridge-agent").exists());
}

#[test]
#[cfg_attr(
    not(feature = "windows-build"),
    ignore = "needs the Windows build of the agent: scripts/test cross-builds it as root and turns on bridge-demo/windows-build"
)]
fn the_windows_zip_holds_the_agent_and_its_scripts() {
    let (root, bin_dir) = paths();
    let exe = std::env::var("BRIDGE_AGENT_EXE").expect("scripts/test sets BRIDGE_AGENT_EXE");
    // scripts/package takes the three binaries from one folder.
    let binaries = tempfile::tempdir().unwrap();
    for bin in ["bridge-server", "bridge-agent"] {
        std::os::unix::fs::symlink(bin_dir.join(bin), binaries.path().join(bin)).unwrap();
    }
    std::os::unix::fs::symlink(&exe, binaries.path().join("bridge-agent.exe")).unwrap();
    let out = tempfile::tempdir().unwrap();
    run(Command::new(root.join("scripts/package"))
        .args(["--arch", "amd64", "--windows", "--fast", "--binaries"])
        .arg(binaries.path())
        .arg("--out")
        .arg(out.path()));
    let version = env!("CARGO_PKG_VERSION");
    let zip = out
        .path()
        .join(format!("bridge-agent-{version}-windows-x86_64.zip"));
    let listing = stdout(
        Command::new("python3")
            .args(["-m", "zipfile", "-l"])
            .arg(&zip),
    );
    let folder = format!("bridge-agent-{version}-windows-x86_64/");
    for file in [
        "bridge-agent.exe",
        "README.txt",
        "install-logon-task.ps1",
        "uninstall-logon-task.ps1",
    ] {
        assert!(
            listing.contains(&format!("{folder}{file}")),
            "{file} missing from the zip:\n{listing}"
        );
    }
    // The packed program is the one built, byte for byte.
    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&zip)
        .arg(unpacked.path()));
    assert_eq!(
        std::fs::read(unpacked.path().join(&folder).join("bridge-agent.exe")).unwrap(),
        std::fs::read(&exe).unwrap()
    );
}

/// The launchd agent definition for macOS (deploy/launchd) is a property list launchd can read (parsed by
/// Python's plistlib, the same format), its label is its file's name, its program is the agent with
/// arguments the agent accepts, and the documented install line leaves no placeholder behind.
#[test]
fn the_launchd_definition_starts_the_agent_with_arguments_it_accepts() {
    let (root, bin_dir) = paths();
    let plist = root.join("deploy/launchd/org.canbridge.bridge-agent.plist");
    let parsed = stdout(Command::new("python3").args([
        "-c",
        "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))",
        plist.to_str().unwrap(),
    ]));
    let parsed: serde_json::Value = serde_json::from_str(&parsed).unwrap();
    assert_eq!(parsed["Label"], "org.canbridge.bridge-agent", "{parsed}");
    assert_eq!(parsed["KeepAlive"], true, "{parsed}");
    let args: Vec<&str> = parsed["ProgramArguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "/usr/local/bin/bridge-agent", "{parsed}");
    run(Command::new(bin_dir.join("bridge-agent"))
        .args(&args[1..])
        .arg("--help"));

    let installed = stdout(
        Command::new("sed")
            .arg("s|__HOME__|/Users/tech|g")
            .arg(&plist),
    );
    assert!(!installed.contains("__HOME__"));
    assert!(installed.contains("<string>/Users/tech/Library/Logs/bridge-agent.log</string>"));
}

/// The agent's arm64 package, for ARM rigs (a Raspberry Pi-class board next to the dongles): built by
/// `scripts/package --arch arm64 --only bridge-agent` from the arm64 build of this run, it holds an arm64
/// binary, installs with dpkg (its maintainer scripts included), and the installed agent runs under
/// qemu-user and tells the workspace's version.
#[test]
#[cfg_attr(
    not(feature = "aarch64-build"),
    ignore = "needs the arm64 build of the agent and qemu-user: scripts/test provides both as root and turns on bridge-demo/aarch64-build"
)]
fn the_arm64_agent_package_installs_and_runs_under_qemu_user() {
    let (root, _) = paths();
    let agent = PathBuf::from(std::env::var("BRIDGE_AGENT_AARCH64").expect("set by scripts/test"));
    let qemu = std::env::var("QEMU_AARCH64").expect("set by scripts/test");
    let out = tempfile::tempdir().unwrap();
    run(Command::new(root.join("scripts/package"))
        .args(["--arch", "arm64", "--only", "bridge-agent", "--no-windows"])
        .args(["--fast", "--binaries"])
        .arg(agent.parent().unwrap())
        .arg("--out")
        .arg(out.path())
        .env("QEMU_AARCH64", &qemu));
    let version = env!("CARGO_PKG_VERSION");
    let debs: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(debs, vec![format!("bridge-agent_{version}_arm64.deb")]);
    let deb = out.path().join(&debs[0]);
    let info = stdout(Command::new("dpkg-deb").arg("--field").arg(&deb));
    assert!(info.contains("Architecture: arm64"), "{info}");

    let target = tempfile::tempdir().unwrap();
    let target = target.path();
    dpkg_root(target);
    // This root's dpkg is amd64's, so the arm64 package is installed as foreign.
    run(dpkg(target).arg("--force-architecture").arg("-i").arg(&deb));
    let installed = target.join("usr/bin/bridge-agent");
    // An ELF for the 64-bit ARM architecture (e_machine 183, at offset 18).
    let elf = std::fs::read(&installed).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183, "not arm64");
    assert_needs_only_libc(
        &installed,
        "aarch64-linux-gnu-objdump",
        "ld-linux-aarch64.so.1",
    );
    let version_line = stdout(
        Command::new(&qemu)
            .arg(&installed)
            .arg("--version")
            .env("QEMU_LD_PREFIX", "/usr/aarch64-linux-gnu"),
    );
    assert_eq!(version_line.trim(), format!("bridge-agent {version}"));
    assert!(
        target
            .join("usr/share/man/man1/bridge-agent-run.1.gz")
            .is_file(),
        "the manual pages, made by the arm64 binary under qemu-user"
    );
    run(dpkg(target).args(["--purge", "bridge-agent"]));
    assert!(!installed.exists());
}
