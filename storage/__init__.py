"""Embedded SQLite storage: connections, migrations, the group-commit writer and the reads."""
