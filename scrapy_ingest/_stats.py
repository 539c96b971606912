"""The one helper that owns the ``ingest/`` prefix of stats keys."""

from __future__ import annotations

PREFIX = "ingest"


def stat_key(area: str, event: str) -> str:
    """Return the stats key for *event* in *area*, e.g. ``ingest/items/stored``."""
    return f"{PREFIX}/{area}/{event}"
