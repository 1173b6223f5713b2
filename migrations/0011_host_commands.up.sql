-- Network diagnostics run on an agent's workstation for a dongle (`host`) join the dongle's history of
-- commands beside those typed on its UART console and those sent to it remotely.
ALTER TABLE cli_telemetry DROP CONSTRAINT cli_telemetry_source_check;
ALTER TABLE cli_telemetry ADD CONSTRAINT cli_telemetry_source_check
    CHECK (source IN ('uart', 'remote', 'host'));
