-- CAN configuration with the dongle's acknowledgement, and commands that survive lost connections and
-- server restarts (SPEC 3.6, 3.7).

-- What the dongle reported it runs with after the stored configuration was applied, and when. The
-- requested values stay in the v0.7 columns; these are the dongle's answer, so they carry no range
-- checks of their own beyond the column types.
ALTER TABLE can_configs ADD COLUMN effective_bitrate bigint;
ALTER TABLE can_configs ADD COLUMN effective_sample_point_permille integer;
ALTER TABLE can_configs ADD COLUMN effective_prescaler integer;
ALTER TABLE can_configs ADD COLUMN effective_sjw smallint;
ALTER TABLE can_configs ADD COLUMN effective_tseg1 smallint;
ALTER TABLE can_configs ADD COLUMN effective_tseg2 smallint;
ALTER TABLE can_configs ADD COLUMN effective_mode can_mode;
ALTER TABLE can_configs ADD COLUMN effective_use_raw boolean;
ALTER TABLE can_configs ADD COLUMN effective_auto_retx boolean;
ALTER TABLE can_configs ADD COLUMN effective_tx_pause boolean;
ALTER TABLE can_configs ADD COLUMN effective_protocol_exc boolean;
ALTER TABLE can_configs ADD COLUMN applied_at timestamptz;

-- The server's deadline of a command is derived from these columns alone (started_at, or created_at
-- while queued, plus timeout_ms and a grace), so a restarted server times out what an earlier one
-- dispatched.
ALTER TABLE commands ADD COLUMN timeout_ms integer NOT NULL DEFAULT 5000
    CONSTRAINT commands_timeout_ms_positive CHECK (timeout_ms > 0);
-- The REMP CLI's dangerous-command flag as it is sent; only a development server ever sets it.
ALTER TABLE commands ADD COLUMN allow_dangerous boolean NOT NULL DEFAULT false;
-- The dongle cut the output, or the server did at its own cap.
ALTER TABLE commands ADD COLUMN truncated boolean NOT NULL DEFAULT false;
-- How the command ended as the agent reported it (done, denied, error, timeout), or server_timeout
-- when the server gave up waiting; status is what this maps to.
ALTER TABLE commands ADD COLUMN outcome text;
-- The agent the command was last sent to. A command an agent accepted is sent again only to that
-- agent, which knows it by id and never runs it twice.
ALTER TABLE commands ADD COLUMN agent_id uuid REFERENCES agents (id) ON DELETE SET NULL;
-- When a dispatcher should (re)send the command; NULL when nothing is to be sent (accepted and
-- waiting for the result, or finished). A dispatcher that claims a row moves this into the future, so
-- several server instances do not send it at once.
ALTER TABLE commands ADD COLUMN next_dispatch_at timestamptz;
ALTER TABLE commands ALTER COLUMN next_dispatch_at SET DEFAULT now();
UPDATE commands SET next_dispatch_at = now() WHERE status IN ('queued', 'running');
ALTER TABLE commands ADD COLUMN dispatch_attempts integer NOT NULL DEFAULT 0;
-- States only move forward, and the timestamps say so. Rows written before this migration are brought
-- in line first, so that the constraints can be added to any database.
UPDATE commands SET finished_at = updated_at
    WHERE status IN ('done', 'error', 'timeout') AND finished_at IS NULL;
UPDATE commands SET finished_at = NULL WHERE status IN ('queued', 'running') AND finished_at IS NOT NULL;
UPDATE commands SET started_at = created_at WHERE status = 'running' AND started_at IS NULL;
ALTER TABLE commands ADD CONSTRAINT commands_finished_at_matches_status
    CHECK ((status IN ('done', 'error', 'timeout')) = (finished_at IS NOT NULL));
ALTER TABLE commands ADD CONSTRAINT commands_running_has_started_at
    CHECK (status <> 'running' OR started_at IS NOT NULL);
-- The dispatcher and the sweeper read only unfinished commands.
CREATE INDEX commands_unfinished_idx ON commands (next_dispatch_at)
    WHERE status IN ('queued', 'running');
CREATE INDEX commands_agent_id_idx ON commands (agent_id);
