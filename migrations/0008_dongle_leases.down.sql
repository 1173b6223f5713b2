DROP TABLE dongle_leases;
