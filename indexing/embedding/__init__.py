"""The embedding room: catalogs (what to embed) and the embedding job that turns a catalog state into a snapshot
of Parquet shards. Imports no other room of indexing/ (indexing/README.md)."""
