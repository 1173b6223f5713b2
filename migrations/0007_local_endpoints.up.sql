-- Local CAN endpoints (an agent's SocketCAN interface, slcan adapter or socketcand port) stand in for
-- dongles. Their device ids derive from the agent's id (control_proto::local_device_id), and they
-- belong to the agent's user without pairing. local_agent_id names the one agent that may report the
-- row; it is NULL for every real dongle, so no agent can claim a real dongle by calling it local, and
-- no other agent can take over an endpoint by reporting its id as a dongle.
ALTER TABLE dongles ADD COLUMN local_agent_id uuid REFERENCES agents (id) ON DELETE SET NULL;
CREATE INDEX dongles_local_agent_id_idx ON dongles (local_agent_id) WHERE local_agent_id IS NOT NULL;
