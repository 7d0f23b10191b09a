"""The PostgreSQL backend: several transcriptd replicas on one server (see docs/postgresql.md)."""
