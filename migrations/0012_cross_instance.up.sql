-- A group whose two sides are connected to different server instances relays through the buffer and
-- a notification (groups::wake), not through one instance's memory: it is neither ACTIVE (both sides
-- on one instance) nor DEGRADED (a side away), and says so.
ALTER TYPE group_mode ADD VALUE IF NOT EXISTS 'CROSS_INSTANCE';

-- The instance holding the data connection of the agent serving this side, written by that instance's
-- pipe when the connection comes and cleared when it goes (or with the instance, when it dies). Another
-- instance that serves the other side reads it to tell CROSS_INSTANCE from DEGRADED.
ALTER TABLE relay_sides
    ADD COLUMN served_by uuid REFERENCES server_instances (instance_id) ON DELETE SET NULL;
