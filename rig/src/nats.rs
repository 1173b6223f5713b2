//! A throwaway `nats-server` with JetStream for the demo, the benchmarks and the tests: one node, or a
//! cluster of several on 127.0.0.1, each with its store in a folder of its own. Each node is stopped
//! (killed) when its handle is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a node may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `nats-server` binary: `BRIDGE_NATS_SERVER`, else `nats-server` on the PATH (Debian installs it in
/// /usr/sbin, which an ordinary user's PATH may lack).
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("BRIDGE_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// A free TCP port on 127.0.0.1 (free when asked; the node takes it a moment later).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One running node.
pub struct NatsNode {
    child: Child,
    /// The port clients connect to.
    pub port: u16,
    /// The port the cluster's routes use (clustered nodes only).
    pub cluster_port: Option<u16>,
    pub name: String,
    args: Vec<String>,
    bin: PathBuf,
    log: PathBuf,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("could not create {}", log.display()))?;
        Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("could not run {}", bin.display()))
    }

    /// Waits until the node accepts client connections.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("nats-server {} exited ({status}):\n{log}", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server {} did not accept connections within {START_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the node at once, as a crash would; its store stays for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again on the same ports and store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = Self::spawn(&self.bin, &self.args, &self.log)?;
        self.wait_ready()
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single node with JetStream, its store under `dir`.
pub fn start(dir: &Path) -> anyhow::Result<NatsNode> {
    let mut nodes = start_cluster(dir, 1)?;
    Ok(nodes.remove(0))
}

/// `n` nodes with JetStream on 127.0.0.1; with more than one, a cluster (named `bridge`) whose nodes
/// route to each other. Their stores are under `dir`.
pub fn start_cluster(dir: &Path, n: usize) -> anyhow::Result<Vec<NatsNode>> {
    let bin = binary().context(
        "nats-server is not installed (Debian: apt-get install nats-server), or set BRIDGE_NATS_SERVER to its path",
    )?;
    let ports: Vec<(u16, u16)> = (0..n.max(1))
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let routes = ports
        .iter()
        .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::with_capacity(ports.len());
    for (i, (port, cluster_port)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let store = dir.join(format!("nats-{name}"));
        std::fs::create_dir_all(&store)
            .with_context(|| format!("could not create {}", store.display()))?;
        let mut args: Vec<String> = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            &store.display().to_string(),
            "-n",
            &name,
        ]
        .map(String::from)
        .to_vec();
        let clustered = ports.len() > 1;
        if clustered {
            args.extend(
                [
                    "--cluster_name",
                    "bridge",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes",
                    &routes,
                ]
                .map(String::from),
            );
        }
        let log = dir.join(format!("nats-{name}.log"));
        let child = NatsNode::spawn(&bin, &args, &log)?;
        nodes.push(NatsNode {
            child,
            port: *port,
            cluster_port: clustered.then_some(*cluster_port),
            name,
            args,
            bin: bin.clone(),
            log,
        });
    }
    for node in &mut nodes {
        node.wait_ready()?;
    }
    Ok(nodes)
}

/// The URL a client gives to reach any node of `nodes`.
pub fn cluster_url(nodes: &[NatsNode]) -> String {
    nodes
        .iter()
        .map(NatsNode::url)
        .collect::<Vec<_>>()
        .join(",")
}
