//! The runtime: starts the tasks of one simulated dongle and hands back a [`SimHandle`].
//!
//! Tasks, each ending when the handle shuts down (or is dropped):
//! - the link (pseudo-terminal or UDP), which feeds packets to the dongle and sends its queue;
//! - the bus receiver and sender, when a bus is joined;
//! - the traffic source (generator or replay), when configured;
//! - a ticker that closes expired pairing windows;
//! - the flash writer, which writes the latest flash snapshot after each change, and once more
//!   at shutdown if a change is pending.
//!
//! The dongle core sits behind a `std::sync::Mutex` that is only held for pure computation,
//! never across an await. Queues are bounded: the host queue holds [`HOST_QUEUE`] packets and
//! the bus queue [`BUS_QUEUE`] frames; what does not fit is dropped and counted
//! (`lost_to_host`, `BusStats::queue_full`). Before the bus queue, the dongle's own frames pass its
//! transmitter ([`crate::transmitter`]), which lets them onto the bus one frame time after another
//! and drops (`BusStats::tx_queue_full`) what finds its queue full, as the firmware does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use firmware_proto::ids::{CanId, DeviceId};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bus::{BusError, Endpoint};
use crate::event::SimEvent;
use crate::faults::Faults;
use crate::frame::Frame;
use crate::link::pty::Pty;
use crate::link::udp::UdpLink;
use crate::shared::Dongle;
use crate::state::{Flash, StateError, StateFile, unix_ms};
use crate::traffic::{CandumpLog, Generator, GeneratorConfig, LogError};
use crate::transmitter::Transmitter;
use dongle_core::{Counters, DongleConfig, Extensions};

/// Packets queued for the host at most.
pub const HOST_QUEUE: usize = 1024;
/// Frames queued for the bus at most.
pub const BUS_QUEUE: usize = 4096;
/// Events buffered for slow subscribers.
pub const EVENT_BUFFER: usize = 1024;

/// Where the dongle talks to its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkConfig {
    /// A pseudo-terminal; `link` is an optional stable symlink to it.
    Serial {
        /// The symlink to keep pointing at the current terminal.
        link: Option<PathBuf>,
    },
    /// UDP: REMP on `addr` (port 0: any free port), discovery on `discovery_port` of the same IP.
    Udp {
        /// The REMP address.
        addr: SocketAddr,
        /// The discovery port (0: any free port).
        discovery_port: u16,
    },
}

/// Everything a simulator is started with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The state file (the dongle's flash).
    pub state_path: PathBuf,
    /// The device id for a new state file (random when `None`).
    pub device_id: Option<DeviceId>,
    /// The host link.
    pub link: LinkConfig,
    /// The virtual bus to join.
    pub bus: Option<String>,
    /// The folder holding bus folders (default [`crate::bus::default_root`]).
    pub bus_root: Option<PathBuf>,
    /// The extensions spoken.
    pub extensions: Extensions,
    /// Announce CAN FD (FDCAN ranges, FD frames in batches).
    pub fd: bool,
    /// Generate this many frames per second.
    pub generate: Option<f64>,
    /// The identifier of generated frames.
    pub generate_id: Option<CanId>,
    /// Replay this `candump -L` log.
    pub replay: Option<PathBuf>,
    /// Replay speed factor (2.0 plays twice as fast).
    pub replay_speed: f64,
    /// Faults injected from the start.
    pub faults: Faults,
    /// The pairing window.
    pub pairing_window: Duration,
    /// The cool-down after five wrong PINs.
    pub cooldown: Duration,
    /// The CLI's command time limit.
    pub cli_timeout: Duration,
    /// The CLI's output limit in bytes.
    pub cli_output_limit: usize,
    /// Frames to the bus leave as fast as they come instead of one frame time after another through
    /// a transmit queue of [`crate::transmitter::TX_QUEUE`] frames. For benchmarks of the software
    /// path, whose rates no real bus carries.
    pub unlimited_bus: bool,
}

impl SimConfig {
    /// A serial (pseudo-terminal) dongle with defaults.
    pub fn serial(state_path: impl Into<PathBuf>) -> Self {
        Self::new(state_path.into(), LinkConfig::Serial { link: None })
    }

    /// A UDP dongle on 127.0.0.1 with free ports.
    pub fn udp(state_path: impl Into<PathBuf>) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::new(
            state_path.into(),
            LinkConfig::Udp {
                addr,
                discovery_port: 0,
            },
        )
    }

    fn new(state_path: PathBuf, link: LinkConfig) -> Self {
        let defaults = DongleConfig::default();
        Self {
            state_path,
            device_id: None,
            link,
            bus: None,
            bus_root: None,
            extensions: Extensions::NONE,
            fd: false,
            generate: None,
            generate_id: None,
            replay: None,
            replay_speed: 1.0,
            faults: Faults::default(),
            pairing_window: defaults.pairing_window,
            cooldown: defaults.cooldown,
            cli_timeout: defaults.cli_timeout,
            cli_output_limit: defaults.cli_output_limit,
            unlimited_bus: false,
        }
    }

    /// Joins bus `name`.
    pub fn with_bus(mut self, name: impl Into<String>) -> Self {
        self.bus = Some(name.into());
        self
    }

    /// Speaks these extensions.
    pub fn with_extensions(mut self, extensions: Extensions) -> Self {
        self.extensions = extensions;
        self
    }
}

/// Why a simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// The bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The replay log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A socket or terminal.
    #[error("{what}: {source}")]
    Io {
        /// What was being opened.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
}

pub use crate::shared::{BusStats, LinkStats};
use crate::shared::{Shared, lock};

/// A snapshot of every counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// The dongle's counters.
    pub dongle: Counters,
    /// The host link's counters.
    pub link: LinkStats,
    /// The bus counters.
    pub bus: BusStats,
}

/// Starts simulators.
#[derive(Debug)]
pub struct Simulator;

/// Controls a running simulator. Dropping it stops the simulator (without waiting); prefer
/// [`SimHandle::shutdown`], which also waits for the last state file write.
pub struct SimHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    flash_stop: Option<oneshot::Sender<()>>,
    flash_task: Option<JoinHandle<()>>,
    garbage_tx: mpsc::Sender<usize>,
    device_id: DeviceId,
    udp_addr: Option<SocketAddr>,
    discovery_addr: Option<SocketAddr>,
    link_path: Option<PathBuf>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("device_id", &self.device_id)
            .field("serial_path", &self.serial_path())
            .field("udp_addr", &self.udp_addr)
            .finish()
    }
}

impl Simulator {
    /// Starts a simulator on the current tokio runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        check(&config)?;
        let flash = Flash::load_or_create(&config.state_path, config.device_id)?;
        let device_id = flash.device_id;
        let replay = config.replay.as_deref().map(CandumpLog::read).transpose()?;
        let endpoint = match &config.bus {
            Some(name) => {
                let root = config
                    .bus_root
                    .clone()
                    .unwrap_or_else(crate::bus::default_root);
                Some(Endpoint::bind(&root, name)?)
            }
            None => None,
        };

        let dongle_config = DongleConfig {
            extensions: config.extensions,
            fd: config.fd,
            pairing_window: config.pairing_window,
            cooldown: config.cooldown,
            cli_timeout: config.cli_timeout,
            cli_output_limit: config.cli_output_limit,
            ..DongleConfig::default()
        };
        // A fresh ChaCha generator per dongle, seeded from the operating system: PINs and nonces must
        // not be guessable.
        let rng = <rand::rngs::StdRng as rand::SeedableRng>::from_rng(&mut rand::rng());
        let mut dongle = Dongle::new(dongle_config, flash.clone(), Instant::now(), unix_ms(), rng);

        // Open the link first, so that an error surfaces here rather than in a task.
        enum Opened {
            Serial(Pty, Option<PathBuf>),
            Udp(UdpLink),
        }
        let (opened, udp_addr, discovery_addr) = match &config.link {
            LinkConfig::Serial { link } => {
                let pty = Pty::open().map_err(|source| SimError::Io {
                    what: "opening a pseudo-terminal".into(),
                    source,
                })?;
                (Opened::Serial(pty, link.clone()), None, None)
            }
            LinkConfig::Udp {
                addr,
                discovery_port,
            } => {
                let link = UdpLink::bind(*addr, *discovery_port)
                    .await
                    .map_err(|source| SimError::Io {
                        what: format!("binding UDP on {addr}"),
                        source,
                    })?;
                let io = |source| SimError::Io {
                    what: "reading a socket address".into(),
                    source,
                };
                let remp = link.remp.local_addr().map_err(io)?;
                let disc = link.discovery.local_addr().map_err(io)?;
                let lan_ip = match remp.ip() {
                    std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip.octets()),
                    _ => None,
                };
                dongle.set_link(&format!("udp {remp} discovery {disc}"), remp.port(), lan_ip);
                (Opened::Udp(link), Some(remp), Some(disc))
            }
        };

        let (host_tx, host_rx) = mpsc::channel(HOST_QUEUE);
        let (garbage_tx, garbage_rx) = mpsc::channel(16);
        let (bus_tx, bus_rx) = match endpoint {
            Some(_) => {
                let (tx, rx) = mpsc::channel::<(Frame, Instant)>(BUS_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (flash_tx, flash_rx) = watch::channel(flash);
        let shared = Arc::new(Shared {
            core: Mutex::new(dongle),
            host_tx,
            bus_tx,
            events,
            flash_tx,
            faults: Mutex::new(config.faults),
            link_stats: Mutex::new(LinkStats::default()),
            bus_stats: Mutex::new(BusStats::default()),
            transmitter: (!config.unlimited_bus).then(|| Mutex::new(Transmitter::default())),
            epoch: AtomicU64::new(0),
            plugged: watch::channel(true).0,
            link_up: watch::channel(false).0,
            serial_path: watch::channel(None).0,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let link_path = match &opened {
            Opened::Serial(_, link) => link.clone(),
            Opened::Udp(_) => None,
        };
        let mut link_up = shared.link_up.subscribe();
        match opened {
            Opened::Serial(pty, link) => tasks.push(tokio::spawn(crate::link::pty::run(
                Arc::clone(&shared),
                Some(pty),
                link,
                host_rx,
                garbage_rx,
                shutdown_rx.clone(),
            ))),
            Opened::Udp(link) => tasks.push(tokio::spawn(crate::link::udp::run(
                Arc::clone(&shared),
                link,
                host_rx,
                garbage_rx,
                shutdown_rx.clone(),
            ))),
        }
        // The handle promises a usable link: wait for the task to report it up.
        let _ = tokio::time::timeout(Duration::from_secs(5), link_up.wait_for(|&up| up)).await;

        if let (Some(endpoint), Some(bus_rx)) = (endpoint, bus_rx) {
            let endpoint = Arc::new(endpoint);
            tasks.push(tokio::spawn(bus_receiver(
                Arc::clone(&shared),
                Arc::clone(&endpoint),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(bus_sender(
                Arc::clone(&shared),
                endpoint,
                bus_rx,
                shutdown_rx.clone(),
            )));
        }
        if let Some(rate) = config.generate {
            let id = match config.generate_id {
                Some(id) => id,
                None => CanId::standard(crate::traffic::GENERATOR_ID)
                    .map_err(|_| SimError::Config("generator id".into()))?,
            };
            let generator = Generator::new(GeneratorConfig {
                rate,
                fd: config.fd,
                id,
            });
            tasks.push(tokio::spawn(generate(
                Arc::clone(&shared),
                generator,
                rate,
                shutdown_rx.clone(),
            )));
        }
        if let Some(log) = replay {
            tasks.push(tokio::spawn(replay_log(
                Arc::clone(&shared),
                log,
                config.replay_speed,
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(ticker(
            Arc::clone(&shared),
            shutdown_rx.clone(),
        )));
        let (flash_stop, flash_stop_rx) = oneshot::channel();
        let flash_task = tokio::spawn(flash_writer(
            Arc::clone(&shared),
            config.state_path.clone(),
            flash_rx,
            flash_stop_rx,
        ));

        Ok(SimHandle {
            shared,
            shutdown,
            tasks,
            flash_stop: Some(flash_stop),
            flash_task: Some(flash_task),
            garbage_tx,
            device_id,
            udp_addr,
            discovery_addr,
            link_path,
        })
    }
}

fn check(config: &SimConfig) -> Result<(), SimError> {
    if let Some(rate) = config.generate
        && !(rate > 0.0 && rate <= 1_000_000.0)
    {
        return Err(SimError::Config(
            "the generator rate must be above 0 and at most 1000000 frames/s".into(),
        ));
    }
    if !(config.replay_speed > 0.0 && config.replay_speed <= 1000.0) {
        return Err(SimError::Config(
            "the replay speed must be above 0 and at most 1000".into(),
        ));
    }
    if config.faults.corrupt_pct > 100 || config.faults.drop_pct > 100 {
        return Err(SimError::Config("fault percentages must be 0..=100".into()));
    }
    Ok(())
}

impl SimHandle {
    /// The current pseudo-terminal path (serial, while plugged in).
    pub fn serial_path(&self) -> Option<PathBuf> {
        self.shared.serial_path.borrow().clone()
    }

    /// The stable symlink to the pseudo-terminal, if one was asked for.
    pub fn link_path(&self) -> Option<&std::path::Path> {
        self.link_path.as_deref()
    }

    /// The REMP address (UDP).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    /// The discovery address (UDP).
    pub fn discovery_addr(&self) -> Option<SocketAddr> {
        self.discovery_addr
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        self.device_id
    }

    /// Subscribes to events (PIN shown, paired, refused packets, unplugged, ...).
    pub fn events(&self) -> broadcast::Receiver<SimEvent> {
        self.shared.events.subscribe()
    }

    /// Unplugs the dongle: the pseudo-terminal closes (or UDP goes silent) and RAM state is
    /// lost. Returns once the link is down.
    pub async fn unplug(&self) {
        let mut up = self.shared.link_up.subscribe();
        self.shared.plugged.send_replace(false);
        let _ = tokio::time::timeout(Duration::from_secs(5), up.wait_for(|&u| !u)).await;
    }

    /// Plugs the dongle back in: a new pseudo-terminal (the `link` symlink follows it), or UDP
    /// answering again. Returns the new terminal path on serial, once the link is up.
    pub async fn replug(&self) -> Option<PathBuf> {
        let mut up = self.shared.link_up.subscribe();
        self.shared.plugged.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), up.wait_for(|&u| u)).await;
        self.serial_path()
    }

    /// Presses the factory-reset button: token, pairing state, cool-down and CAN configuration
    /// are erased (the device id stays).
    pub fn factory_reset(&self) {
        self.shared.with_core(|core, out| core.factory_reset(out));
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// The injected faults.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Sends one burst of `len` garbage bytes to the host now.
    pub fn inject_garbage(&self, len: usize) {
        let _ = self.garbage_tx.try_send(len);
    }

    /// Runs a command as if typed on the dongle's UART console; a claimed dongle reports it to its host
    /// (CLI_TELEMETRY). The outcome comes as [`Event::UartAnswered`](crate::Event) in a
    /// [`SimEvent::Dongle`].
    pub fn uart_command(&self, command: &str) {
        self.shared
            .with_core(|core, out| core.uart_command(Instant::now(), command, out));
    }

    /// Delivers frames as if the dongle had received them from its bus.
    pub fn inject_bus_frames(&self, frames: &[Frame]) {
        self.shared
            .with_core(|core, out| core.on_bus_frames(Instant::now(), frames, out));
    }

    /// A copy of the flash.
    pub fn flash(&self) -> Flash {
        lock(&self.shared.core).flash().clone()
    }

    /// Every counter.
    pub fn stats(&self) -> SimStats {
        SimStats {
            dongle: lock(&self.shared.core).counters(),
            link: *lock(&self.shared.link_stats),
            bus: *lock(&self.shared.bus_stats),
        }
    }

    /// Stops every task, writes the state file one last time if needed, and waits.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        if let Some(stop) = self.flash_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.flash_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(stop) = self.flash_stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn bus_receiver(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pending = std::collections::VecDeque::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            received = endpoint.recv(&mut pending) => {
                if received.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let frames: Vec<Frame> = pending.drain(..).collect();
                if frames.is_empty() {
                    continue;
                }
                lock(&shared.bus_stats).received += frames.len() as u64;
                shared.with_core(|core, out| core.on_bus_frames(Instant::now(), &frames, out));
            }
        }
    }
}

/// The resolution of tokio's timers.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

async fn bus_sender(
    shared: Arc<Shared>,
    endpoint: Arc<Endpoint>,
    mut frames_rx: mpsc::Receiver<(Frame, Instant)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut peers = endpoint.peers();
    // Frames taken from the queue whose time on the bus has not come yet, in order.
    let mut held: std::collections::VecDeque<(Frame, Instant)> = Default::default();
    loop {
        if held.is_empty() {
            tokio::select! {
                _ = shutdown.changed() => return,
                next = frames_rx.recv() => match next {
                    Some(frame) => held.push_back(frame),
                    None => return,
                },
            }
        }
        while held.len() < 256 {
            match frames_rx.try_recv() {
                Ok(frame) => held.push_back(frame),
                Err(_) => break,
            }
        }
        // A frame reaches the other members once it has left the transmitter, as on a real bus. tokio's
        // timers round up to the next millisecond, so a frame due sooner than that goes at once: a sleep
        // would hold it longer than the bus does.
        if let Some(&(_, at)) = held.front()
            && at > Instant::now() + TIMER_RESOLUTION
        {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(at) => {}
            }
        }
        let soon = Instant::now() + TIMER_RESOLUTION;
        let due = held.iter().take_while(|(_, at)| *at <= soon).count();
        let frames: Vec<Frame> = held.drain(..due).map(|(frame, _)| frame).collect();
        let report = peers.send(&frames).await;
        let mut stats = lock(&shared.bus_stats);
        stats.sent += frames.len() as u64;
        stats.lost += report.lost as u64;
    }
}

async fn generate(
    shared: Arc<Shared>,
    mut generator: Generator,
    rate: f64,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = generator.interval().max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut made: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {
                // Frames due by now, so that rates above 1000/s come out in small groups
                // per millisecond tick; at most 256 per tick keeps each step bounded.
                let due = (start.elapsed().as_secs_f64() * rate) as u64 + 1;
                let n = due.saturating_sub(made).min(256);
                if n == 0 {
                    continue;
                }
                made += n;
                let frames: Vec<Frame> = (0..n).map(|_| generator.next_frame()).collect();
                shared.deliver_local(&frames);
            }
        }
    }
}

async fn replay_log(
    shared: Arc<Shared>,
    log: CandumpLog,
    speed: f64,
    mut shutdown: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let mut index = 0;
    while index < log.entries.len() {
        let Some(entry) = log.entries.get(index) else {
            break;
        };
        let due = start + entry.offset.div_f64(speed);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        // Every frame due by now goes out in one step, in log order.
        let now = Instant::now();
        let mut frames = Vec::new();
        while let Some(entry) = log.entries.get(index) {
            if start + entry.offset.div_f64(speed) > now {
                break;
            }
            frames.push(entry.frame.with_origin(true, false));
            index += 1;
        }
        shared.deliver_local(&frames);
    }
    shared.event(SimEvent::ReplayFinished {
        frames: log.entries.len(),
        skipped_remote: log.skipped_remote,
    });
}

async fn ticker(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = interval.tick() => shared.with_core(|core, out| core.tick(Instant::now(), out)),
        }
    }
}

async fn flash_writer(
    shared: Arc<Shared>,
    path: PathBuf,
    mut flash_rx: watch::Receiver<Flash>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let stopping = tokio::select! {
            changed = flash_rx.changed() => changed.is_err(),
            _ = &mut stop => true,
        };
        if stopping && !flash_rx.has_changed().unwrap_or(false) {
            return;
        }
        let snapshot = flash_rx.borrow_and_update().clone();
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || snapshot.save(&target)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => shared.event(SimEvent::FlashWriteFailed {
                error: e.to_string(),
            }),
            Err(e) => shared.event(SimEvent::FlashWriteFailed {
                error: e.to_string(),
            }),
        }
        if stopping {
            return;
        }
    }
}
