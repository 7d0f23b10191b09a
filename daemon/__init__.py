"""transcriptd: answers conversation webhooks in milliseconds and stores every message exactly once."""

__version__ = "0.1.0"
# The console script (transcriptd_cli) checks for this before it runs anything: a ``daemon`` package without
# it is another distribution's (python-daemon installs one too) shadowing ours.
__transcriptd__ = True
