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
//! So each instance keeps, per direction it touches, an index from position to stream sequence
//! ([`Index`]), learnt from the stream itself (every message after the last one seen, read once) and
//! from its own writes. Reads go by position through the index; an acknowledgement removes the messages
//! wholly below it: the stream's prefix by one purge. One written out of order stays in the stream until
//! the purge passes it; every load leaves it out meanwhile, being below the acknowledged position. The
//! index holds positions only, never frames, and at most as many entries as the subject
//! may hold messages.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use control_proto::data::Side;
use sqlx::PgPool;
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

/// One direction's messages as this instance knows them.
#[derive(Debug, Default)]
struct Index {
    /// The messages by the position of their first frame.
    by_position: BTreeMap<u64, Entry>,
    /// The last stream sequence read from the subject: every message at or below it is in the index
    /// (or was removed).
    scanned: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    sequence: u64,
    count: u32,
}

impl Index {
    fn frames(&self) -> u64 {
        self.by_position.values().map(|e| u64::from(e.count)).sum()
    }

    /// The position after the last frame (0 when empty).
    fn tail(&self) -> u64 {
        self.by_position
            .iter()
            .map(|(pos, e)| pos + u64::from(e.count))
            .max()
            .unwrap_or(0)
    }

    /// Forgets the messages the stream no longer has below `first` (the subject's first sequence):
    /// acknowledged by another instance, or removed by the stream's limits.
    fn forget_below(&mut self, first: Option<u64>) {
        match first {
            Some(first) => self.by_position.retain(|_, e| e.sequence >= first),
            None => self.by_position.clear(),
        }
    }

    /// Keeps the index within the subject's own message limit, forgetting the oldest positions: the
    /// stream drops its oldest messages at that limit too.
    fn bound(&mut self, limit: usize) {
        while self.by_position.len() > limit {
            self.by_position.pop_first();
        }
    }
}

/// The relay buffer on a JetStream stream.
pub struct JetStreamBuffer {
    context: jetstream::Context,
    stream: stream::Stream<()>,
    name: String,
    max_messages: usize,
    indexes: Mutex<HashMap<(Uuid, Side), Index>>,
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
        Ok(Self {
            context,
            stream,
            name: settings.stream.clone(),
            max_messages: usize::try_from(max_messages).unwrap_or(usize::MAX),
            indexes: Mutex::new(HashMap::new()),
        })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.name
    }

    fn subject(&self, group_id: Uuid, towards: Side) -> String {
        format!("{}.{group_id}.{}", self.name, towards.letter())
    }

    fn with_index<R>(&self, key: (Uuid, Side), f: impl FnOnce(&mut Index) -> R) -> R {
        let mut indexes = self.indexes.lock().expect("jetstream index lock");
        f(indexes.entry(key).or_default())
    }

    /// The first message of the subject at or after `sequence`; None when there is none.
    async fn first_from(
        &self,
        subject: &str,
        sequence: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, BufferError> {
        match self
            .stream
            .get_first_raw_message_by_subject(subject, sequence.max(1))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats(e)),
        }
    }

    /// Brings a direction's index up to the stream: forgets what left the front of the subject and reads
    /// every message after the last one seen.
    async fn refresh(&self, group_id: Uuid, towards: Side) -> Result<(), BufferError> {
        let key = (group_id, towards);
        let subject = self.subject(group_id, towards);
        let first = self.first_from(&subject, 1).await?;
        let mut next = self.with_index(key, |index| {
            index.forget_below(first.as_ref().map(|m| m.sequence));
            index.scanned + 1
        });
        let mut message = match first {
            Some(m) if m.sequence >= next => Some(m),
            _ => self.first_from(&subject, next).await?,
        };
        while let Some(m) = message {
            let entry = read_headers(&m.headers);
            let sequence = m.sequence;
            self.with_index(key, |index| {
                if let Some((position, count)) = entry {
                    index.by_position.insert(position, Entry { sequence, count });
                } else {
                    tracing::warn!(%group_id, sequence, "a buffered NATS message without its position headers is skipped");
                }
                index.scanned = index.scanned.max(sequence);
                index.bound(self.max_messages);
            });
            next = sequence + 1;
            message = self.first_from(&subject, next).await?;
        }
        Ok(())
    }

    /// Both sides' rows: the positions and counters from PostgreSQL, the frames waiting and the end of
    /// each direction's buffer from the stream.
    pub async fn load(&self, pool: &PgPool, group_id: Uuid) -> Result<[SideRow; 2], BufferError> {
        let mut rows = buffer::load(pool, group_id).await?;
        for (i, side) in [Side::A, Side::B].into_iter().enumerate() {
            self.refresh(group_id, side).await?;
            let acked_out = rows[i].acked_out;
            let (buffered, tail) = self.with_index((group_id, side), |index| {
                index
                    .by_position
                    .retain(|pos, e| pos + u64::from(e.count) > acked_out);
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
                acks.push((chunk.seq, chunk.count, ack));
            }
            for (position, count, ack) in acks {
                let ack = ack.await.map_err(nats)?;
                if !ack.duplicate {
                    self.with_index(key, |index| {
                        index.by_position.insert(
                            position,
                            Entry {
                                sequence: ack.sequence,
                                count,
                            },
                        );
                        index.bound(self.max_messages);
                    });
                }
            }
        }
        // What another instance acknowledged, or the limits removed, leaves the index here.
        let first = self.first_from(&subject, 1).await?;
        let buffered = self.with_index(key, |index| {
            index.forget_below(first.map(|m| m.sequence));
            index.frames()
        });
        let recorded =
            buffer::record_written(pool, req.group_id, req.target, req.source_next_in, buffered)
                .await;
        if let Err(BufferError::Gone) = recorded {
            // The group was deleted meanwhile: what was just published goes with it.
            self.discard(req.group_id).await;
        }
        recorded?;
        if !req.chunks.is_empty() {
            // The instance serving the receiving side reads them at once, not at its next poll.
            buffer::announce_buffered(pool, req.group_id, req.target).await;
        }
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
        self.refresh(group_id, target).await?;
        let (removed, purge_below, buffered) = self.with_index(key, |index| {
            let done: Vec<u64> = index
                .by_position
                .iter()
                .take_while(|(pos, _)| **pos < next)
                .filter(|(pos, e)| **pos + u64::from(e.count) <= next)
                .map(|(pos, _)| *pos)
                .collect();
            let mut removed = 0u64;
            for pos in done {
                if let Some(entry) = index.by_position.remove(&pos) {
                    removed += u64::from(entry.count);
                }
            }
            // Every message below `purge_below` is known and acknowledged: they go in one purge.
            // Messages not yet seen are above `scanned`, so never below the bound. An acknowledged
            // message written out of order (after one still waiting) stays in the stream until the
            // purge passes it; every instance's load leaves it out, being below `acked_out`.
            let keep = index.by_position.values().map(|e| e.sequence).min();
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
        self.refresh(group_id, target).await?;
        let wanted: Vec<(u64, Entry)> = self.with_index(key, |index| {
            index
                .by_position
                .range(from..)
                .take(limit)
                .map(|(pos, e)| (*pos, *e))
                .collect()
        });
        let mut chunks = Vec::with_capacity(wanted.len());
        for (position, entry) in wanted {
            match self.stream.get_raw_message(entry.sequence).await {
                Ok(message) => chunks.push(Chunk {
                    seq: position,
                    count: entry.count,
                    batch: message.payload.to_vec().into(),
                }),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    // The stream's limits removed it meanwhile: the receiver sees the gap.
                    self.with_index(key, |index| index.by_position.remove(&position));
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
            self.indexes
                .lock()
                .expect("jetstream index lock")
                .remove(&(group_id, side));
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

    /// Forgets a group's index here (its pipe ended); the stream keeps its messages.
    pub fn forget(&self, group_id: Uuid) {
        let mut indexes = self.indexes.lock().expect("jetstream index lock");
        indexes.remove(&(group_id, Side::A));
        indexes.remove(&(group_id, Side::B));
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
    fn the_index_forgets_what_left_the_front_and_stays_within_the_limit() {
        let mut index = Index::default();
        for (pos, sequence) in [(0, 1), (10, 2), (20, 3)] {
            index.by_position.insert(
                pos,
                Entry {
                    sequence,
                    count: 10,
                },
            );
        }
        assert_eq!((index.frames(), index.tail()), (30, 30));
        index.forget_below(Some(2));
        assert_eq!(
            index.by_position.keys().copied().collect::<Vec<_>>(),
            [10, 20]
        );
        index.bound(1);
        assert_eq!(index.by_position.keys().copied().collect::<Vec<_>>(), [20]);
        index.forget_below(None);
        assert_eq!((index.frames(), index.tail()), (0, 0));
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
