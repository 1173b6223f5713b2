-- The v0.7 schema: thirteen tables, restated from the reference dashboard specification and made
-- stronger where the reference is weak (see SPEC section 2 and ARCHITECTURE.md).
--
-- Conventions:
--   * UUID primary keys (gen_random_uuid() is built into PostgreSQL 13 and later); sessions use a text key.
--   * Every timestamp is timestamptz.
--   * updated_at is kept current by the trigger function set_updated_at(), so no write path can forget it.

CREATE TYPE user_role AS ENUM ('user', 'super_admin');
CREATE TYPE user_status AS ENUM ('active', 'disabled');
CREATE TYPE dongle_ownership_state AS ENUM ('UNCLAIMED', 'CLAIMED_ACTIVE', 'RESET_DETECTED', 'SECURITY_HOLD');
CREATE TYPE group_mode AS ENUM ('INACTIVE', 'ACTIVE', 'DEGRADED');
CREATE TYPE can_mode AS ENUM ('normal', 'listen_only', 'loopback', 'ext_loop');
CREATE TYPE command_status AS ENUM ('queued', 'running', 'done', 'error', 'timeout');
CREATE TYPE email_status AS ENUM ('queued', 'sent', 'failed');

CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- The server stores emails normalised (trimmed, lower case); the check keeps every writer honest,
    -- so that uniqueness cannot be dodged by changing case.
    email         text NOT NULL CHECK (email = lower(btrim(email)) AND length(email) BETWEEN 3 AND 254),
    password_hash text NOT NULL,
    role          user_role NOT NULL DEFAULT 'user',
    status        user_status NOT NULL DEFAULT 'active',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_key UNIQUE (email)
);

CREATE TABLE sessions (
    -- Hex SHA-256 of the session id: the id itself never reaches the database.
    id          text PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    ip          text,
    user_agent  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sessions_user_id_idx ON sessions (user_id);
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);

CREATE TABLE agents (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent_name    text NOT NULL,
    hostname      text,
    os            text,
    version       text,
    last_seen_at  timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_user_id_idx ON agents (user_id);

CREATE TABLE agent_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id    uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    token_hash  text NOT NULL,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agent_tokens_token_hash_key UNIQUE (token_hash)
);
CREATE INDEX agent_tokens_agent_id_idx ON agent_tokens (agent_id);

CREATE TABLE dongles (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    device_id        text NOT NULL CONSTRAINT dongles_device_id_format CHECK (device_id ~ '^[0-9a-f]{16}$'),
    owner_user_id    uuid REFERENCES users (id) ON DELETE SET NULL,
    ownership_state  dongle_ownership_state NOT NULL DEFAULT 'UNCLAIMED',
    last_seen_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dongles_device_id_key UNIQUE (device_id)
);
CREATE INDEX dongles_owner_user_id_idx ON dongles (owner_user_id);

CREATE TABLE dongle_tokens (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dongle_id    uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    key_version  integer NOT NULL CHECK (key_version > 0),
    nonce        bytea NOT NULL CHECK (octet_length(nonce) = 12),
    -- AES-256-GCM ciphertext with its 16-byte tag appended.
    ciphertext   bytea NOT NULL CHECK (octet_length(ciphertext) >= 16),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dongle_tokens_dongle_id_key UNIQUE (dongle_id)
);

CREATE TABLE dongle_groups (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- A dongle that is in a group cannot be deleted: the group must go first.
    dongle_a_id  uuid NOT NULL REFERENCES dongles (id) ON DELETE RESTRICT,
    dongle_b_id  uuid NOT NULL REFERENCES dongles (id) ON DELETE RESTRICT,
    mode         group_mode NOT NULL DEFAULT 'INACTIVE',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dongle_groups_distinct_sides CHECK (dongle_a_id <> dongle_b_id)
);
-- The pair is unique in either order.
CREATE UNIQUE INDEX dongle_groups_pair_key
    ON dongle_groups (LEAST(dongle_a_id, dongle_b_id), GREATEST(dongle_a_id, dongle_b_id));
CREATE INDEX dongle_groups_user_id_idx ON dongle_groups (user_id);

-- The reference puts a unique index on each side column, which still lets a dongle be side A of one
-- group and side B of another. Here every membership is also a row keyed by the dongle alone, written by
-- a trigger in the same transaction as the group, so the primary key rejects a second group for a dongle
-- on either side, also when two transactions insert at once (the second waits on the first's index entry).
CREATE TABLE dongle_group_members (
    dongle_id   uuid PRIMARY KEY REFERENCES dongles (id) ON DELETE RESTRICT,
    group_id    uuid NOT NULL REFERENCES dongle_groups (id) ON DELETE CASCADE,
    side        char(1) NOT NULL CHECK (side IN ('a', 'b')),
    CONSTRAINT dongle_group_members_group_side_key UNIQUE (group_id, side)
);

CREATE FUNCTION dongle_groups_sync_members() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.dongle_a_id = OLD.dongle_a_id AND NEW.dongle_b_id = OLD.dongle_b_id THEN
            RETURN NEW;
        END IF;
        DELETE FROM dongle_group_members WHERE group_id = OLD.id;
    END IF;
    INSERT INTO dongle_group_members (dongle_id, group_id, side)
        VALUES (NEW.dongle_a_id, NEW.id, 'a'), (NEW.dongle_b_id, NEW.id, 'b');
    RETURN NEW;
END;
$$;
CREATE TRIGGER dongle_groups_members_sync
    AFTER INSERT OR UPDATE OF dongle_a_id, dongle_b_id ON dongle_groups
    FOR EACH ROW EXECUTE FUNCTION dongle_groups_sync_members();

CREATE TABLE can_configs (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dongle_id              uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    bitrate                integer NOT NULL CHECK (bitrate BETWEEN 10000 AND 1000000),
    sample_point_permille  smallint NOT NULL CHECK (sample_point_permille BETWEEN 500 AND 950),
    mode                   can_mode NOT NULL DEFAULT 'normal',
    use_raw                boolean NOT NULL DEFAULT false,
    -- Raw timing, checked against the widest controller the dongles carry (FDCAN nominal timing);
    -- the server checks the narrower bxCAN ranges for dongles that do not announce FD.
    prescaler              integer CHECK (prescaler BETWEEN 1 AND 1024),
    sjw                    smallint CHECK (sjw BETWEEN 1 AND 128),
    tseg1                  smallint CHECK (tseg1 BETWEEN 1 AND 256),
    tseg2                  smallint CHECK (tseg2 BETWEEN 1 AND 128),
    auto_retx              boolean NOT NULL DEFAULT true,
    tx_pause               boolean NOT NULL DEFAULT false,
    protocol_exc           boolean NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT can_configs_dongle_id_key UNIQUE (dongle_id),
    CONSTRAINT can_configs_sjw_le_tseg2 CHECK (sjw IS NULL OR tseg2 IS NULL OR sjw <= tseg2),
    CONSTRAINT can_configs_raw_complete CHECK (
        NOT use_raw OR (prescaler IS NOT NULL AND sjw IS NOT NULL AND tseg1 IS NOT NULL AND tseg2 IS NOT NULL))
);

CREATE TABLE commands (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dongle_id    uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    user_id      uuid REFERENCES users (id) ON DELETE SET NULL,
    command      text NOT NULL,
    args         jsonb NOT NULL DEFAULT '[]'::jsonb,
    status       command_status NOT NULL DEFAULT 'queued',
    stdout       text,
    stderr       text,
    exit_code    integer,
    started_at   timestamptz,
    finished_at  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX commands_dongle_id_created_at_idx ON commands (dongle_id, created_at);

CREATE TABLE audit_logs (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    actor_user_id  uuid REFERENCES users (id) ON DELETE SET NULL,
    action         text NOT NULL,
    target_type    text,
    target_id      text,
    ip             text,
    user_agent     text,
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_logs_actor_user_id_idx ON audit_logs (actor_user_id);
CREATE INDEX audit_logs_created_at_idx ON audit_logs (created_at);

CREATE TABLE email_verification_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT email_verification_tokens_token_hash_key UNIQUE (token_hash)
);
CREATE INDEX email_verification_tokens_user_id_idx ON email_verification_tokens (user_id);

CREATE TABLE password_reset_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  text NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT password_reset_tokens_token_hash_key UNIQUE (token_hash)
);
CREATE INDEX password_reset_tokens_user_id_idx ON password_reset_tokens (user_id);

CREATE TABLE email_outbox (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    to_email    text NOT NULL,
    template    text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}'::jsonb,
    status      email_status NOT NULL DEFAULT 'queued',
    attempts    integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- The mail worker reads only queued rows, oldest first.
CREATE INDEX email_outbox_queued_idx ON email_outbox (created_at) WHERE status = 'queued';

-- updated_at on every table that has it.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'users', 'sessions', 'agents', 'agent_tokens', 'dongles', 'dongle_tokens', 'dongle_groups',
        'can_configs', 'commands', 'audit_logs', 'email_verification_tokens', 'password_reset_tokens',
        'email_outbox'
    ] LOOP
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW EXECUTE FUNCTION set_updated_at()',
            t || '_set_updated_at', t);
    END LOOP;
END;
$$;
