-- Groups and the relay (SPEC 3.8): each side's stream positions and counters, and the durable buffer of
-- frames on their way to a side whose agent is not connected.
--
-- Positions: every frame a side's agent sends for a group has a position in that side's stream (the
-- agent numbers them from the `next_seq` the server gives it). The relay keeps the position as it is,
-- so the stream towards the other side carries the same numbers: a gap (trimmed or skipped frames) is
-- harmless, since receivers only ever skip positions below the next one they expect.

-- Set when the relay had to trim a direction's buffer (retention reached): frames were lost. Cleared
-- when the group is ACTIVE again (both sides connected and the backlog delivered).
ALTER TABLE dongle_groups ADD COLUMN buffer_pressure boolean NOT NULL DEFAULT false;

-- One row per side of a group. Columns about the stream FROM this side's agent: next_in, frames_received,
-- agent_drops. Columns about the stream TOWARDS this side: acked_out, buffered_frames, frames_delivered,
-- frames_trimmed (so the direction a_to_b is described by side b's row).
CREATE TABLE relay_sides (
    group_id            uuid NOT NULL REFERENCES dongle_groups (id) ON DELETE CASCADE,
    side                char(1) NOT NULL CHECK (side IN ('a', 'b')),
    -- The first position the server has not accepted from this side. It never goes backwards, and it is
    -- written in the transaction that buffers the frames below it, so after a crash it never claims a
    -- frame the buffer does not hold.
    next_in             bigint NOT NULL DEFAULT 0 CHECK (next_in >= 0),
    frames_received     bigint NOT NULL DEFAULT 0 CHECK (frames_received >= 0),
    -- Frames the agent reports it dropped (a full queue), summed over its reports.
    agent_drops         bigint NOT NULL DEFAULT 0 CHECK (agent_drops >= 0),
    -- The agent's last running total, to turn the next report into an increment.
    agent_drops_last    bigint NOT NULL DEFAULT 0 CHECK (agent_drops_last >= 0),
    -- Every frame towards this side below this position was acknowledged by its agent.
    acked_out           bigint NOT NULL DEFAULT 0 CHECK (acked_out >= 0),
    -- The frames of relay_buffer towards this side, kept in the same transactions as the rows.
    buffered_frames     bigint NOT NULL DEFAULT 0 CHECK (buffered_frames >= 0),
    frames_delivered    bigint NOT NULL DEFAULT 0 CHECK (frames_delivered >= 0),
    frames_trimmed      bigint NOT NULL DEFAULT 0 CHECK (frames_trimmed >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, side)
);
CREATE TRIGGER relay_sides_set_updated_at BEFORE UPDATE ON relay_sides
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Frames on their way to a side that could not take them at once, one firmware-proto CAN batch per row,
-- in stream order by `seq` (the position of the row's first frame). A row leaves when the receiving
-- agent acknowledges it, when retention trims it, or with its group.
CREATE TABLE relay_buffer (
    group_id     uuid NOT NULL REFERENCES dongle_groups (id) ON DELETE CASCADE,
    direction    text NOT NULL CHECK (direction IN ('a_to_b', 'b_to_a')),
    seq          bigint NOT NULL CHECK (seq >= 0),
    frame_count  integer NOT NULL CHECK (frame_count > 0),
    frames       bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, direction, seq)
);
-- Retention by age deletes the oldest rows of a direction without reading the others.
CREATE INDEX relay_buffer_age_idx ON relay_buffer (group_id, direction, created_at);
