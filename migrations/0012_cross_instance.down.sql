ALTER TABLE relay_sides DROP COLUMN served_by;

-- PostgreSQL cannot drop an enum value: the type is made again without it, CROSS_INSTANCE groups
-- becoming DEGRADED (what they were shown as before).
UPDATE dongle_groups SET mode = 'DEGRADED' WHERE mode = 'CROSS_INSTANCE';
ALTER TYPE group_mode RENAME TO group_mode_old;
CREATE TYPE group_mode AS ENUM ('INACTIVE', 'ACTIVE', 'DEGRADED');
ALTER TABLE dongle_groups
    ALTER COLUMN mode DROP DEFAULT,
    ALTER COLUMN mode TYPE group_mode USING mode::text::group_mode,
    ALTER COLUMN mode SET DEFAULT 'INACTIVE';
DROP TYPE group_mode_old;
