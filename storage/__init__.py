"""Embedded SQLite storage: connections, migrations, the group-commit writer and the reads."""

# The console script (transcriptd_cli) checks for this: a ``storage`` package without it is another one's.
__transcriptd__ = True
