DROP TABLE pairing_holds;
