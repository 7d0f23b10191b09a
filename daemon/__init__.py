"""transcriptd: answers conversation webhooks in milliseconds and stores every message exactly once."""

__version__ = "0.1.0"
