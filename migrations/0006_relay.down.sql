DROP TABLE relay_buffer;
DROP TABLE relay_sides;
ALTER TABLE dongle_groups DROP COLUMN buffer_pressure;
