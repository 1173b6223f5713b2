DROP INDEX dongles_local_agent_id_idx;
ALTER TABLE dongles DROP COLUMN local_agent_id;
