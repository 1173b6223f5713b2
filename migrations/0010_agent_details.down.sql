ALTER TABLE agents DROP COLUMN interfaces, DROP COLUMN protocol;
