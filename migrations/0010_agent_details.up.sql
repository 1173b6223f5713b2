-- What an agent says about its workstation in its hello (v0.7 section 9.2): the control protocol it
-- speaks, and its network interfaces with which the LAN discovery uses and why not the others.
ALTER TABLE agents
    ADD COLUMN protocol integer,
    ADD COLUMN interfaces jsonb NOT NULL DEFAULT '[]'::jsonb;
