-- Several server instances on one database: which instance holds each agent's control connection, which
-- instances are alive, and the mailbox through which instances hand each other agent requests, replies,
-- fire-and-forget messages and kicks (agents::cluster).

-- One row per running instance, beaten every few seconds. An instance whose beat is older than the
-- staleness window (15 s by default) counts as dead: its connections are ignored at once, and the next
-- live instance to beat deletes its row, which takes its connections and mailbox with it.
CREATE TABLE server_instances (
    instance_id  uuid PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_beat    timestamptz NOT NULL DEFAULT now()
);

-- The instance holding each agent's control WebSocket. The newest connection wins: a connect overwrites
-- the row, and a disconnect deletes it only while it still names that same connection (instance and
-- conn_id), so an old socket going away never unregisters a newer one.
CREATE TABLE agent_connections (
    agent_id      uuid PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    instance_id   uuid NOT NULL REFERENCES server_instances (instance_id) ON DELETE CASCADE,
    -- The holding instance's own number for the connection (unique within that instance).
    conn_id       bigint NOT NULL,
    connected_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_connections_instance_id_idx ON agent_connections (instance_id);

-- Messages between instances. Each is also sent as a NOTIFY to its recipient; the row is what makes
-- delivery survive a missed notification: the recipient claims a message by deleting its row (so the
-- notification and the periodic poll never both act on it) and the poll picks up what no notification
-- brought. `sealed` is AES-256-GCM under a key derived from the dongle-token master key, because
-- requests carry PINs and dongle tokens. The rows live for seconds and are worthless after their
-- expiry, so the table skips the write-ahead log: a database crash empties it, as if the messages had
-- timed out.
CREATE UNLOGGED TABLE agent_mailbox (
    id             uuid PRIMARY KEY,
    to_instance    uuid NOT NULL REFERENCES server_instances (instance_id) ON DELETE CASCADE,
    from_instance  uuid NOT NULL,
    sealed         text NOT NULL,
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agent_mailbox_to_instance_idx ON agent_mailbox (to_instance);
