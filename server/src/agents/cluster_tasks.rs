//! The instance's cluster work for its [`AgentHub`]: beats, the listening connection, the poll of the
//! mailbox, and acting on the messages other instances post (requests for agents connected here, their
//! answers, messages and kicks). [`super::cluster`] is the transport; this drives the hub with it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::cluster::*;
use super::hub::AgentHub;
use crate::listen::{WAKE_QUEUE, Wake, listen_loop};

/// Aborts a task when dropped, so that aborting [`run`] (a crash in tests) also stops its helpers.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Registers this instance (one beat, so it is alive before any agent can connect) and starts the task
/// that beats, listens and polls until `shutdown`, when it removes the instance. Does nothing for a
/// hub without a cluster.
pub async fn start(hub: Arc<AgentHub>, shutdown: CancellationToken) -> JoinHandle<()> {
    if let Some(cluster) = hub.cluster()
        && let Err(e) = cluster.beat().await
    {
        tracing::warn!(error = %e, "could not register this server instance; retrying at the next beat");
    }
    tokio::spawn(run(hub, shutdown))
}

/// The instance's background work: beats, the listening connection, the poll, and acting on messages.
pub async fn run(hub: Arc<AgentHub>, shutdown: CancellationToken) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    let instance_id = cluster.instance_id;
    tracing::info!(%instance_id, "server instance joins the cluster");
    let settings = cluster.settings.clone();
    let mut beats = AbortOnDrop(tokio::spawn(beat_loop(hub.clone(), shutdown.clone())));
    let (wake_tx, mut wake_rx) = mpsc::channel(WAKE_QUEUE);
    let _listener = settings.listen.then(|| {
        AbortOnDrop(tokio::spawn(listen_loop(
            cluster.pool.clone(),
            channel_of(instance_id),
            wake_tx,
            shutdown.clone(),
        )))
    });
    // Messages on NATS, when the relay is there; a subscription that cannot be made leaves them to
    // the database's mailbox (the senders fall back to it when no receipt comes).
    let mut nats = match &cluster.nats {
        Some(mailbox) => match mailbox
            .client
            .subscribe(mailbox.subject_of(instance_id))
            .await
        {
            Ok(subscriber) => Some((mailbox.client.clone(), subscriber)),
            Err(e) => {
                tracing::warn!(error = %e, "could not read this instance's messages on NATS; they come through the database");
                None
            }
        },
        None => None,
    };
    let mut poll = tokio::time::interval(settings.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let pool_closed = cluster.pool.close_event();
    tokio::pin!(pool_closed);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            // The pool is closing (a test ended, or the process is stopping): nothing more can be done.
            _ = &mut pool_closed => return,
            wake = wake_rx.recv(), if settings.listen => match wake {
                Some(Wake::Notice(payload)) => on_notice(&hub, &payload).await,
                Some(Wake::Resync) => drain(&hub).await,
                // The listening task ended: at shutdown, or because the pool is closing.
                None if shutdown.is_cancelled() => break,
                None => return,
            },
            _ = poll.tick() => drain(&hub).await,
            message = next_on_nats(&mut nats) => match message {
                Some((client, message)) => on_nats(&hub, &client, message).await,
                None => {
                    tracing::warn!("this instance's NATS subscription ended; messages come through the database");
                    nats = None;
                }
            },
        }
    }
    // A beat still in flight would write the instance's row back after it left.
    beats.0.abort();
    let _ = (&mut beats.0).await;
    if let Some(cluster) = hub.cluster()
        && let Err(e) = cluster.leave().await
    {
        tracing::warn!(error = %e, "could not remove this server instance; others will find it stale");
    }
}

async fn beat_loop(hub: Arc<AgentHub>, shutdown: CancellationToken) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    let mut tick = tokio::time::interval(cluster.settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match cluster.beat().await {
            Ok(0) => {}
            Ok(dead) => tracing::info!(dead, "removed server instances that stopped beating"),
            Err(e) => {
                tracing::warn!(error = %e, "could not beat; other instances may take this one for dead")
            }
        }
        if let Err(e) = hub.reconcile().await {
            tracing::warn!(error = %e, "could not reconcile this instance's agent connections");
        }
    }
}

async fn on_notice(hub: &Arc<AgentHub>, payload: &str) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    let notice: Notice = match serde_json::from_str(payload) {
        Ok(notice) => notice,
        Err(e) => {
            tracing::warn!(error = %e, "a malformed notification on this instance's channel");
            return;
        }
    };
    if notice.to != cluster.instance_id {
        return;
    }
    match cluster.claim(notice.id).await {
        Ok(Some(true)) => deliver(hub, &notice, "notify").await,
        Ok(Some(false)) => tracing::debug!(from = %notice.from, "an expired message was dropped"),
        // The poll took it first.
        Ok(None) => {}
        // The poll will take it.
        Err(e) => tracing::warn!(error = %e, "could not claim a message; the poll will"),
    }
}

/// The next message on this instance's NATS subject; never without a subscription.
async fn next_on_nats(
    nats: &mut Option<(async_nats::Client, async_nats::Subscriber)>,
) -> Option<(async_nats::Client, async_nats::Message)> {
    use futures::StreamExt;
    let Some((client, subscriber)) = nats.as_mut() else {
        return std::future::pending().await;
    };
    let message = subscriber.next().await?;
    Some((client.clone(), message))
}

/// A message on NATS: its receipt first (the sender then does not write it to the database's
/// mailbox), then the same as a claimed row.
async fn on_nats(hub: &Arc<AgentHub>, client: &async_nats::Client, message: async_nats::Message) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    let notice: Notice = match serde_json::from_slice(&message.payload) {
        Ok(notice) => notice,
        Err(e) => {
            tracing::warn!(error = %e, "a malformed message on this instance's NATS subject");
            return;
        }
    };
    if notice.to != cluster.instance_id {
        return;
    }
    if let Some(reply) = message.reply
        && let Err(e) = client.publish(reply, Vec::new().into()).await
    {
        // The sender writes it to the mailbox too; it is acted on once all the same.
        tracing::debug!(error = %e, "could not confirm a message on NATS");
    }
    deliver(hub, &notice, "nats").await;
}

async fn drain(hub: &Arc<AgentHub>) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    match cluster.drain().await {
        Ok(notices) => {
            for notice in notices {
                deliver(hub, &notice, "poll").await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not poll this instance's mailbox"),
    }
}

/// Acts on a claimed message. A request waits for the agent in a task of its own, so one slow agent
/// never holds up the others' messages.
async fn deliver(hub: &Arc<AgentHub>, notice: &Notice, path: &'static str) {
    let Some(cluster) = hub.cluster() else {
        return;
    };
    let message = match cluster.open(notice) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(from = %notice.from, error = %e, "a message from another instance was dropped");
            return;
        }
    };
    // Only a message that opens is remembered: an id is no secret, and a forged notice must not make
    // the real one be skipped.
    if !cluster.first_time(notice.id) {
        tracing::debug!(from = %notice.from, "a message that came both ways was acted on once");
        return;
    }
    metrics::counter!("agent_hub_messages_delivered_total", "kind" => message.kind(), "path" => path)
        .increment(1);
    match message {
        Message::Request {
            request_id,
            agent_id,
            timeout_ms,
            body,
        } => {
            let hub = hub.clone();
            let from = notice.from;
            tokio::spawn(async move {
                let timeout = Duration::from_millis(timeout_ms).min(MAX_RELAYED_TIMEOUT);
                // Only this instance's own socket: a request is relayed at most once, never bounced on.
                let outcome = hub.request_here(agent_id, body, timeout).await;
                let reply = Message::Reply {
                    request_id,
                    agent_id,
                    outcome: outcome.into(),
                };
                if let Some(cluster) = hub.cluster()
                    && let Err(e) = cluster.post(from, &reply, MESSAGE_TTL).await
                {
                    tracing::warn!(%agent_id, to = %from, error = %e, "could not return a relayed reply");
                }
            });
        }
        Message::Reply {
            request_id,
            agent_id,
            outcome,
        } => {
            hub.complete_relayed(agent_id, request_id, outcome.into());
        }
        Message::Send { agent_id, message } => {
            if hub.send_here(agent_id, message).is_err() {
                tracing::debug!(%agent_id, "a relayed message found the agent gone");
            }
        }
        Message::Kick { agent_id, conn_id } => {
            hub.kick_here(agent_id, conn_id).await;
        }
    }
}
