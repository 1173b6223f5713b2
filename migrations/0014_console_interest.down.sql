DROP TABLE console_interest;
