DELETE FROM cli_telemetry WHERE source = 'host';
ALTER TABLE cli_telemetry DROP CONSTRAINT cli_telemetry_source_check;
ALTER TABLE cli_telemetry ADD CONSTRAINT cli_telemetry_source_check
    CHECK (source IN ('uart', 'remote'));
