DROP TABLE agent_mailbox;
DROP TABLE agent_connections;
DROP TABLE server_instances;
