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
//! # Live frames
//!
//! A write publishes each chunk first on a plain NATS subject, `<stream>-live.<group id>.<a|b>` (outside
//! the stream's subjects, so not stored), as a FRAMES message of the data plane. The instance following
//! the direction ([`read_live`]) keeps it in its index as live and wakes the group's pipe, which sends
//! it at once instead of waiting for the stream to store the message and its consumer to deliver it.
//! A live frame is never counted as buffered nor as the end of the sender's stream: the writer may die
//! before the stream has it, and its sender, not acknowledged, then sends it again (the receiver skips
//! it by position). The stream's copy replaces it in the index. The connection does not echo, so an
//! instance never reads its own live frames back.
//!
//! # What stays in PostgreSQL
//!
//! Each direction's positions and counters (`relay_sides`: how far the sender's stream is accepted, how
//! far the receiver acknowledged, the frames waiting) stay where the dashboard, the audit and the other
//! instances read them: a few small row updates per direction every 50 ms, written behind the relay by
//! [`ledger`], instead of a row per batch. A pipe waits only for the stream; the ledger's module says
//! why nothing is lost when the rows lag.
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

mod index;
mod ledger;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
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
use index::{Entry, Index};
use ledger::{Acked, Ledger, Pending};

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

type Indexes = Arc<Mutex<HashMap<(Uuid, Side), Index>>>;

/// The relay buffer on a JetStream stream.
pub struct JetStreamBuffer {
    /// The connection, for the live frames; it never receives what it publishes itself.
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream<()>,
    name: String,
    max_messages: usize,
    indexes: Indexes,
    /// The bytes of frames every index holds ([`CACHE_BYTES_TOTAL`]).
    cache_budget: Arc<AtomicUsize>,
    wake_tx: mpsc::Sender<(Uuid, Side)>,
    wake_rx: Mutex<Option<mpsc::Receiver<(Uuid, Side)>>>,
    /// The rows' changes on their way to PostgreSQL.
    ledger: Arc<Ledger>,
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
        // No echo: an instance that writes a direction and follows it too would otherwise read its
        // own live frames back.
        let mut options = async_nats::ConnectOptions::new()
            .name("bridge-server relay")
            .no_echo();
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
        let context = jetstream::new(client.clone());
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
            client,
            context,
            stream,
            name: settings.stream.clone(),
            max_messages: usize::try_from(max_messages).unwrap_or(usize::MAX),
            indexes: Arc::new(Mutex::new(HashMap::new())),
            cache_budget: Arc::new(AtomicUsize::new(0)),
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
            ledger: Arc::default(),
        })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.name
    }

    /// The connection to NATS, which the agent hub's messages between instances share.
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// The directions whose stream received a message, as the followers read them: for
    /// [`super::wake`], which hands them to the groups' pipes. There is one receiver; the first call
    /// takes it.
    pub fn take_wakes(&self) -> Option<mpsc::Receiver<(Uuid, Side)>> {
        self.wake_rx.lock().expect("jetstream wake lock").take()
    }

    fn subject(&self, group_id: Uuid, towards: Side) -> String {
        subject_of(&self.name, group_id, towards)
    }

    fn live_subject(&self, group_id: Uuid, towards: Side) -> String {
        live_subject_of(&self.name, group_id, towards)
    }

    /// Records a change of a direction's row, for the ledger's writer.
    fn record(&self, pool: &PgPool, key: (Uuid, Side), change: Pending) {
        self.ledger.record(key, change, || ledger::Context {
            pool: pool.clone(),
            stream: self.stream.clone(),
            name: self.name.clone(),
            indexes: self.indexes.clone(),
        });
    }

    /// Waits until the positions and counts recorded so far are in PostgreSQL, or `limit` passed;
    /// false then.
    pub async fn settle(&self, limit: Duration) -> bool {
        self.ledger.settle(limit).await
    }

    fn with_index<R>(&self, key: (Uuid, Side), f: impl FnOnce(&mut Index) -> R) -> R {
        let budget = &self.cache_budget;
        f(lock(&self.indexes)
            .entry(key)
            .or_insert_with(|| Index::new(budget.clone())))
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
        let live_wanted = self.with_index(key, |index| {
            index.live_reader.as_ref().is_none_or(|r| r.is_finished())
        });
        if live_wanted {
            let subscriber = self
                .client
                .subscribe(live_subject_of(&self.name, key.0, key.1))
                .await
                .map_err(nats)?;
            let reader = tokio::spawn(read_live(
                subscriber,
                key,
                self.indexes.clone(),
                self.wake_tx.clone(),
            ));
            self.with_index(key, |index| {
                if let Some(old) = index.live_reader.replace(reader) {
                    old.abort();
                }
            });
        }
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
        let first = first_from(&self.stream, &self.subject(group_id, towards), 1).await?;
        self.with_index(key, |index| {
            index.forget_below(first);
            index.pruned_at = Some(now);
        });
        Ok(())
    }

    /// Both sides' rows: the positions and counters from PostgreSQL, the frames waiting and the end of
    /// each direction's buffer from the stream. A sender's position is at least the end of what the
    /// stream holds from it, and an acknowledgement at least what this instance recorded: the rows
    /// lag both ([`ledger`]).
    pub async fn load(&self, pool: &PgPool, group_id: Uuid) -> Result<[SideRow; 2], BufferError> {
        let mut rows = buffer::load(pool, group_id).await?;
        for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
            self.follow(group_id, side).await?;
            self.prune(group_id, side, true).await?;
            let key = (group_id, side);
            if let Some(next) = self.ledger.pending_ack(key) {
                rows[i].acked_out = rows[i].acked_out.max(next);
            }
            let acked_out = rows[i].acked_out;
            // Counted, not forgotten: only this instance's acknowledgements take entries out, so that
            // they count what they remove (an acknowledgement in the rows may be ahead of them).
            let (buffered, tail) =
                self.with_index(key, |index| (index.frames_above(acked_out), index.tail()));
            rows[i].buffered = buffered;
            rows[i].tail = tail;
            // The frames towards this side came from the other one, which was acknowledged for all
            // of them: for those still in the stream, and for those the receiver acknowledged (their
            // messages may be purged while the writer died before its row said so).
            let acked_out = rows[i].acked_out;
            let source = &mut rows[1 - i];
            source.next_in = source.next_in.max(tail).max(acked_out);
        }
        Ok(rows)
    }

    /// Publishes the chunks and waits until the stream has them all; then the sender may be
    /// acknowledged. Its position and the frames written reach PostgreSQL behind (see [`ledger`]).
    pub async fn append(&self, pool: &PgPool, req: Append<'_>) -> Result<Appended, BufferError> {
        if self.ledger.is_gone(req.group_id) {
            return Err(BufferError::Gone);
        }
        let key = (req.group_id, req.target);
        let subject = self.subject(req.group_id, req.target);
        let mut wrote = false;
        if !req.chunks.is_empty() {
            // Live first, for an instance that sends this direction now: it needs not wait for the
            // stream. Nothing waits for it, and a live copy lost is read from the stream instead.
            let live = self.live_subject(req.group_id, req.target);
            for chunk in req.chunks {
                let message = control_proto::data::encode_frames(
                    req.group_id,
                    req.target,
                    chunk.seq,
                    &chunk.batch,
                );
                if let Err(e) = self.client.publish(live.clone(), message.into()).await {
                    tracing::debug!(group_id = %req.group_id, error = %e, "a live copy of buffered frames was not sent");
                }
            }
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
                    wrote = true;
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
        if wrote || req.source_next_in.is_some() {
            self.record(
                pool,
                key,
                Pending {
                    source_next_in: req.source_next_in,
                    wrote,
                    acked: None,
                },
            );
        }
        Ok(Appended {
            // As this instance knows it: what another instance acknowledged leaves this count at the
            // next prune, within PRUNE_EVERY.
            buffered: self.with_index(key, |index| index.frames()),
            // The stream's own limits trim; what they removed shows as a gap in the positions.
            trimmed: 0,
            audited: false,
        })
    }

    /// The receiver of `target` acknowledged every frame below `next`: the messages wholly below it
    /// leave this instance's index at once, and the stream once the acknowledgement is in PostgreSQL
    /// ([`ledger`]).
    pub async fn acknowledge(
        &self,
        pool: &PgPool,
        group_id: Uuid,
        target: Side,
        next: u64,
    ) -> Result<Acknowledged, BufferError> {
        let key = (group_id, target);
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
        self.record(
            pool,
            key,
            Pending {
                acked: Some(Acked {
                    next,
                    removed,
                    purge_below,
                    purge: removed > 0,
                }),
                ..Pending::default()
            },
        );
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
        let indexed = |index: &mut Index| -> Vec<(u64, Entry)> { index.range(from, limit) };
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

    /// Drops both directions of a group that is gone; its writes fail as gone from now on.
    pub async fn discard(&self, group_id: Uuid) {
        self.ledger.mark_gone(group_id);
        self.forget(group_id);
        purge_group(&self.stream, &self.name, group_id).await;
    }

    /// Forgets a group's index here (its pipe ended), stopping its followers; the stream keeps its
    /// messages.
    pub fn forget(&self, group_id: Uuid) {
        let mut indexes = lock(&self.indexes);
        indexes.remove(&(group_id, Side::A));
        indexes.remove(&(group_id, Side::B));
    }
}

/// The subject of a direction: `<stream>.<group id>.<a|b>`, named after the side the frames go to.
fn subject_of(stream: &str, group_id: Uuid, towards: Side) -> String {
    format!("{stream}.{group_id}.{}", towards.letter())
}

/// The frames of a direction above `acked_out` that the stream still holds, as this instance's index
/// knows them after a look at the stream's front; None when no pipe here uses the direction.
async fn count_waiting(
    context: &ledger::Context,
    key: (Uuid, Side),
    acked_out: u64,
) -> Result<Option<u64>, BufferError> {
    if !lock(&context.indexes).contains_key(&key) {
        return Ok(None);
    }
    let subject = subject_of(&context.name, key.0, key.1);
    let first = first_from(&context.stream, &subject, 1).await?;
    Ok(lock(&context.indexes).get_mut(&key).map(|index| {
        index.forget_below(first);
        index.frames_above(acked_out)
    }))
}

/// The first message of the subject at or after `sequence`; None when there is none.
async fn first_from(
    stream: &stream::Stream<()>,
    subject: &str,
    sequence: u64,
) -> Result<Option<u64>, BufferError> {
    match stream
        .get_first_raw_message_by_subject(subject, sequence.max(1))
        .await
    {
        Ok(message) => Ok(Some(message.sequence)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(nats(e)),
    }
}

/// The core NATS subject of a direction's live frames: `<stream>-live.<group id>.<a|b>`, outside the
/// stream's subjects, so that the stream does not store them a second time.
fn live_subject_of(stream: &str, group_id: Uuid, towards: Side) -> String {
    format!("{stream}-live.{group_id}.{}", towards.letter())
}

/// Reads a direction's live frames into its index, and wakes its pipe for each new one. A message
/// that is not a FRAMES message of this direction (another client of the NATS server may publish
/// anything) is skipped.
async fn read_live(
    mut subscriber: async_nats::Subscriber,
    key: (Uuid, Side),
    indexes: Indexes,
    wake: mpsc::Sender<(Uuid, Side)>,
) {
    use futures::StreamExt;
    while let Some(message) = subscriber.next().await {
        let Ok(frames) = control_proto::data::DataMessage::decode(&message.payload) else {
            tracing::debug!(group_id = %key.0, "a live NATS message that does not parse is skipped");
            continue;
        };
        let count = u32::try_from(frames.frame_count()).unwrap_or(0);
        // Positions are stored as PostgreSQL bigints; one past them is no frame of a relay.
        let in_range = frames
            .n
            .checked_add(u64::from(count))
            .is_some_and(|end| i64::try_from(end).is_ok());
        if frames.kind != control_proto::data::Kind::Frames
            || (frames.group_id, frames.side) != key
            || count == 0
            || !in_range
        {
            tracing::debug!(group_id = %key.0, "a live NATS message for something else is skipped");
            continue;
        }
        let batch: Arc<[u8]> = message.payload[control_proto::data::HEADER_LEN..].into();
        let new = {
            let mut indexes = lock(&indexes);
            // The pipe ended and its index went: so does this reader.
            let Some(index) = indexes.get_mut(&key) else {
                return;
            };
            index.insert_live(frames.n, count, batch)
        };
        if new {
            let _ = wake.try_send(key);
        }
    }
}

/// Purges both directions of a deleted group from the stream.
async fn purge_group(stream: &stream::Stream<()>, name: &str, group_id: Uuid) {
    for side in [Side::A, Side::B] {
        if let Err(e) = stream
            .purge()
            .filter(subject_of(name, group_id, side))
            .await
        {
            tracing::warn!(%group_id, error = %e, "could not purge a deleted group's NATS buffer; its frames expire with the stream's age limit");
        }
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
                        // Received live already: woken then.
                        new = index.insert(position, sequence, count, Some(batch), limit);
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
    let position: u64 = headers.get(SEQ_HEADER)?.as_str().parse().ok()?;
    let count: u32 = headers.get(COUNT_HEADER)?.as_str().parse().ok()?;
    // Positions are PostgreSQL bigints: one past them is no message of a relay.
    let end = position.checked_add(u64::from(count))?;
    (count > 0 && i64::try_from(end).is_ok()).then_some((position, count))
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
        // Positions past what PostgreSQL stores (and `u64` overflowing) are no relay's.
        headers.insert(SEQ_HEADER, (u64::MAX - 1).to_string().as_str());
        assert_eq!(read_headers(&headers), None);
        headers.insert(SEQ_HEADER, (i64::MAX as u64 - 3).to_string().as_str());
        assert_eq!(read_headers(&headers), Some((i64::MAX as u64 - 3, 3)));
    }
}
