"""The databases: engines and dialects, the tables and their column types, the store that opens both, migration."""
