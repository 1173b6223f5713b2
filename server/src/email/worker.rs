//! The mail worker: delivers due outbox messages, retrying failures with exponential backoff.
//!
//! It wakes when a handler queues mail in this process (a [`Notify`]) and otherwise polls, so mail queued
//! by another instance is sent too. It stops when the shutdown token is cancelled.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::outbox::{self, OutboxMail};
use super::smtp::SmtpMailer;
use super::templates::{Template, render};

/// How the worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub poll_interval: Duration,
    pub max_attempts: i32,
    pub retry_base: Duration,
}

/// How long a leased message is hidden from other workers while this one sends it.
const LEASE_SECS: f64 = 120.0;
/// The longest pause between two attempts of one message.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Runs until `shutdown` is cancelled.
pub async fn run(
    pool: PgPool,
    mailer: SmtpMailer,
    settings: WorkerSettings,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    tracing::info!("mail worker started");
    loop {
        if let Err(e) = deliver_due(&pool, &mailer, &settings).await {
            tracing::warn!(error = %e, "mail worker could not read the outbox");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
    tracing::info!("mail worker stopped");
}

/// Sends every message due now; returns how many were sent.
pub async fn deliver_due(
    pool: &PgPool,
    mailer: &SmtpMailer,
    settings: &WorkerSettings,
) -> Result<usize, sqlx::Error> {
    let mut sent = 0;
    loop {
        let batch = outbox::lease_due(pool, 20, LEASE_SECS).await?;
        if batch.is_empty() {
            return Ok(sent);
        }
        for mail in batch {
            if deliver_one(pool, mailer, settings, &mail).await? {
                sent += 1;
            }
        }
    }
}

async fn deliver_one(
    pool: &PgPool,
    mailer: &SmtpMailer,
    settings: &WorkerSettings,
    mail: &OutboxMail,
) -> Result<bool, sqlx::Error> {
    let Some(template) = Template::from_name(&mail.template) else {
        outbox::mark_attempt_failed(pool, mail.id, "unknown template", 0.0, true).await?;
        return Ok(false);
    };
    let (subject, body) = render(template, &mail.payload);
    match mailer.send(&mail.to_email, &subject, body).await {
        Ok(()) => {
            outbox::mark_sent(pool, mail.id).await?;
            metrics::counter!("mail_sent_total").increment(1);
            tracing::info!(mail_id = %mail.id, template = template.name(), "mail sent");
            Ok(true)
        }
        Err(e) => {
            let give_up = mail.attempts >= settings.max_attempts;
            let retry_in = backoff(settings.retry_base, mail.attempts);
            outbox::mark_attempt_failed(
                pool,
                mail.id,
                &e.to_string(),
                retry_in.as_secs_f64(),
                give_up,
            )
            .await?;
            metrics::counter!("mail_failed_attempts_total").increment(1);
            tracing::warn!(mail_id = %mail.id, attempts = mail.attempts, give_up, error = %e, "mail not sent");
            Ok(false)
        }
    }
}

/// The pause after the `attempts`-th failure: base, 2 x base, 4 x base, ... up to an hour.
pub fn backoff(base: Duration, attempts: i32) -> Duration {
    let exp = attempts.saturating_sub(1).clamp(0, 20) as u32;
    base.saturating_mul(2u32.saturating_pow(exp))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let base = Duration::from_secs(30);
        assert_eq!(backoff(base, 1), Duration::from_secs(30));
        assert_eq!(backoff(base, 2), Duration::from_secs(60));
        assert_eq!(backoff(base, 3), Duration::from_secs(120));
        assert_eq!(backoff(base, 50), MAX_BACKOFF);
    }
}
