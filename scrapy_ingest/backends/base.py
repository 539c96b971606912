"""The interface every backend implements, and what the writer expects of it.

A backend is used from writer threads only, never from the reactor thread.
Its methods block. Rows follow the conventions of :mod:`scrapy_ingest.schema`.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from scrapy_ingest.schema import TableSpec

Row = tuple[Any, ...]


class Failure(enum.Enum):
    """What a failed write means for the batch that was being written."""

    #: a value in the batch was refused: split the batch to find the record
    DATA = "data"
    #: a record id exists already: write the batch again, skipping existing ids
    DUPLICATE = "duplicate"
    #: the database is unreachable, busy or restarting: wait and try again
    TRANSIENT = "transient"


class Backend(Protocol):
    #: the database URL with credentials redacted, for messages
    url: str
    #: how many threads may write to it at once
    threads: int

    def open(self) -> None:
        """Connect, and create or check the tables. Raise BackendUnavailable or SchemaError."""

    def close(self) -> None:
        """Release connections."""

    def write(self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool) -> None:
        """Store *rows* in one transaction; with *idempotent*, skip ids that exist."""

    def classify(self, exc: BaseException) -> Failure:
        """Say what *exc*, raised by :meth:`write`, means for the batch."""

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        """Insert a job row; return False when its ``job_id`` exists already."""

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, only_running: bool
    ) -> None:
        """Update columns of a job row (only while its status is ``running`` if asked)."""
