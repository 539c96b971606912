"""Exceptions raised by scrapy_ingest.

Every error of ours derives from :class:`IngestError`, so a caller can catch
them all at once. Bare :class:`scrapy.exceptions.NotConfigured` is kept for
its Scrapy meaning, "switched off on purpose".
"""

from __future__ import annotations


class IngestError(Exception):
    """Base class of every scrapy_ingest error."""


class ConfigError(IngestError, ValueError):
    """An ``INGEST_*`` setting has a value that cannot work.

    The message names the setting, the value, the rule and the fix.
    """


class BackendUnavailable(IngestError):
    """The database could not be reached or refused the connection."""


class SchemaError(IngestError):
    """The tables could not be created, or exist in a shape we cannot use."""


class JobIdConflict(IngestError):
    """A job row with this ``job_id`` exists already: two crawls would merge."""


class BackendRefused(BackendUnavailable):
    """The database answers, but refuses this crawl for a reason no retry can heal: a refused
    password, a missing database, a missing privilege or table, a read-only server.

    The message names the database (credentials hidden), the cause and the fix. A crawl
    refused at start does not start; one refused mid-crawl spills what it holds and closes
    with the reason ``ingest_backend_refused``.
    """


class NotKept(IngestError):
    """``INGEST_DURABLE``: rows of a batch are neither in the spill journal nor in the
    database (the journal's disk was full and the database down for ``INGEST_RETRY_TIMEOUT``).
    Their items are dropped, not acknowledged."""
