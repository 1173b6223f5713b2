DROP TABLE cli_telemetry;
