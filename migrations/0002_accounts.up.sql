-- Accounts (issue 5): what sessions, email verification, the mail worker and the rate limiter need
-- beyond the v0.7 schema.

-- Sessions expire twice over: `expires_at` is the idle deadline, pushed forward on every use but never past
-- `absolute_expires_at`, which is fixed at login. `public_id` names a session to its owner (list, end one)
-- without revealing the hash that keys it.
ALTER TABLE sessions ADD COLUMN public_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE sessions ADD CONSTRAINT sessions_public_id_key UNIQUE (public_id);
ALTER TABLE sessions ADD COLUMN last_seen_at timestamptz NOT NULL DEFAULT now();
-- The server always sets it; the default (the standard 12 hours) keeps any other writer bounded too.
ALTER TABLE sessions ADD COLUMN absolute_expires_at timestamptz NOT NULL DEFAULT (now() + interval '12 hours');
-- Sessions made before this migration end no later than they would have.
UPDATE sessions SET absolute_expires_at = expires_at;

-- When the user proved that the mailbox is theirs; NULL until then.
ALTER TABLE users ADD COLUMN email_verified_at timestamptz;

-- The mail worker leases a row by pushing next_attempt_at forward before it sends, so that several server
-- instances never send the same message twice at once; a failure leaves the lease as the retry backoff.
ALTER TABLE email_outbox ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE email_outbox ADD COLUMN sent_at timestamptz;
CREATE INDEX email_outbox_due_idx ON email_outbox (next_attempt_at) WHERE status = 'queued';

-- Fixed-window rate-limit counters, shared by every server instance. One row per (scope, key): the window
-- restarts when the first attempt after its end arrives.
CREATE TABLE rate_limits (
    scope         text NOT NULL,
    key           text NOT NULL,
    window_start  timestamptz NOT NULL DEFAULT now(),
    hits          integer NOT NULL DEFAULT 0 CHECK (hits >= 0),
    PRIMARY KEY (scope, key)
);
-- Housekeeping deletes windows that ended long ago.
CREATE INDEX rate_limits_window_start_idx ON rate_limits (window_start);

-- Audit queries filter by action and by target.
CREATE INDEX audit_logs_action_idx ON audit_logs (action);
CREATE INDEX audit_logs_target_idx ON audit_logs (target_type, target_id);
