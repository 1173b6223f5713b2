//! The relay buffer on NATS JetStream (`serve --nats-url`): the frames waiting for a side are messages of
//! one stream instead of `relay_buffer` rows, so that PostgreSQL no longer takes the bulk of the relay's
//! writes (every buffered frame's bytes, written and deleted again).
//!
//! # Layout in the stream
//!
//! One stream (`--nats-stream`, `RELAY` by default) holds every group's buffered frames, on one subject
//! per group and direction: `<stream>.<group id>.<a|b>`, named after the side the frames go to. A message
//! is one [`Chunk`]: its batch as the payload, its first position and frame count in the `Relay-Seq` and
//! `Relay-Count` headers, and `Nats-Msg-Id: <group>.<side>.<position>`, so that a write repeated after a
//! lost answer is not stored twice. Retention is the stream's own: at most `buffer_max_frames` messages
//! per subject (a message holds at least one frame, so the frame limit is an upper bound of messages,
//! never fewer frames than PostgreSQL keeps) and `buffer_max_age`, file storage, `--nats-replicas` copies.
//!
//! # What stays in PostgreSQL
//!
//! Each direction's positions and counters (`relay_sides`: how far the sender's stream is accepted, how
//! far the receiver acknowledged, the frames waiting) stay where the dashboard, the audit and the other
//! instances read them: one small row update per write or acknowledgement, instead of a row per batch.
//!
//! # Positions and the index
//!
//! A stream is ordered by arrival, but a direction's frames must go out by position: frames that were in
//! flight to a side whose connection closed are written after newer ones that were buffered behind them.
//! So each instance keeps, per direction its pipes use, an index from position to stream sequence
//! ([`Index`]), fed by an ordered consumer on the direction's subject ([`follow`]) that also keeps the
//! frames of the first messages in memory and wakes the group's pipe as each message arrives: the
//! receiving instance learns of a write within a network hop, and reads the frames without asking the
//! stream again. An acknowledgement removes the messages wholly below it: the stream's prefix by one
//! purge. One written out of order stays in the stream until the purge passes it; every load leaves it
//! out meanwhile, being below the acknowledged position. The index holds at most as many entries as the
//! subject may hold messages, and at most [`CACHE_BYTES`] of frames (and all the directions of an
//! instance together at most [`CACHE_BYTES_TOTAL`]); the others are read by sequence.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use control_proto::data::Side;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::buffer::{self, Acknowledged, Append, Appended, BufferError, SideRow};
use super::chunk::Chunk;
use super::settings::RelaySettings;

/// How to reach NATS (`serve --nats-url` and its companions).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port` (or `tls://`); several servers of a cluster may be given, comma-separated.
    pub url: String,
    /// A `.creds` file (a user JWT and its NKey seed).
    pub credentials: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for the servers' TLS certificates; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for servers that verify clients.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// The stream's replicas: 1 on one server, 3 on a three-node cluster.
    pub replicas: usize,
    /// The stream's name, also the first token of its subjects.
    pub stream: String,
}

impl NatsSettings {
    pub const DEFAULT_STREAM: &'static str = "RELAY";

    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials: None,
            tls_ca: None,
            tls_client: None,
            replicas: 1,
            stream: Self::DEFAULT_STREAM.to_string(),
        }
    }
}

/// Why the relay could not start on NATS. No message carries the URL, which may hold a password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error("the NATS stream name {0:?} is not valid: use letters, digits, '-' and '_' only")]
    StreamName(String),
    #[error("could not read the NATS credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not connect to NATS (--nats-url); check that nats-server runs and is reachable")]
    Connect(#[source] async_nats::ConnectError),
    #[error(
        "could not create or update the JetStream stream {stream}; JetStream must be enabled on the \
         NATS server (nats-server -js), with room for the stream's replicas"
    )]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
}

/// The frames kept in memory per direction; past it, messages are read from the stream when sent.
pub const CACHE_BYTES: usize = 1 << 20;

/// The frames kept in memory by all the directions of this instance together, however many groups
/// relay here.
pub const CACHE_BYTES_TOTAL: usize = 64 << 20;

/// How often a direction's index is checked against the stream's front (what other instances
/// acknowledged, what the limits removed).
const PRUNE_EVERY: Duration = Duration::from_millis(500);

/// How many wakes may wait for the relay; past that they are dropped, and the pipes' polls find the
/// frames instead.
const WAKE_QUEUE: usize = 4_096;

/// One direction's messages as this instance knows them.
#[derive(Debug)]
struct Index {
    /// The messages by the position of their first frame.
    by_position: BTreeMap<u64, Entry>,
    /// The same messages by stream sequence (to their position), so that the first one still waiting
    /// and those below a sequence are found without a scan: an acknowledgement runs on the relay path.
    by_sequence: BTreeMap<u64, u64>,
    /// The frames in the entries.
    frames: u64,
    /// The last stream sequence read from the subject: every message at or below it is in the index
    /// (or was removed).
    scanned: u64,
    /// The bytes of frames held in the entries.
    cached: usize,
    /// The bytes of frames held by every index of the store, this one's included.
    budget: Arc<AtomicUsize>,
    /// When the index was last checked against the stream's front.
    pruned_at: Option<tokio::time::Instant>,
    /// The consumer that feeds the index, while it runs.
    follower: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Clone)]
struct Entry {
    sequence: u64,
    count: u32,
    /// The message's frames, when kept in memory.
    batch: Option<Arc<[u8]>>,
}

impl Index {
    fn new(budget: Arc<AtomicUsize>) -> Self {
        Index {
            by_position: BTreeMap::new(),
            by_sequence: BTreeMap::new(),
            frames: 0,
            scanned: 0,
            cached: 0,
            budget,
            pruned_at: None,
            follower: None,
        }
    }

    fn frames(&self) -> u64 {
        self.frames
    }

    /// The stream sequence of the first message still in the index.
    fn first_sequence(&self) -> Option<u64> {
        self.by_sequence.keys().next().copied()
    }

    /// The position after the last frame (0 when empty).
    fn tail(&self) -> u64 {
        self.by_position
            .iter()
            .map(|(pos, e)| pos + u64::from(e.count))
            .max()
            .unwrap_or(0)
    }

    /// Adds a message; its frames are kept while the cache has room.
    fn insert(
        &mut self,
        position: u64,
        sequence: u64,
        count: u32,
        batch: Option<Arc<[u8]>>,
        limit: usize,
    ) {
        let batch = batch.filter(|b| {
            self.cached + b.len() <= CACHE_BYTES
                && self.budget.load(Ordering::Relaxed) + b.len() <= CACHE_BYTES_TOTAL
        });
        let len = batch.as_ref().map_or(0, |b| b.len());
        self.cached += len;
        self.budget.fetch_add(len, Ordering::Relaxed);
        self.frames += u64::from(count);
        self.by_sequence.insert(sequence, position);
        let entry = Entry {
            sequence,
            count,
            batch,
        };
        if let Some(old) = self.by_position.insert(position, entry) {
            self.forget_entry(&old);
        }
        // Within the subject's own message limit, forgetting the oldest positions: the stream drops
        // its oldest messages at that limit too.
        while self.by_position.len() > limit {
            if let Some((_, old)) = self.by_position.pop_first() {
                self.forget_entry(&old);
            }
        }
    }

    fn remove(&mut self, position: u64) -> Option<Entry> {
        let entry = self.by_position.remove(&position)?;
        self.forget_entry(&entry);
        Some(entry)
    }

    /// Takes an entry that left `by_position` out of the counts and the sequence map.
    fn forget_entry(&mut self, entry: &Entry) {
        let len = entry.batch.as_ref().map_or(0, |b| b.len());
        self.cached -= len;
        self.budget.fetch_sub(len, Ordering::Relaxed);
        self.frames -= u64::from(entry.count);
        self.by_sequence.remove(&entry.sequence);
    }

    /// Forgets the entries that end at or below `acked_out`: acknowledged, whatever the stream holds.
    fn forget_acknowledged(&mut self, acked_out: u64) {
        let gone: Vec<u64> = self
            .by_position
            .iter()
            .take_while(|(pos, _)| **pos < acked_out)
            .filter(|(pos, e)| **pos + u64::from(e.count) <= acked_out)
            .map(|(pos, _)| *pos)
            .collect();
        for pos in gone {
            self.remove(pos);
        }
    }

    /// Forgets the messages the stream no longer has below `first` (the subject's first sequence):
    /// acknowledged by another instance, or removed by the stream's limits.
    fn forget_below(&mut self, first: Option<u64>) {
        let first = first.unwrap_or(u64::MAX);
        // Never what the follower has not read yet: it is above `scanned`.
        let first = first.min(self.scanned + 1);
        let gone: Vec<u64> = self
            .by_sequence
            .range(..first)
            .map(|(_, pos)| *pos)
            .collect();
        for pos in gone {
            self.remove(pos);
        }
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.cached, Ordering::Relaxed);
        if let Some(follower) = self.follower.take() {
            follower.abort();
        }
    }
}

type Indexes = Arc<Mutex<HashMap<(Uuid, Side), Index>>>;

/// The relay buffer on a JetStream stream.
pub struct JetStreamBuffer {
    context: jetstream::Context,
    stream: stream::Stream<()>,
    name: String,
    max_messages: usize,
    indexes: Indexes,
    /// The bytes of frames every index holds ([`CACHE_BYTES_TOTAL`]).
    cache_budget: Arc<AtomicUsize>,
    wake_tx: mpsc::Sender<(Uuid, Side)>,
    wake_rx: Mutex<Option<mpsc::Receiver<(Uuid, Side)>>>,
}

impl std::fmt::Debug for JetStreamBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBuffer")
            .field("stream", &self.name)
            .finish_non_exhaustive()
    }
}

const SEQ_HEADER: &str = "Relay-Seq";
const COUNT_HEADER: &str = "Relay-Count";

/// How long JetStream remembers message ids to drop a repeated write.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

fn nats(e: impl std::fmt::Display) -> BufferError {
    BufferError::Nats(e.to_string())
}

fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn lock(indexes: &Indexes) -> std::sync::MutexGuard<'_, HashMap<(Uuid, Side), Index>> {
    indexes.lock().expect("jetstream index lock")
}

impl JetStreamBuffer {
    /// Connects to NATS and creates the stream, or brings an existing one's limits up to `relay`'s.
    pub async fn connect(
        settings: &NatsSettings,
        relay: &RelaySettings,
    ) -> Result<Self, ConnectError> {
        if !valid_stream_name(&settings.stream) {
            return Err(ConnectError::StreamName(settings.stream.clone()));
        }
        let mut options = async_nats::ConnectOptions::new().name("bridge-server relay");
        if let Some(path) = &settings.credentials {
            options = options.credentials_file(path).await.map_err(|source| {
                ConnectError::Credentials {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &settings.tls_client {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        let servers: Vec<&str> = settings.url.split(',').map(str::trim).collect();
        let client = options
            .connect(servers.as_slice())
            .await
            .map_err(ConnectError::Connect)?;
        let context = jetstream::new(client);
        let max_messages = relay.buffer_max_frames.clamp(1, i64::MAX as u64);
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![format!("{}.>", settings.stream)],
            max_messages_per_subject: max_messages as i64,
            max_age: relay.buffer_max_age,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas.max(1),
            duplicate_window: DUPLICATE_WINDOW.min(relay.buffer_max_age),
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        };
        context
            .create_or_update_stream(config)
            .await
            .map_err(|source| ConnectError::Stream {
                stream: settings.stream.clone(),
                source,
            })?;
        let stream = context
            .get_stream_no_info(&settings.stream)
            .await
            .map_err(|e| ConnectError::Stream {
                stream: settings.stream.clone(),
                source: jetstream::context::CreateStreamError::with_source(
                    jetstream::context::CreateStreamErrorKind::JetStreamUnavailable,
                    e,
                ),
            })?;
        let (wake_tx, wake_rx) = mpsc::channel(WAKE_QUEUE);
        Ok(Self {
            context,
            stream,
            name: settings.stream.clone(),
            max_messages: usize::try_from(max_messages).unwrap_or(usize::MAX),
            indexes: Arc::new(Mutex::new(HashMap::new())),
            cache_budget: Arc::new(AtomicUsize::new(0)),
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
        })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.name
    }

    /// The directions whose stream received a message, as the followers read them: for
    /// [`super::wake`], which hands them to the groups' pipes. There is one receiver; the first call
    /// takes it.
    pub fn take_wakes(&self) -> Option<mpsc::Receiver<(Uuid, Side)>> {
        self.wake_rx.lock().expect("jetstream wake lock").take()
    }

    fn subject(&self, group_id: Uuid, towards: Side) -> String {
        format!("{}.{group_id}.{}", self.name, towards.letter())
    }

    fn with_index<R>(&self, key: (Uuid, Side), f: impl FnOnce(&mut Index) -> R) -> R {
        let budget = &self.cache_budget;
        f(lock(&self.indexes)
            .entry(key)
            .or_insert_with(|| Index::new(budget.clone())))
    }

    /// The first message of the subject at or after `sequence`; None when there is none.
    async fn first_from(&self, subject: &str, sequence: u64) -> Result<Option<u64>, BufferError> {
        match self
            .stream
            .get_first_raw_message_by_subject(subject, sequence.max(1))
            .await
        {
            Ok(message) => Ok(Some(message.sequence)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Whether a follower feeds the direction's index now.
    fn following(&self, key: (Uuid, Side)) -> bool {
        self.with_index(key, |index| {
            index.follower.as_ref().is_some_and(|f| !f.is_finished())
        })
    }

    /// Makes sure a follower feeds the direction's index, and waits until it has read every message
    /// the subject held when asked: what another instance wrote before a load or a read here is in
    /// the index when it runs.
    async fn follow(&self, group_id: Uuid, towards: Side) -> Result<(), BufferError> {
        let key = (group_id, towards);
        let subject = self.subject(group_id, towards);
        if !self.following(key) {
            self.start_follower(key, &subject).await?;
        }
        // The last message the subject holds now: the follower has read up to it before this returns.
        let last = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(nats(e)),
        };
        if self.caught_up(key, last).await {
            return Ok(());
        }
        // A follower whose consumer went with a NATS node (an ordered consumer has one replica) may
        // wait without an error: another takes over from where it got to.
        tracing::info!(%group_id, ?towards, last, "the NATS buffer's follower is behind: starting another");
        self.start_follower(key, &subject).await?;
        if self.caught_up(key, last).await {
            return Ok(());
        }
        Err(BufferError::Nats(format!(
            "the stream's follower did not reach sequence {last} within {CATCH_UP:?}"
        )))
    }

    /// Starts (or replaces) the follower of a direction, from the message after the last one read.
    async fn start_follower(&self, key: (Uuid, Side), subject: &str) -> Result<(), BufferError> {
        let start = self.with_index(key, |index| index.scanned + 1);
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let messages = consumer.messages().await.map_err(nats)?;
        let task = tokio::spawn(follow(
            messages,
            key,
            self.indexes.clone(),
            self.wake_tx.clone(),
            self.max_messages,
        ));
        self.with_index(key, |index| {
            if let Some(old) = index.follower.replace(task) {
                old.abort();
            }
        });
        Ok(())
    }

    /// Waits up to [`CATCH_UP`] for the direction's follower to read up to stream sequence `last`.
    async fn caught_up(&self, key: (Uuid, Side), last: u64) -> bool {
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while self.with_index(key, |index| index.scanned) < last {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        true
    }

    /// Forgets what left the front of the direction's subject since the last look, at most every
    /// [`PRUNE_EVERY`].
    async fn prune(&self, group_id: Uuid, towards: Side, force: bool) -> Result<(), BufferError> {
        let key = (group_id, towards);
        let now = tokio::time::Instant::now();
        let due = force
            || self.with_index(key, |index| {
                index.pruned_at.is_none_or(|at| now >= at + PRUNE_EVERY)
            });
        if !due {
            return Ok(());
        }
        let first = self.first_from(&self.subject(group_id, towards), 1).await?;
        self.with_index(key, |index| {
            index.forget_below(first);
            index.pruned_at = Some(now);
        });
        Ok(())
    }

    /// Both sides' rows: the positions and counters from PostgreSQL, the frames waiting and the end of
    /// each direction's buffer from the stream.
    pub async fn load(&self, pool: &PgPool, group_id: Uuid) -> Result<[SideRow; 2], BufferError> {
        let mut rows = buffer::load(pool, group_id).await?;
        for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
            self.follow(group_id, side).await?;
            self.prune(group_id, side, true).await?;
            let acked_out = rows[i].acked_out;
            let (buffered, tail) = self.with_index((group_id, side), |index| {
                index.forget_acknowledged(acked_out);
                (index.frames(), index.tail())
            });
            rows[i].buffered = buffered;
            rows[i].tail = tail;
        }
        Ok(rows)
    }

    /// Publishes the chunks and waits until the stream has them all; only then are the sender's
    /// position and the direction's count written, and may the sender be acknowledged.
    pub async fn append(&self, pool: &PgPool, req: Append<'_>) -> Result<Appended, BufferError> {
        let key = (req.group_id, req.target);
        let subject = self.subject(req.group_id, req.target);
        let mut written = 0u64;
        if !req.chunks.is_empty() {
            // Published together and awaited together: the stream groups their writes.
            let mut acks = Vec::with_capacity(req.chunks.len());
            for chunk in req.chunks {
                let mut headers = HeaderMap::new();
                let id = format!("{}.{}.{}", req.group_id, req.target.letter(), chunk.seq);
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                headers.insert(SEQ_HEADER, chunk.seq.to_string().as_str());
                headers.insert(COUNT_HEADER, chunk.count.to_string().as_str());
                let payload = chunk.batch.to_vec().into();
                let ack = self
                    .context
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
                    .map_err(nats)?;
                acks.push((chunk, ack));
            }
            for (chunk, ack) in acks {
                let ack = ack.await.map_err(nats)?;
                if !ack.duplicate {
                    written += u64::from(chunk.count);
                    self.with_index(key, |index| {
                        index.insert(
                            chunk.seq,
                            ack.sequence,
                            chunk.count,
                            Some(chunk.batch.clone()),
                            self.max_messages,
                        );
                    });
                }
            }
        }
        // What another instance acknowledged, or the limits removed, leaves the index here.
        self.prune(req.group_id, req.target, false).await?;
        // The count of frames waiting is PostgreSQL's: the receiving instance takes off what its
        // acknowledgements remove, which this instance's index learns only at its next look.
        let recorded =
            buffer::record_written(pool, req.group_id, req.target, req.source_next_in, written)
                .await;
        if let Err(BufferError::Gone) = recorded {
            // The group was deleted meanwhile: what was just published goes with it.
            self.discard(req.group_id).await;
        }
        let buffered = recorded?;
        Ok(Appended {
            buffered,
            // The stream's own limits trim; what they removed shows as a gap in the positions.
            trimmed: 0,
            audited: false,
        })
    }

    /// The receiver of `target` acknowledged every frame below `next`: the messages wholly below it
    /// leave the stream.
    pub async fn acknowledge(
        &self,
        pool: &PgPool,
        group_id: Uuid,
        target: Side,
        next: u64,
    ) -> Result<Acknowledged, BufferError> {
        let key = (group_id, target);
        let subject = self.subject(group_id, target);
        // What the receiver acknowledges, this instance sent it, so read it into the index already;
        // only a first use here needs the follower started.
        if !self.following(key) {
            self.follow(group_id, target).await?;
        }
        let (removed, purge_below, buffered) = self.with_index(key, |index| {
            let before = index.frames();
            index.forget_acknowledged(next);
            let removed = before - index.frames();
            // Every message below `purge_below` is known and acknowledged: they go in one purge.
            // Messages not yet read are above `scanned`, so never below the bound. An acknowledged
            // message written out of order (after one still waiting) stays in the stream until the
            // purge passes it; every instance's load leaves it out, being below `acked_out`.
            let keep = index.first_sequence();
            let purge_below = keep.unwrap_or(u64::MAX).min(index.scanned + 1);
            (removed, purge_below, index.frames())
        });
        // A purge "below 1" purges nothing, but the server reads a sequence of 1 (or 0) as no bound at
        // all and would purge the whole subject.
        if removed > 0 && purge_below > 1 {
            self.stream
                .purge()
                .filter(subject.as_str())
                .sequence(purge_below)
                .await
                .map_err(nats)?;
        }
        buffer::record_acknowledged(pool, group_id, target, next, buffered, removed).await?;
        Ok(Acknowledged { removed, buffered })
    }

    /// Up to `limit` buffered chunks towards `target` from position `from` on, in position order.
    pub async fn fetch(
        &self,
        group_id: Uuid,
        target: Side,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Chunk>, BufferError> {
        let key = (group_id, target);
        let indexed = |index: &mut Index| -> Vec<(u64, Entry)> {
            index
                .by_position
                .range(from..)
                .take(limit)
                .map(|(pos, e)| (*pos, e.clone()))
                .collect()
        };
        let mut wanted = if self.following(key) {
            self.with_index(key, indexed)
        } else {
            Vec::new()
        };
        // Nothing known here: make sure of it with the stream (its last message read first), so that
        // an empty answer is never an index behind the stream. When something is known, it goes out
        // at once, and the follower's wakes bring the rest.
        if wanted.is_empty() {
            self.follow(group_id, target).await?;
            wanted = self.with_index(key, indexed);
        }
        let mut chunks = Vec::with_capacity(wanted.len());
        for (position, entry) in wanted {
            if let Some(batch) = entry.batch {
                chunks.push(Chunk {
                    seq: position,
                    count: entry.count,
                    batch,
                });
                continue;
            }
            match self.stream.get_raw_message(entry.sequence).await {
                Ok(message) => chunks.push(Chunk {
                    seq: position,
                    count: entry.count,
                    batch: message.payload.to_vec().into(),
                }),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    // The stream's limits removed it meanwhile: the receiver sees the gap.
                    self.with_index(key, |index| index.remove(position));
                    metrics::counter!("relay_frames_trimmed_total").increment(entry.count.into());
                }
                Err(e) => return Err(nats(e)),
            }
        }
        Ok(chunks)
    }

    /// Drops both directions of a group that is gone.
    pub async fn discard(&self, group_id: Uuid) {
        for side in [Side::A, Side::B] {
            lock(&self.indexes).remove(&(group_id, side));
            if let Err(e) = self
                .stream
                .purge()
                .filter(self.subject(group_id, side))
                .await
            {
                tracing::warn!(%group_id, error = %e, "could not purge a deleted group's NATS buffer; its frames expire with the stream's age limit");
            }
        }
    }

    /// Forgets a group's index here (its pipe ended), stopping its followers; the stream keeps its
    /// messages.
    pub fn forget(&self, group_id: Uuid) {
        let mut indexes = lock(&self.indexes);
        indexes.remove(&(group_id, Side::A));
        indexes.remove(&(group_id, Side::B));
    }
}

/// How long a load or a read waits for a follower to read what the subject already holds before it
/// starts another.
const CATCH_UP: Duration = Duration::from_secs(3);

/// Reads a direction's messages as they arrive, into its index, and wakes its pipe for each.
async fn follow(
    mut messages: jetstream::consumer::pull::Ordered,
    key: (Uuid, Side),
    indexes: Indexes,
    wake: mpsc::Sender<(Uuid, Side)>,
    limit: usize,
) {
    use futures::StreamExt;
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                // The ordered consumer recreates itself after a gap or a reconnect; an error that
                // reaches here ends the follower, and the next load or read starts another.
                tracing::warn!(group_id = %key.0, error = %e, "the NATS buffer's follower stopped");
                return;
            }
        };
        let Ok(info) = message.info() else {
            continue;
        };
        let sequence = info.stream_sequence;
        let entry = message.headers.as_ref().and_then(read_headers);
        let mut new = false;
        {
            let mut indexes = lock(&indexes);
            // The pipe ended and its index went: so does its follower.
            let Some(index) = indexes.get_mut(&key) else {
                return;
            };
            match entry {
                Some((position, count)) => {
                    // Written here, it is known already (with its frames).
                    if index
                        .by_position
                        .get(&position)
                        .is_none_or(|e| e.sequence != sequence)
                    {
                        let batch: Arc<[u8]> = message.payload.to_vec().into();
                        index.insert(position, sequence, count, Some(batch), limit);
                        new = true;
                    }
                }
                None => {
                    tracing::warn!(group_id = %key.0, sequence, "a buffered NATS message without its position headers is skipped")
                }
            }
            index.scanned = index.scanned.max(sequence);
        }
        // Only for a message written elsewhere: this instance's pipe knows of its own writes. A full
        // queue loses a wake, never a frame: the pipe's poll reads it.
        if new {
            let _ = wake.try_send(key);
        }
    }
}

/// A message's position and frame count; None when a header is missing or does not parse.
fn read_headers(headers: &HeaderMap) -> Option<(u64, u32)> {
    let position = headers.get(SEQ_HEADER)?.as_str().parse().ok()?;
    let count: u32 = headers.get(COUNT_HEADER)?.as_str().parse().ok()?;
    (count > 0).then_some((position, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_that_would_change_the_subjects_are_refused() {
        assert!(valid_stream_name("RELAY"));
        assert!(valid_stream_name("relay_test-1"));
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(!valid_stream_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_index_forgets_what_left_the_front_and_stays_within_its_limits() {
        let mut index = Index::new(Arc::default());
        let batch: Arc<[u8]> = vec![0u8; 100].into();
        for (pos, sequence) in [(0, 1), (10, 2), (20, 3)] {
            index.insert(pos, sequence, 10, Some(batch.clone()), 3);
        }
        index.scanned = 3;
        assert_eq!((index.frames(), index.tail(), index.cached), (30, 30, 300));
        index.forget_below(Some(2));
        assert_eq!(
            index.by_position.keys().copied().collect::<Vec<_>>(),
            [10, 20]
        );
        assert_eq!(index.cached, 200);
        // The message limit forgets the oldest positions.
        index.insert(30, 4, 10, None, 2);
        assert_eq!(
            index.by_position.keys().copied().collect::<Vec<_>>(),
            [20, 30]
        );
        assert_eq!(index.cached, 100);
        // What the follower has not read (above `scanned`) is never taken for gone.
        index.forget_below(None);
        assert_eq!(index.by_position.keys().copied().collect::<Vec<_>>(), [30]);
        index.scanned = 4;
        index.forget_below(None);
        assert_eq!((index.frames(), index.tail(), index.cached), (0, 0, 0));
    }

    #[test]
    fn an_acknowledgement_finds_the_first_message_still_waiting_by_sequence() {
        let mut index = Index::new(Arc::default());
        // Frames 20.. were written first (sequence 1), the ones in flight before them after.
        index.insert(20, 1, 10, None, 10);
        index.insert(0, 2, 10, None, 10);
        index.insert(10, 3, 10, None, 10);
        index.scanned = 3;
        assert_eq!((index.frames(), index.first_sequence()), (30, Some(1)));
        index.forget_acknowledged(25);
        assert_eq!(index.by_position.keys().copied().collect::<Vec<_>>(), [20]);
        assert_eq!((index.frames(), index.first_sequence()), (10, Some(1)));
        index.forget_acknowledged(30);
        assert_eq!((index.frames(), index.first_sequence()), (0, None));
        // A position written again (a second copy) replaces the first in both maps.
        index.insert(30, 4, 5, None, 10);
        index.insert(30, 5, 5, None, 10);
        assert_eq!((index.frames(), index.first_sequence()), (5, Some(5)));
        index.scanned = 5;
        index.forget_below(Some(6));
        assert_eq!((index.frames(), index.first_sequence()), (0, None));
    }

    #[test]
    fn the_indexes_of_an_instance_share_one_budget() {
        let budget = Arc::new(AtomicUsize::new(CACHE_BYTES_TOTAL - 100));
        let mut index = Index::new(budget.clone());
        index.insert(0, 1, 1, Some(vec![0u8; 60].into()), 10);
        index.insert(1, 2, 1, Some(vec![0u8; 60].into()), 10);
        assert!(index.by_position[&0].batch.is_some());
        assert!(
            index.by_position[&1].batch.is_none(),
            "past the instance's budget"
        );
        assert_eq!(budget.load(Ordering::Relaxed), CACHE_BYTES_TOTAL - 40);
        drop(index);
        assert_eq!(
            budget.load(Ordering::Relaxed),
            CACHE_BYTES_TOTAL - 100,
            "given back"
        );
    }

    #[test]
    fn frames_past_the_cache_are_not_kept() {
        let mut index = Index::new(Arc::default());
        let big: Arc<[u8]> = vec![0u8; CACHE_BYTES - 10].into();
        index.insert(0, 1, 1, Some(big), 10);
        index.insert(1, 2, 1, Some(vec![0u8; 20].into()), 10);
        assert!(index.by_position[&0].batch.is_some());
        assert!(
            index.by_position[&1].batch.is_none(),
            "read from the stream when sent"
        );
        index.remove(0);
        assert_eq!(index.cached, 0);
    }

    #[test]
    fn a_message_without_its_headers_has_no_position() {
        let mut headers = HeaderMap::new();
        assert_eq!(read_headers(&headers), None);
        headers.insert(SEQ_HEADER, "7");
        headers.insert(COUNT_HEADER, "0");
        assert_eq!(read_headers(&headers), None);
        headers.insert(COUNT_HEADER, "3");
        assert_eq!(read_headers(&headers), Some((7, 3)));
        headers.insert(SEQ_HEADER, "x");
        assert_eq!(read_headers(&headers), None);
    }
}
