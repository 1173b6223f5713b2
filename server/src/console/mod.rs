//! The live console (SPEC 3.9): per-dongle and per-group event streams with strictly increasing ids, a
//! ring buffer to resume from, and sampling of CAN frames above a rate.
//!
//! Producers (the relay, a dongle's own traffic through `monitor`, commands, presence, frames sent by
//! hand) call [`Console::publish`]; the SSE routes (`routes::streams`) subscribe. A subscriber that comes back with `Last-Event-ID` gets every
//! event after it from the ring (the last [`RING_EVENTS`] events or [`RING_AGE`], whichever is fewer), or
//! a `stream_reset` when that id is older than the ring holds, and then the live events.
//!
//! Ids start at the stream's creation time in microseconds since the Unix epoch and count up by one, so
//! they keep increasing across a server restart (an id from before the restart is simply too old, and
//! its client gets `stream_reset`).
//!
//! Events are published where they happen (the relay runs on the instance holding the data
//! connections, a command's status where the command changes). When several instances share one
//! database, [`peers`] carries the events of a stream to the other instances whose clients watch it, so
//! a client sees a stream's events whichever instance it reached. Everything that must not be lost
//! (frames, command results) lives in PostgreSQL, not here: the console is a view.

pub mod bus_load;
pub mod peers;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use uuid::Uuid;

/// The most events a stream's ring keeps.
pub const RING_EVENTS: usize = 10_000;
/// The oldest event a stream's ring keeps.
pub const RING_AGE: Duration = Duration::from_secs(60);
/// How many events may wait for a slow subscriber before it lags (and is told to reset).
const SUBSCRIBER_QUEUE: usize = 1024;

/// Which stream an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKey {
    Dongle(Uuid),
    Group(Uuid),
}

/// An event of the console, as its `data:` line carries it (the `event:` line is its `type`). It is read
/// back only from another instance of this server ([`peers`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConsoleEvent {
    /// A dongle's agent went online or offline, or the dongle was plugged in or out: `agent_id` is the
    /// agent concerned, `seen_at` when the server noticed (RFC 3339).
    Presence {
        dongle_id: Uuid,
        online: bool,
        agent_id: Uuid,
        seen_at: String,
    },
    /// A CAN frame: `rx` from the dongle's bus, `tx` onto it (the fields of v0.7 section 18.4; build one
    /// with [`ConsoleEvent::can_frame`]). `sampled` is N when this stream shows one frame in N.
    CanFrame {
        dongle_id: Uuid,
        /// When the server got the frame (RFC 3339 with microseconds, UTC).
        ts: String,
        /// The dongle's own microsecond clock when it saw the frame, where its link carries one (the
        /// batch extension): for intervals between frames, not a time of day.
        #[serde(skip_serializing_if = "Option::is_none")]
        dongle_ts_us: Option<u64>,
        #[serde(deserialize_with = "known_word")]
        direction: Word,
        /// The dongle's CAN channel: 0, since a dongle has one.
        bus: u8,
        /// The identifier as v0.7 shows it: `0x` and 3 upper-case hex digits (standard) or 8
        /// (extended).
        id: String,
        /// The identifier as a number.
        can_id: u32,
        is_extended: bool,
        /// A CAN FD frame.
        fd: bool,
        /// The data length code (the length itself up to 8; FD lengths have their codes 9 to 15).
        dlc: u8,
        data_hex: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        sampled: Option<u32>,
    },
    /// Something people should read.
    Log {
        #[serde(deserialize_with = "known_word")]
        level: Word,
        message: String,
    },
    /// A command changed state.
    CommandStatus {
        dongle_id: Uuid,
        command_id: Uuid,
        status: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
    /// A command ran on the dongle: typed on its UART console (`source` `uart`) or sent through the
    /// API (`remote`); `at` is when the server recorded it (RFC 3339).
    CliTelemetry {
        dongle_id: Uuid,
        #[serde(deserialize_with = "known_word")]
        source: Word,
        command: String,
        output: String,
        exit_code: Option<i32>,
        truncated: bool,
        error: bool,
        at: String,
    },
    /// A piece of a running host command's output (`host_commands`), as the agent streams it.
    HostOutput {
        dongle_id: Uuid,
        run_id: Uuid,
        chunk: String,
    },
    /// How busy the dongle's bus is, every few seconds while its console is open: frames per second
    /// seen on it (both directions), and the estimated share of the bus in percent at its configured
    /// `bitrate` (absent while no CAN configuration was applied).
    BusLoad {
        dongle_id: Uuid,
        frames_per_sec: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        load_percent: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        bitrate: Option<u32>,
    },
    /// A group's state or backlog changed.
    GroupState { group_id: Uuid, detail: Value },
    /// The `Last-Event-ID` was older than the ring: events were missed; what follows is live.
    StreamReset { reason: String },
    /// The last event of a stream whose caller lost access (signed out, unpaired, token revoked...).
    AccessEnded { reason: String },
}

/// The words the console's events hold in `&'static str` fields (a direction, a log level, a command's
/// source), for reading an event another instance sent.
const KNOWN_WORDS: &[&str] = &[
    "rx", "tx", "info", "warning", "warn", "error", "debug", "uart", "remote", "host",
];

/// One of [`KNOWN_WORDS`]. A name of its own, because serde takes a field written `&str` to borrow from
/// its input, which an event read from a notification cannot.
pub type Word = &'static str;

fn known_word<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let word = String::deserialize(d)?;
    KNOWN_WORDS
        .iter()
        .find(|w| **w == word)
        .copied()
        .ok_or_else(|| serde::de::Error::custom("a word this console does not use"))
}

/// A time as the console's events carry it: RFC 3339, UTC, microseconds.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// One CAN frame for [`ConsoleEvent::can_frame`].
#[derive(Debug, Clone, Copy)]
pub struct FrameView<'a> {
    pub can_id: u32,
    pub is_extended: bool,
    pub fd: bool,
    pub data: &'a [u8],
    /// The dongle's microsecond clock, 0 when its link carries none.
    pub dongle_ts_us: u64,
}

impl<'a> From<&firmware_proto::ext::batch::CanRecord<'a>> for FrameView<'a> {
    fn from(r: &firmware_proto::ext::batch::CanRecord<'a>) -> Self {
        Self {
            can_id: r.id.raw(),
            is_extended: r.id.is_extended(),
            fd: r.is_fd(),
            data: r.data,
            dongle_ts_us: r.timestamp_us,
        }
    }
}

impl ConsoleEvent {
    /// A `can_frame` event of `dongle_id`, in `direction` (`rx` or `tx`), got at `ts` ([`timestamp`]).
    pub fn can_frame(
        dongle_id: Uuid,
        direction: &'static str,
        ts: &str,
        frame: FrameView<'_>,
        sampled: Option<u32>,
    ) -> Self {
        let len = u8::try_from(frame.data.len()).unwrap_or(u8::MAX);
        let id = if frame.is_extended {
            format!("0x{:08X}", frame.can_id)
        } else {
            format!("0x{:03X}", frame.can_id)
        };
        Self::CanFrame {
            dongle_id,
            ts: ts.to_string(),
            dongle_ts_us: (frame.dongle_ts_us != 0).then_some(frame.dongle_ts_us),
            direction,
            bus: 0,
            id,
            can_id: frame.can_id,
            is_extended: frame.is_extended,
            fd: frame.fd,
            dlc: firmware_proto::ext::batch::len_to_dlc(len).unwrap_or(len),
            data_hex: hex::encode(frame.data),
            sampled,
        }
    }

    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Presence { .. } => "presence",
            Self::CanFrame { .. } => "can_frame",
            Self::Log { .. } => "log",
            Self::CommandStatus { .. } => "command_status",
            Self::CliTelemetry { .. } => "cli_telemetry",
            Self::BusLoad { .. } => "bus_load",
            Self::HostOutput { .. } => "host_output",
            Self::GroupState { .. } => "group_state",
            Self::StreamReset { .. } => "stream_reset",
            Self::AccessEnded { .. } => "access_ended",
        }
    }
}

/// An event with its id, as stored and sent.
#[derive(Debug)]
pub struct Stored {
    pub id: u64,
    at: Instant,
    pub event: ConsoleEvent,
}

struct Stream {
    next_id: u64,
    ring: VecDeque<Arc<Stored>>,
    tx: broadcast::Sender<Arc<Stored>>,
    /// CAN frames published in the current one-second window, and when it began.
    window_start: Instant,
    window_frames: u32,
    /// One frame in `sample` is shown (1: all), decided from the previous window.
    sample: u32,
    skipped: u32,
}

impl Stream {
    fn new() -> Self {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self {
            next_id: now_us.max(1),
            ring: VecDeque::new(),
            tx: broadcast::channel(SUBSCRIBER_QUEUE).0,
            window_start: Instant::now(),
            window_frames: 0,
            sample: 1,
            skipped: 0,
        }
    }

    /// Counts one CAN frame in the rate window ending at `now` and says whether it is shown: None when
    /// the sampling skips it, else the sample size to mark it with (None: every frame is shown). A
    /// window that ends decides the next one's sampling and says so with a `log` event when it changes.
    fn admit_frame(&mut self, now: Instant, limit: u32, out: Outlet<'_>) -> Option<Option<u32>> {
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            let seen = self.window_frames;
            let sample = seen.div_ceil(limit).max(1);
            self.window_start = now;
            self.window_frames = 0;
            if sample != self.sample {
                self.sample = sample;
                let message = if sample > 1 {
                    format!(
                        "{seen} frames/s is more than this console shows: 1 frame in {sample} \
                         from now on (the data plane carries every frame)"
                    )
                } else {
                    "the console shows every frame again".to_string()
                };
                self.push(
                    ConsoleEvent::Log {
                        level: "info",
                        message,
                    },
                    out,
                );
            }
        }
        self.window_frames = self.window_frames.saturating_add(1);
        if self.sample > 1 {
            self.skipped += 1;
            if self.skipped < self.sample {
                return None;
            }
            self.skipped = 0;
            return Some(Some(self.sample));
        }
        Some(None)
    }

    /// Adds `event` to the ring, sends it to the subscribers, and hands it to `out` for other instances.
    fn push(&mut self, event: ConsoleEvent, out: Outlet<'_>) {
        let now = Instant::now();
        let stored = Arc::new(Stored {
            id: self.next_id,
            at: now,
            event,
        });
        self.next_id += 1;
        self.ring.push_back(stored.clone());
        while self.ring.len() > RING_EVENTS
            || self
                .ring
                .front()
                .is_some_and(|e| now.duration_since(e.at) > RING_AGE)
        {
            self.ring.pop_front();
        }
        if let Some((key, forward)) = out {
            forward.offer(key, &stored);
        }
        // No subscriber is fine: the ring keeps the event for one that resumes.
        let _ = self.tx.send(stored);
    }
}

/// Where a pushed event also goes: the stream's key and the forwarding to other instances, or None for
/// an event that came from another instance (it is never sent on again) or when nothing is forwarded.
type Outlet<'a> = Option<(StreamKey, &'a Forward)>;

/// An event for the instances that watch its stream ([`peers`]).
#[derive(Debug)]
pub struct Outgoing {
    pub key: StreamKey,
    pub stored: Arc<Stored>,
}

/// The forwarding of events to other instances: which streams they watch, and the queue to the task
/// that sends them.
struct Forward {
    /// The streams that clients of other instances watch now.
    wanted: std::collections::HashSet<StreamKey>,
    tx: mpsc::Sender<Outgoing>,
}

impl Forward {
    fn offer(&self, key: StreamKey, stored: &Arc<Stored>) {
        // A `bus_load` is each instance's own: the instances share the counts it is made of instead
        // (`peers`), and one forwarded would reach the other's clients beside their own.
        if !self.wanted.contains(&key) || matches!(stored.event, ConsoleEvent::BusLoad { .. }) {
            return;
        }
        if self
            .tx
            .try_send(Outgoing {
                key,
                stored: stored.clone(),
            })
            .is_err()
        {
            // The sending task is behind (the database is slow): the other instances' views miss this
            // event, which is counted; this instance's subscribers still get it.
            metrics::counter!("console_forward_dropped_total").increment(1);
        }
    }
}

/// The streams of this instance, and the forwarding of their events.
#[derive(Default)]
struct Streams {
    map: HashMap<StreamKey, Stream>,
    forward: Option<Forward>,
}

/// What a new subscriber gets: a reset notice if it asked for too old an event, the events it missed,
/// and the live feed.
pub struct Subscription {
    pub reset: bool,
    pub missed: Vec<Arc<Stored>>,
    pub live: broadcast::Receiver<Arc<Stored>>,
}

/// The console of this instance.
pub struct Console {
    streams: Mutex<Streams>,
    /// CAN frames per second per stream above which the stream samples.
    frame_rate_limit: u32,
    /// Told when a dongle's stream gets a subscriber, so that its agent is asked for the dongle's
    /// traffic at once rather than at the next round (`monitor::watch`).
    pub dongle_watched: tokio::sync::Notify,
    /// Told when any stream gets a subscriber, so that other instances learn at once that this one
    /// watches it ([`peers`]).
    pub watched_changed: tokio::sync::Notify,
    /// The frames seen of each dongle's bus, for its `bus_load` events.
    pub bus_meter: bus_load::BusMeter,
}

impl Console {
    pub fn new(frame_rate_limit: u32) -> Self {
        Self {
            streams: Mutex::new(Streams::default()),
            frame_rate_limit: frame_rate_limit.max(1),
            dongle_watched: tokio::sync::Notify::new(),
            watched_changed: tokio::sync::Notify::new(),
            bus_meter: bus_load::BusMeter::default(),
        }
    }

    /// The dongles whose stream a client of this instance watches now.
    pub fn watched_dongles(&self) -> Vec<Uuid> {
        self.watched_here()
            .into_iter()
            .filter_map(|key| match key {
                StreamKey::Dongle(id) => Some(id),
                StreamKey::Group(_) => None,
            })
            .collect()
    }

    /// Whether a client of another instance watches `key`'s stream now.
    pub fn wanted_by_peers(&self, key: StreamKey) -> bool {
        self.streams
            .lock()
            .expect("console lock")
            .forward
            .as_ref()
            .is_some_and(|f| f.wanted.contains(&key))
    }

    /// The streams that clients of this instance watch now.
    pub fn watched_here(&self) -> Vec<StreamKey> {
        self.streams
            .lock()
            .expect("console lock")
            .map
            .iter()
            .filter(|(_, stream)| stream.tx.receiver_count() > 0)
            .map(|(key, _)| *key)
            .collect()
    }

    /// Starts forwarding events to other instances: the events of the streams that [`Self::set_wanted`]
    /// names are queued (at most `queue` of them) on the receiver returned.
    pub fn forward_to_peers(&self, queue: usize) -> mpsc::Receiver<Outgoing> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        self.streams.lock().expect("console lock").forward = Some(Forward {
            wanted: Default::default(),
            tx,
        });
        rx
    }

    /// The streams that clients of other instances watch now.
    pub fn set_wanted(&self, wanted: std::collections::HashSet<StreamKey>) {
        if let Some(forward) = &mut self.streams.lock().expect("console lock").forward {
            forward.wanted = wanted;
        }
    }

    /// Publishes an event that another instance published (and sampled) on `key`'s stream: it is shown
    /// as it is and sent nowhere else.
    pub fn publish_from_peer(&self, key: StreamKey, event: ConsoleEvent) {
        let mut streams = self.streams.lock().expect("console lock");
        streams
            .map
            .entry(key)
            .or_insert_with(Stream::new)
            .push(event, None);
    }

    /// Publishes `event` on `key`'s stream. CAN frames above the rate limit are sampled: one in N is
    /// kept and marked with N, and a `log` event says when the sampling changes.
    pub fn publish(&self, key: StreamKey, event: ConsoleEvent) {
        if matches!(event, ConsoleEvent::CanFrame { .. }) {
            self.publish_frames(key, [event], |event| event);
            return;
        }
        let mut streams = self.streams.lock().expect("console lock");
        let Streams { map, forward } = &mut *streams;
        let out = forward.as_ref().map(|f| (key, f));
        map.entry(key).or_insert_with(Stream::new).push(event, out);
    }

    /// Publishes CAN frames on `key`'s stream, sampled as [`publish`](Self::publish) does: `make`
    /// builds a frame's `can_frame` event and is called only for the frames the sampling keeps. A
    /// relayed batch of a busy bus therefore costs a counter per frame, not a formatted event
    /// (formatting every relayed frame three times was 9 % of the relay's CPU with 20 busy groups).
    pub fn publish_frames<T>(
        &self,
        key: StreamKey,
        frames: impl IntoIterator<Item = T>,
        mut make: impl FnMut(T) -> ConsoleEvent,
    ) {
        let mut streams = self.streams.lock().expect("console lock");
        let Streams { map, forward } = &mut *streams;
        let out = forward.as_ref().map(|f| (key, f));
        let stream = map.entry(key).or_insert_with(Stream::new);
        let now = Instant::now();
        for frame in frames {
            let Some(sampled) = stream.admit_frame(now, self.frame_rate_limit, out) else {
                continue;
            };
            let mut event = make(frame);
            if let ConsoleEvent::CanFrame { sampled: s, .. } = &mut event {
                *s = sampled.or(*s);
            }
            stream.push(event, out);
        }
    }

    /// Subscribes to `key`'s stream, resuming after `last_event_id` when given.
    pub fn subscribe(&self, key: StreamKey, last_event_id: Option<u64>) -> Subscription {
        let mut streams = self.streams.lock().expect("console lock");
        let stream = streams.map.entry(key).or_insert_with(Stream::new);
        let live = stream.tx.subscribe();
        if matches!(key, StreamKey::Dongle(_)) {
            self.dongle_watched.notify_one();
        }
        self.watched_changed.notify_one();
        let Some(last) = last_event_id else {
            return Subscription {
                reset: false,
                missed: Vec::new(),
                live,
            };
        };
        // The ring covers `last` when it holds the event right after it, or when nothing was
        // published since `last`.
        let oldest = stream.ring.front().map(|e| e.id).unwrap_or(stream.next_id);
        let covered = last < stream.next_id && last + 1 >= oldest;
        if !covered {
            return Subscription {
                reset: true,
                missed: Vec::new(),
                live,
            };
        }
        let missed = stream
            .ring
            .iter()
            .filter(|e| e.id > last)
            .cloned()
            .collect();
        Subscription {
            reset: false,
            missed,
            live,
        }
    }

    /// Forgets streams nobody watches whose last event is older than the ring keeps.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.streams
            .lock()
            .expect("console lock")
            .map
            .retain(|_, s| {
                s.tx.receiver_count() > 0
                    || s.ring
                        .back()
                        .is_some_and(|e| now.duration_since(e.at) <= RING_AGE)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u32) -> ConsoleEvent {
        ConsoleEvent::Log {
            level: "info",
            message: n.to_string(),
        }
    }

    fn frame() -> ConsoleEvent {
        ConsoleEvent::can_frame(
            Uuid::nil(),
            "rx",
            "2026-12-05T00:00:00.000000Z",
            FrameView {
                can_id: 0x7e8,
                is_extended: false,
                fd: false,
                data: &[0],
                dongle_ts_us: 0,
            },
            None,
        )
    }

    #[test]
    fn a_can_frame_has_the_fields_of_v07() {
        let event = ConsoleEvent::can_frame(
            Uuid::nil(),
            "rx",
            "2026-12-05T10:00:00.000001Z",
            FrameView {
                can_id: 0x18da_f110,
                is_extended: true,
                fd: true,
                data: &[0; 12],
                dongle_ts_us: 42,
            },
            Some(3),
        );
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "can_frame");
        assert_eq!(json["ts"], "2026-12-05T10:00:00.000001Z");
        assert_eq!(json["dongle_ts_us"], 42);
        assert_eq!(json["direction"], "rx");
        assert_eq!(json["bus"], 0);
        assert_eq!(json["id"], "0x18DAF110");
        assert_eq!(json["can_id"], 0x18da_f110u32);
        assert_eq!(json["is_extended"], true);
        assert_eq!(json["dlc"], 9, "12 bytes of FD are DLC 9");
        assert_eq!(json["data_hex"], "00".repeat(12));
        assert_eq!(json["sampled"], 3);
        let standard = serde_json::to_value(frame()).unwrap();
        assert_eq!(standard["id"], "0x7E8");
        assert_eq!(standard["dlc"], 1);
        assert!(standard.get("dongle_ts_us").is_none());
        assert!(standard.get("sampled").is_none());
    }

    #[tokio::test]
    async fn events_of_streams_other_instances_watch_are_forwarded_except_bus_load() {
        let console = Console::new(1000);
        let (watched, other) = (
            StreamKey::Dongle(Uuid::new_v4()),
            StreamKey::Dongle(Uuid::new_v4()),
        );
        let mut out = console.forward_to_peers(8);
        console.set_wanted([watched].into_iter().collect());
        console.publish(other, log(1));
        // Each instance makes its own `bus_load` from the shared counts: one forwarded would be
        // shown twice there.
        console.publish(
            watched,
            ConsoleEvent::BusLoad {
                dongle_id: Uuid::nil(),
                frames_per_sec: 1.0,
                load_percent: None,
                bitrate: None,
            },
        );
        console.publish(watched, log(2));
        // An event from a peer is shown here and sent nowhere.
        console.publish_from_peer(watched, log(3));
        let forwarded = out.try_recv().unwrap();
        assert_eq!(forwarded.key, watched);
        assert!(
            matches!(&forwarded.stored.event, ConsoleEvent::Log { message, .. } if message == "2")
        );
        assert!(out.try_recv().is_err(), "nothing else");
    }

    #[tokio::test]
    async fn ids_increase_and_a_resume_gets_what_it_missed() {
        let console = Console::new(1000);
        let key = StreamKey::Dongle(Uuid::new_v4());
        let mut first = console.subscribe(key, None);
        console.publish(key, log(1));
        console.publish(key, log(2));
        console.publish(key, log(3));
        let a = first.live.recv().await.unwrap();
        let b = first.live.recv().await.unwrap();
        assert_eq!(b.id, a.id + 1);
        let resumed = console.subscribe(key, Some(a.id));
        assert!(!resumed.reset);
        let ids: Vec<u64> = resumed.missed.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![a.id + 1, a.id + 2]);
        // Up to date: nothing missed, no reset.
        let current = console.subscribe(key, Some(a.id + 2));
        assert!(!current.reset && current.missed.is_empty());
        // An id the stream never issued, or one older than the ring: reset.
        assert!(console.subscribe(key, Some(a.id + 100)).reset);
        assert!(console.subscribe(key, Some(a.id - 5)).reset);
    }

    #[tokio::test]
    async fn the_ring_keeps_the_newest_ten_thousand() {
        let console = Console::new(1000);
        let key = StreamKey::Group(Uuid::new_v4());
        let mut sub = console.subscribe(key, None);
        console.publish(key, log(0));
        let first = sub.live.recv().await.unwrap().id;
        for n in 1..=RING_EVENTS as u32 {
            console.publish(key, log(n));
        }
        assert!(console.subscribe(key, Some(first - 1)).reset);
        let resumed = console.subscribe(key, Some(first));
        assert!(!resumed.reset);
        assert_eq!(resumed.missed.len(), RING_EVENTS);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ring_forgets_after_a_minute() {
        let console = Console::new(1000);
        let key = StreamKey::Dongle(Uuid::new_v4());
        let mut sub = console.subscribe(key, None);
        console.publish(key, log(0));
        let first = sub.live.recv().await.unwrap().id;
        tokio::time::advance(RING_AGE + Duration::from_secs(1)).await;
        console.publish(key, log(1));
        assert!(console.subscribe(key, Some(first - 1)).reset);
        drop(sub);
        tokio::time::advance(RING_AGE + Duration::from_secs(1)).await;
        console.sweep();
        assert!(console.streams.lock().unwrap().map.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn frames_the_sampling_skips_are_never_built() {
        let console = Console::new(10);
        let key = StreamKey::Group(Uuid::new_v4());
        let mut built = 0;
        console.publish_frames(key, 0..100, |_| {
            built += 1;
            frame()
        });
        assert_eq!(built, 100, "the first second shows every frame");
        tokio::time::advance(Duration::from_secs(1)).await;
        built = 0;
        console.publish_frames(key, 0..100, |_| {
            built += 1;
            frame()
        });
        assert_eq!(built, 10, "one in ten is built, the rest only counted");
    }

    #[tokio::test(start_paused = true)]
    async fn frames_above_the_rate_are_sampled_and_the_console_says_so() {
        let console = Console::new(10);
        let key = StreamKey::Dongle(Uuid::new_v4());
        let mut sub = console.subscribe(key, None);
        for _ in 0..100 {
            console.publish(key, frame());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..100 {
            console.publish(key, frame());
        }
        let mut frames = 0;
        let mut sampled = None;
        let mut logs = Vec::new();
        while let Ok(e) = sub.live.try_recv() {
            match &e.event {
                ConsoleEvent::CanFrame { sampled: s, .. } => {
                    frames += 1;
                    if s.is_some() {
                        sampled = *s;
                    }
                }
                ConsoleEvent::Log { message, .. } => logs.push(message.clone()),
                _ => {}
            }
        }
        // The first second shows every frame; after it, one in ten (100 frames/s over a limit of 10).
        assert_eq!(sampled, Some(10));
        assert_eq!(frames, 100 + 10);
        assert_eq!(logs.len(), 1);
        assert!(logs[0].contains("1 frame in 10"), "{logs:?}");
    }
}
