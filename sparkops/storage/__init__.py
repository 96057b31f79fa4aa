"""The databases: engines and dialects, the tables, the store that opens both, migration."""
