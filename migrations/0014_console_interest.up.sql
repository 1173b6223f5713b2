-- The console streams that each server instance's clients watch (SPEC 3.9), so that the instance where
-- a stream's events happen sends them to the instances that show them. A row lives while its instance
-- renews it; an instance that dies takes its rows with it.
CREATE TABLE console_interest (
    instance_id  uuid NOT NULL REFERENCES server_instances (instance_id) ON DELETE CASCADE,
    stream_kind  text NOT NULL CHECK (stream_kind IN ('dongle', 'group')),
    stream_id    uuid NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (instance_id, stream_kind, stream_id)
);
