-- A request that waits on an agent (a CAN configuration, say) takes a lease on its dongle instead of
-- holding a transaction or a lock across the round trip: the lease serialises such requests per dongle
-- on every instance, ends by itself at `until` if its holder dies, and holds no database connection
-- while the agent is asked.
CREATE TABLE dongle_leases (
    dongle_id  uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (length(purpose) BETWEEN 1 AND 32),
    holder     uuid NOT NULL,
    until      timestamptz NOT NULL,
    PRIMARY KEY (dongle_id, purpose)
);
