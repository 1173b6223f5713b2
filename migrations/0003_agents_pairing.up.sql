-- Agents, dongle discovery and pairing (issue 6): what presence, device reports, the pairing state machine
-- and token key rotation need beyond the v0.7 schema.

-- Agent tokens may expire (SPEC 3.11); NULL means they live until revoked.
ALTER TABLE agent_tokens ADD COLUMN expires_at timestamptz;

-- What the last device report said about a dongle. A report never touches owner_user_id or
-- ownership_state: those change only through pairing, unpair and admin actions.
ALTER TABLE dongles ADD COLUMN fw_build text;
ALTER TABLE dongles ADD COLUMN proto_ver smallint;
ALTER TABLE dongles ADD COLUMN capabilities bigint;
-- {"kind": "usb", "path": ..., "serial_number": ...} or {"kind": "lan", "addr": ...}
ALTER TABLE dongles ADD COLUMN transport jsonb;
ALTER TABLE dongles ADD COLUMN pairing_mode boolean NOT NULL DEFAULT false;
-- The agent of the last sighting and whether that agent still lists the dongle as present; "seen now"
-- also needs that agent to be online (a heartbeat in the last 30 s).
ALTER TABLE dongles ADD COLUMN last_agent_id uuid REFERENCES agents (id) ON DELETE SET NULL;
ALTER TABLE dongles ADD COLUMN present boolean NOT NULL DEFAULT false;
-- Why a dongle is on SECURITY_HOLD (e.g. too_many_wrong_pins, too_many_pairing_starts, reset_detected).
ALTER TABLE dongles ADD COLUMN hold_reason text;
CREATE INDEX dongles_last_agent_id_idx ON dongles (last_agent_id);

-- Which agents see a dongle now. A LAN dongle may be seen by several workstations at once, each of them
-- able to serve it; the columns on `dongles` above keep only the latest sighting, for display.
CREATE TABLE dongle_sightings (
    dongle_id     uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    agent_id      uuid NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    present       boolean NOT NULL DEFAULT true,
    pairing_mode  boolean NOT NULL DEFAULT false,
    transport     jsonb,
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dongle_id, agent_id)
);
CREATE INDEX dongle_sightings_agent_id_idx ON dongle_sightings (agent_id);
CREATE TRIGGER dongle_sightings_set_updated_at BEFORE UPDATE ON dongle_sightings
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- One pairing window (120 s) opened by `pairing-mode start`. The server counts wrong PINs here, so the
-- limit holds whatever the dongle does.
CREATE TYPE pairing_status AS ENUM ('open', 'paired', 'expired', 'held', 'cancelled');
CREATE TABLE pairing_sessions (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dongle_id      uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent_id       uuid REFERENCES agents (id) ON DELETE SET NULL,
    -- The dongle's 16-byte pairing nonce, hex; not a secret without the PIN.
    pairing_nonce  text NOT NULL CHECK (pairing_nonce ~ '^[0-9a-f]{32}$'),
    status         pairing_status NOT NULL DEFAULT 'open',
    wrong_pins     integer NOT NULL DEFAULT 0 CHECK (wrong_pins >= 0),
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pairing_sessions_dongle_created_idx ON pairing_sessions (dongle_id, created_at);
CREATE TRIGGER pairing_sessions_set_updated_at BEFORE UPDATE ON pairing_sessions
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Key rotation walks the rows of older versions.
CREATE INDEX dongle_tokens_key_version_idx ON dongle_tokens (key_version);
