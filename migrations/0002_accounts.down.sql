-- Reverses 0002_accounts.up.sql.
DROP INDEX IF EXISTS audit_logs_target_idx;
DROP INDEX IF EXISTS audit_logs_action_idx;
DROP TABLE IF EXISTS rate_limits;
DROP INDEX IF EXISTS email_outbox_due_idx;
ALTER TABLE email_outbox DROP COLUMN IF EXISTS sent_at;
ALTER TABLE email_outbox DROP COLUMN IF EXISTS next_attempt_at;
ALTER TABLE users DROP COLUMN IF EXISTS email_verified_at;
ALTER TABLE sessions DROP COLUMN IF EXISTS absolute_expires_at;
ALTER TABLE sessions DROP COLUMN IF EXISTS last_seen_at;
ALTER TABLE sessions DROP CONSTRAINT IF EXISTS sessions_public_id_key;
ALTER TABLE sessions DROP COLUMN IF EXISTS public_id;
