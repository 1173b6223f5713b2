-- The history of commands run on each dongle, wherever they were typed (SPEC 4.2): on its UART console
-- (reported by the dongle as REMP CLI_TELEMETRY, through its agent) or remotely through the API (a
-- finished command). The newest rows per dongle are kept (the server trims the rest as it writes), so
-- a dongle whose console is typed on all day cannot fill the table.
CREATE TABLE cli_telemetry (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    dongle_id      uuid NOT NULL REFERENCES dongles (id) ON DELETE CASCADE,
    owner_user_id  uuid REFERENCES users (id) ON DELETE SET NULL,
    source         text NOT NULL CHECK (source IN ('uart', 'remote')),
    -- The dongle's id for a UART report, the command's id for a remote one: a report sent twice (the
    -- agent sends until acknowledged) is one row.
    report_id      uuid NOT NULL,
    command        text NOT NULL CHECK (length(command) <= 4096),
    output         text NOT NULL,
    exit_code      integer,
    truncated      boolean NOT NULL DEFAULT false,
    error          boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dongle_id, report_id)
);
CREATE INDEX cli_telemetry_dongle_created ON cli_telemetry (dongle_id, created_at);
CREATE TRIGGER cli_telemetry_set_updated_at BEFORE UPDATE ON cli_telemetry
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
