//! The console across several instances on one database: a client sees a stream's events whichever
//! instance it reached, wherever they happened.
//!
//! # How it works
//!
//! - **Interest.** Every [`INTEREST_REFRESH`] (and at once when a stream gets a subscriber) an instance
//!   writes the streams its clients watch to `console_interest`, each row good for [`INTEREST_TTL`], and
//!   removes the rows of streams nobody watches any more; when its set changed it says so on
//!   [`INTEREST_CHANNEL`], and every instance reads the other live instances' rows again. A dead
//!   instance's rows go with its `server_instances` row, and are ignored as soon as its beat is stale.
//! - **Events.** The console hands every event of a stream another instance watches to this module's
//!   queue (bounded: an overflow is counted in `console_forward_dropped_total`, and only the other
//!   instances' views miss it). Events for one instance are batched for up to [`LINGER`], sealed with
//!   the dongle-token master key as the messages between agents' hubs are (command output may be
//!   secret, and any database session can LISTEN), and sent with `NOTIFY` on that instance's own
//!   console channel ([`channel_of`]). The receiver shows them as they are: the sender already sampled
//!   the frames, and an event from a peer is never sent on again, so nothing loops. A notice seals the
//!   time it was sent; a receiver shows it only within [`FRESH`] and only once, so a notice that a
//!   database session captured and sent again is not shown twice. Refusals are counted in
//!   `console_forward_refused_total`, items a receiver cannot read in `console_forward_unreadable_total`.
//! - **Bus load.** An instance counts the frames it sees of a dongle; every [`SHARE_PERIOD`] it sends
//!   what it counted of the dongles other instances watch, and they add it to their own meter. So a
//!   `bus_load` event covers the dongle's traffic wherever the server saw it.
//!
//! Nothing here is durable: a notification lost while a listening connection was down is a moment of a
//! view missed, as with any console event (the frames themselves are in the relay's buffer). Without
//! LISTEN (`ClusterSettings::listen` off, for a pooler that cannot LISTEN), nothing is forwarded, and a
//! console shows only the events of the instance its client reached.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Console, ConsoleEvent, Outgoing, StreamKey};
use crate::agents::cluster::{Envelope, NOTIFY_PAYLOAD_MAX, seal, unseal};
use crate::dongle_tokens::KeyRing;
use crate::listen::{WAKE_QUEUE, Wake, listen_loop};

/// How often an instance renews the streams its clients watch and reads the others'.
pub const INTEREST_REFRESH: Duration = Duration::from_secs(2);
/// How long a row of `console_interest` is good for without being renewed.
pub const INTEREST_TTL: Duration = Duration::from_secs(6);
/// The channel on which an instance says that the streams its clients watch changed.
pub const INTEREST_CHANNEL: &str = "console_interest";
/// How long an event may wait for others to share its notification.
pub const LINGER: Duration = Duration::from_millis(10);
/// How often the counts of watched dongles' buses are sent.
pub const SHARE_PERIOD: Duration = Duration::from_secs(1);
/// How many events may wait to be sent to other instances.
const QUEUE: usize = 4096;
/// The most JSON of items (and their brackets) one notification carries: with the rest of its plain
/// text ([`PLAIN_HEAD`]), sealed and in base64 with its envelope, it stays under PostgreSQL's limit
/// for a payload ([`NOTIFY_PAYLOAD_MAX`]).
const MAX_PLAIN: usize = (NOTIFY_PAYLOAD_MAX - 400) / 4 * 3 - 32 - PLAIN_HEAD;
/// The bytes of a notification's plain text besides its items: `{"at":<ms>,"items":[` and `]}`.
const PLAIN_HEAD: usize = 48;
/// A notification older than this (or this far in the future, by the sender's clock) is not shown:
/// with the ids of the last [`SEEN_IDS`] notifications, this keeps a notification that a database
/// session captured and sent again from being shown twice.
const FRESH: Duration = Duration::from_secs(30);
/// How many notification ids a receiver remembers.
const SEEN_IDS: usize = 8192;
/// The label the sealing key of console traffic is derived with.
const SEAL_LABEL: &[u8] = b"bridge-server/console/v1";

/// The console channel of an instance.
pub fn channel_of(instance_id: Uuid) -> String {
    format!("console_{}", instance_id.simple())
}

/// What the instance needs to reach the others.
#[derive(Clone)]
pub struct PeerSettings {
    pub pool: PgPool,
    pub keys: Arc<KeyRing>,
    pub instance_id: Uuid,
    /// An instance whose beat is older than this is dead (`ClusterSettings::stale_after`).
    pub stale_after: Duration,
}

/// One thing sent to another instance.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Item {
    Event {
        key: StreamKey,
        event: ConsoleEvent,
    },
    BusCounts {
        dongle_id: Uuid,
        frames: u64,
        bits: u64,
    },
}

/// What a notification seals: when it was sent (milliseconds since the Unix epoch) and its items, each
/// read on its own, so that one a receiver cannot read (from a newer version, during an upgrade)
/// costs only itself.
#[derive(Deserialize)]
struct Sealed {
    at: u64,
    items: Vec<serde_json::Value>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A notification's payload: routing in clear, the items sealed.
#[derive(Serialize, Deserialize)]
struct Notice {
    id: Uuid,
    from: Uuid,
    to: Uuid,
    sealed: String,
}

/// Which instances watch which streams, as the last read of `console_interest` found.
type Watchers = Arc<Mutex<HashMap<StreamKey, Vec<Uuid>>>>;

/// Forwards this instance's console events to the instances that watch their streams, and shows theirs
/// here, until `shutdown`.
pub async fn run(settings: PeerSettings, console: Arc<Console>, shutdown: CancellationToken) {
    let outgoing = console.forward_to_peers(QUEUE);
    console.bus_meter.share();
    let watchers: Watchers = Arc::default();
    let interest_changed = Arc::new(Notify::new());
    let tasks = [
        tokio::spawn(receive(settings.clone(), console.clone(), shutdown.clone())),
        tokio::spawn(listen_for_interest(
            settings.pool.clone(),
            interest_changed.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(keep_interest(
            settings.clone(),
            console.clone(),
            watchers.clone(),
            interest_changed,
            shutdown.clone(),
        )),
        tokio::spawn(send(settings, console, watchers, outgoing, shutdown)),
    ];
    for task in tasks {
        let _ = task.await;
    }
}

/// Wakes [`keep_interest`] when another instance's watched streams changed.
async fn listen_for_interest(pool: PgPool, changed: Arc<Notify>, shutdown: CancellationToken) {
    let (wake_tx, mut wake_rx) = mpsc::channel(WAKE_QUEUE);
    let listener = tokio::spawn(listen_loop(
        pool,
        INTEREST_CHANNEL.to_string(),
        wake_tx,
        shutdown,
    ));
    while wake_rx.recv().await.is_some() {
        changed.notify_one();
    }
    let _ = listener.await;
}

/// Keeps this instance's rows of `console_interest` and its view of the others' up to date.
async fn keep_interest(
    settings: PeerSettings,
    console: Arc<Console>,
    watchers: Watchers,
    others_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut announced: HashSet<StreamKey> = HashSet::new();
    loop {
        let here: HashSet<StreamKey> = console.watched_here().into_iter().collect();
        match register(&settings, &here).await {
            Ok(()) => {
                if here != announced {
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(INTEREST_CHANNEL)
                        .bind(settings.instance_id.to_string())
                        .execute(&settings.pool)
                        .await
                    {
                        tracing::debug!(error = %e, "could not announce the watched console streams");
                    }
                    announced = here;
                }
            }
            // The next round tries again; meanwhile the rows written before stay good for their TTL.
            Err(e) => tracing::warn!(error = %e, "could not record the watched console streams"),
        }
        match others(&settings).await {
            Ok(found) => {
                console.set_wanted(found.keys().copied().collect());
                *watchers.lock().expect("watchers lock") = found;
            }
            Err(e) => tracing::warn!(error = %e, "could not read what other instances watch"),
        }
        tokio::select! {
            () = tokio::time::sleep(INTEREST_REFRESH) => {}
            () = console.watched_changed.notified() => {}
            () = others_changed.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn kind_and_id(key: StreamKey) -> (&'static str, Uuid) {
    match key {
        StreamKey::Dongle(id) => ("dongle", id),
        StreamKey::Group(id) => ("group", id),
    }
}

/// Writes the streams this instance watches (renewing their rows) and removes the others of its rows,
/// and the long-expired rows of any instance.
async fn register(settings: &PeerSettings, here: &HashSet<StreamKey>) -> Result<(), sqlx::Error> {
    let (kinds, ids): (Vec<&str>, Vec<Uuid>) = here.iter().map(|k| kind_and_id(*k)).unzip();
    let mut tx = settings.pool.begin().await?;
    sqlx::query(
        "INSERT INTO console_interest (instance_id, stream_kind, stream_id, expires_at) \
         SELECT $1, k, i, now() + make_interval(secs => $4) FROM unnest($2::text[], $3::uuid[]) AS t(k, i) \
         ON CONFLICT (instance_id, stream_kind, stream_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
    )
    .bind(settings.instance_id)
    .bind(&kinds)
    .bind(&ids)
    .bind(INTEREST_TTL.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "DELETE FROM console_interest WHERE (instance_id = $1 AND (stream_kind, stream_id) NOT IN \
           (SELECT k, i FROM unnest($2::text[], $3::uuid[]) AS t(k, i))) \
         OR expires_at < now() - interval '1 minute'",
    )
    .bind(settings.instance_id)
    .bind(&kinds)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The streams that clients of the other live instances watch, with those instances.
async fn others(settings: &PeerSettings) -> Result<HashMap<StreamKey, Vec<Uuid>>, sqlx::Error> {
    let rows: Vec<(Uuid, String, Uuid)> = sqlx::query_as(
        "SELECT c.instance_id, c.stream_kind, c.stream_id FROM console_interest c \
         JOIN server_instances s USING (instance_id) \
         WHERE c.instance_id <> $1 AND c.expires_at > now() \
           AND s.last_beat > now() - make_interval(secs => $2)",
    )
    .bind(settings.instance_id)
    .bind(settings.stale_after.as_secs_f64())
    .fetch_all(&settings.pool)
    .await?;
    let mut found: HashMap<StreamKey, Vec<Uuid>> = HashMap::new();
    for (instance_id, kind, id) in rows {
        let key = match kind.as_str() {
            "dongle" => StreamKey::Dongle(id),
            "group" => StreamKey::Group(id),
            _ => continue,
        };
        found.entry(key).or_default().push(instance_id);
    }
    Ok(found)
}

/// The items waiting for one instance, as the JSON array they will be sent as (without its brackets).
#[derive(Default)]
struct Batch {
    json: String,
    items: u64,
}

/// Sends queued events (and the shared bus counts) to the instances that watch their streams.
async fn send(
    settings: PeerSettings,
    console: Arc<Console>,
    watchers: Watchers,
    mut outgoing: mpsc::Receiver<Outgoing>,
    shutdown: CancellationToken,
) {
    let mut batches: HashMap<Uuid, Batch> = HashMap::new();
    let mut flush_at: Option<Instant> = None;
    let mut share = tokio::time::interval(SHARE_PERIOD);
    share.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let linger = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            next = outgoing.recv() => {
                let Some(first) = next else { return };
                let mut next = Some(first);
                while let Some(Outgoing { key, stored }) = next {
                    let to = watchers.lock().expect("watchers lock").get(&key).cloned();
                    if let Some(to) = to {
                        let item = Item::Event { key, event: stored.event.clone() };
                        add(&settings, &mut batches, &to, &item).await;
                    }
                    next = outgoing.try_recv().ok();
                }
            }
            _ = share.tick() => {
                let counts = console.bus_meter.take_shared();
                for (dongle_id, (frames, bits)) in counts {
                    let to = watchers
                        .lock()
                        .expect("watchers lock")
                        .get(&StreamKey::Dongle(dongle_id))
                        .cloned();
                    if let Some(to) = to {
                        let item = Item::BusCounts { dongle_id, frames, bits };
                        add(&settings, &mut batches, &to, &item).await;
                    }
                }
            }
            () = linger => {
                for (to, batch) in batches.drain() {
                    notify(&settings, to, batch).await;
                }
                flush_at = None;
                continue;
            }
        }
        if flush_at.is_none() && !batches.is_empty() {
            flush_at = Some(Instant::now() + LINGER);
        }
    }
}

/// Adds `item` to the batch of each instance in `to`, sending a batch first when the item would not
/// fit in it.
async fn add(
    settings: &PeerSettings,
    batches: &mut HashMap<Uuid, Batch>,
    to: &[Uuid],
    item: &Item,
) {
    let json = serde_json::to_string(item).expect("console items always serialize");
    if json.len() + 2 > MAX_PLAIN {
        // A command's long output, for example: the other instances' clients read it from the
        // command's record instead.
        metrics::counter!("console_forward_dropped_total").increment(to.len() as u64);
        tracing::debug!(
            bytes = json.len(),
            "a console event too large to forward was left out"
        );
        return;
    }
    for instance in to {
        let batch = batches.entry(*instance).or_default();
        if batch.json.len() + json.len() + 3 > MAX_PLAIN {
            let full = std::mem::take(batch);
            notify(settings, *instance, full).await;
        }
        let batch = batches.entry(*instance).or_default();
        if !batch.json.is_empty() {
            batch.json.push(',');
        }
        batch.json.push_str(&json);
        batch.items += 1;
    }
}

/// Seals a batch and notifies its instance.
async fn notify(settings: &PeerSettings, to: Uuid, batch: Batch) {
    if batch.items == 0 {
        return;
    }
    let plain = format!("{{\"at\":{},\"items\":[{}]}}", now_ms(), batch.json);
    let id = Uuid::new_v4();
    let envelope = Envelope {
        label: SEAL_LABEL,
        id,
        from: settings.instance_id,
        to,
    };
    let sent = match seal(&settings.keys, envelope, plain.as_bytes()) {
        Ok(sealed) => {
            let notice = Notice {
                id,
                from: settings.instance_id,
                to,
                sealed,
            };
            let payload = serde_json::to_string(&notice).expect("a notice always serializes");
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel_of(to))
                .bind(payload)
                .execute(&settings.pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match sent {
        Ok(()) => metrics::counter!("console_forwarded_total").increment(batch.items),
        Err(error) => {
            metrics::counter!("console_forward_dropped_total").increment(batch.items);
            tracing::debug!(%to, %error, "could not send console events to another instance");
        }
    }
}

/// The ids of the notifications shown lately, to show none twice.
#[derive(Default)]
struct Seen {
    ids: HashSet<Uuid>,
    order: std::collections::VecDeque<(Uuid, u64)>,
    /// The latest send time of the ids forgotten: a notice sent no later than that might be one of
    /// them, so it is not shown (past [`SEEN_IDS`] notices in [`FRESH`], that costs a view, never a
    /// duplicate).
    forgotten_until: u64,
}

impl Seen {
    /// Remembers `id`, sent at `at`; false when it was (or may have been) seen already.
    fn first_time(&mut self, id: Uuid, at: u64) -> bool {
        if at <= self.forgotten_until || !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((id, at));
        if self.order.len() > SEEN_IDS
            && let Some((old, old_at)) = self.order.pop_front()
        {
            self.ids.remove(&old);
            self.forgotten_until = self.forgotten_until.max(old_at);
        }
        true
    }
}

/// Shows here the events other instances send this one.
async fn receive(settings: PeerSettings, console: Arc<Console>, shutdown: CancellationToken) {
    let (wake_tx, mut wake_rx) = mpsc::channel(WAKE_QUEUE);
    let listener = tokio::spawn(listen_loop(
        settings.pool.clone(),
        channel_of(settings.instance_id),
        wake_tx,
        shutdown,
    ));
    let mut seen = Seen::default();
    while let Some(wake) = wake_rx.recv().await {
        // A reopened connection missed what was sent meanwhile: a view, nothing to recover.
        let Wake::Notice(payload) = wake else {
            continue;
        };
        match open(&settings, &payload, &mut seen, now_ms()) {
            Ok(items) => show(&console, items),
            Err(why) => {
                metrics::counter!("console_forward_refused_total").increment(1);
                tracing::debug!(why, "ignored console events from another instance");
            }
        }
    }
    let _ = listener.await;
}

/// Opens a notification's items, at `now` (milliseconds since the Unix epoch). The reason it was not
/// shown names what was wrong, never a value.
fn open(
    settings: &PeerSettings,
    payload: &str,
    seen: &mut Seen,
    now: u64,
) -> Result<Vec<Item>, &'static str> {
    let notice: Notice = serde_json::from_str(payload).map_err(|_| "not a notice")?;
    if notice.to != settings.instance_id {
        return Err("addressed to another instance");
    }
    let envelope = Envelope {
        label: SEAL_LABEL,
        id: notice.id,
        from: notice.from,
        to: notice.to,
    };
    let plain = unseal(&settings.keys, envelope, &notice.sealed).map_err(|_| "does not open")?;
    let sealed: Sealed = serde_json::from_slice(&plain).map_err(|_| "malformed")?;
    if sealed.at.abs_diff(now) > FRESH.as_millis() as u64 {
        return Err("too old (or from the future)");
    }
    if !seen.first_time(notice.id, sealed.at) {
        return Err("shown already");
    }
    let mut items = Vec::with_capacity(sealed.items.len());
    for item in sealed.items {
        match serde_json::from_value::<Item>(item) {
            Ok(item) => items.push(item),
            Err(_) => metrics::counter!("console_forward_unreadable_total").increment(1),
        }
    }
    Ok(items)
}

fn show(console: &Console, items: Vec<Item>) {
    for item in items {
        match item {
            // Each instance makes its own from the shared counts; one from a peer would show twice.
            Item::Event {
                event: ConsoleEvent::BusLoad { .. },
                ..
            } => {}
            Item::Event { key, event } => console.publish_from_peer(key, event),
            Item::BusCounts {
                dongle_id,
                frames,
                bits,
            } => console.bus_meter.add_from_peer(dongle_id, frames, bits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_fits_in_a_notification() {
        let keys = KeyRing::default();
        let items = "x".repeat(MAX_PLAIN + 2);
        let plain = format!("{{\"at\":{},\"items\":[{items}]}}", u64::MAX).into_bytes();
        assert!(plain.len() <= MAX_PLAIN + 2 + PLAIN_HEAD);
        let envelope = Envelope {
            label: SEAL_LABEL,
            id: Uuid::new_v4(),
            from: Uuid::new_v4(),
            to: Uuid::new_v4(),
        };
        let sealed = seal(&keys, envelope, &plain).unwrap();
        let notice = Notice {
            id: envelope.id,
            from: envelope.from,
            to: envelope.to,
            sealed,
        };
        let payload = serde_json::to_string(&notice).unwrap();
        assert!(payload.len() <= NOTIFY_PAYLOAD_MAX, "{}", payload.len());
    }

    /// A notice of `items` from another instance to `me`, sent at `at`.
    fn notice(keys: &KeyRing, me: Uuid, at: u64, items: &str) -> (Uuid, String) {
        let id = Uuid::new_v4();
        let from = Uuid::new_v4();
        let envelope = Envelope {
            label: SEAL_LABEL,
            id,
            from,
            to: me,
        };
        let plain = format!("{{\"at\":{at},\"items\":[{items}]}}");
        let sealed = seal(keys, envelope, plain.as_bytes()).unwrap();
        let payload = serde_json::to_string(&Notice {
            id,
            from,
            to: me,
            sealed,
        })
        .unwrap();
        (id, payload)
    }

    #[tokio::test]
    async fn a_notice_is_shown_once_while_fresh_and_an_unreadable_item_costs_only_itself() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let settings = PeerSettings {
            pool,
            keys: Arc::new(KeyRing::default()),
            instance_id: Uuid::new_v4(),
            stale_after: Duration::from_secs(15),
        };
        let counts = |d: Uuid| {
            format!("{{\"kind\":\"bus_counts\",\"dongle_id\":\"{d}\",\"frames\":3,\"bits\":300}}")
        };
        let d = Uuid::new_v4();
        let now = now_ms();
        let mut seen = Seen::default();
        let items = format!("{},{{\"kind\":\"from_a_newer_version\"}}", counts(d));
        let (_, payload) = notice(&settings.keys, settings.instance_id, now, &items);
        let shown = open(&settings, &payload, &mut seen, now).unwrap();
        assert_eq!(
            shown.len(),
            1,
            "the unreadable item is left out, the other shown"
        );
        assert_eq!(
            open(&settings, &payload, &mut seen, now).err(),
            Some("shown already"),
            "sent again"
        );
        let (_, stale) = notice(
            &settings.keys,
            settings.instance_id,
            now - 31_000,
            &counts(d),
        );
        assert!(open(&settings, &stale, &mut seen, now).is_err(), "too old");
        let (_, elsewhere) = notice(&settings.keys, Uuid::new_v4(), now, &counts(d));
        assert!(
            open(&settings, &elsewhere, &mut seen, now).is_err(),
            "not ours"
        );
    }

    #[test]
    fn a_notice_older_than_the_ids_forgotten_is_not_shown() {
        let mut seen = Seen::default();
        for at in 0..=SEEN_IDS as u64 {
            assert!(seen.first_time(Uuid::new_v4(), 1_000 + at));
        }
        // The first id is forgotten now: a notice sent no later than it might be that one again.
        assert!(!seen.first_time(Uuid::new_v4(), 1_000));
        assert!(seen.first_time(Uuid::new_v4(), 1_000 + SEEN_IDS as u64 + 1));
        assert!(seen.ids.len() <= SEEN_IDS + 1);
    }

    #[test]
    fn an_event_reads_back_as_it_was_sent() {
        let key = StreamKey::Dongle(Uuid::new_v4());
        let event = ConsoleEvent::can_frame(
            Uuid::nil(),
            "tx",
            "2026-12-07T00:00:00.000000Z",
            super::super::FrameView {
                can_id: 0x7df,
                is_extended: false,
                fd: false,
                data: &[2, 1, 0x0c],
                dongle_ts_us: 0,
            },
            Some(4),
        );
        let json = serde_json::to_string(&Item::Event {
            key,
            event: event.clone(),
        })
        .unwrap();
        let Item::Event { key: k, event: e } = serde_json::from_str(&json).unwrap() else {
            panic!("an event");
        };
        assert_eq!(k, key);
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::to_value(&event).unwrap()
        );
        // A word the console does not use is refused, not taken in.
        let odd = json.replace("\"tx\"", "\"sideways\"");
        assert!(serde_json::from_str::<Item>(&odd).is_err());
    }
}
