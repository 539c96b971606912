"""Writing to a backend with retries: transient failures are retried with backoff until
``INGEST_RETRY_TIMEOUT`` after the outage began, a batch with a refused record is split
until the record is found, and a permanent failure is given back at once.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from scrapy_ingest._shapes import WriteOutcome
from scrapy_ingest.backends.base import Failure, describe_error
from scrapy_ingest.exceptions import BackendRefused

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.backends.base import Backend
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: the first wait after a failure (seconds); each next one doubles, up to MAX_RETRY_DELAY
FIRST_RETRY_DELAY = 0.25
#: a batch that still conflicts after this many idempotent writes (a unique key another
#: writer was inserting at the same moment resolves in one) is split like a refused one
_MAX_DUPLICATE_RETRIES = 8
MAX_RETRY_DELAY = 10.0


@dataclass
class Outage:
    """When the backend started failing, shared by every batch of one host.

    Retries of all batches end ``retry_timeout`` after the outage began, not
    after each batch's own first attempt, so a long outage costs the crawl
    (and its close) ``retry_timeout`` once, not once per batch in flight.
    """

    since: float | None = None

    def deadline(self, retry_timeout: float) -> float:
        start = time.monotonic() if self.since is None else self.since
        return start + retry_timeout

    def failed(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def recovered(self) -> None:
        self.since = None


def store_batch(
    backend: Backend,
    table: TableSpec,
    rows: Sequence[Row],
    retry_timeout: float,
    *,
    outage: Outage | None = None,
    abort: Callable[[], bool] | None = None,
    idempotent: bool = False,
) -> WriteOutcome:
    """Write *rows*: retry transient failures, split the batch to isolate refused records.

    A transient failure (connection lost, server restarting) is retried with
    randomised exponential backoff until *retry_timeout* seconds after the
    *outage* began; after the first one every write is idempotent, since the
    failed transaction may have committed. A data failure splits the batch in
    two until the single refused record is found; it is returned in ``dead``
    with the reason, and every other row is stored. *abort* is asked before
    each wait: true means nobody is left to write for. Rows not written when the
    time is up are in ``unwritten`` (and counted in ``lost``), for the caller to
    spill or give up on. *idempotent* from the first write: a replayed batch may
    be stored already.
    """
    outage = outage or Outage()
    outcome = WriteOutcome()
    pending: list[Sequence[Row]] = [rows]
    delay = FIRST_RETRY_DELAY
    duplicates = 0
    while pending:
        chunk = pending.pop()
        try:
            changes = backend.write(table, chunk, idempotent=idempotent)
        except Exception as exc:
            kind = failure_of(backend, exc)
            if kind is Failure.DUPLICATE:
                duplicates += 1
                if duplicates > _MAX_DUPLICATE_RETRIES:  # not a race: a row that conflicts
                    kind = Failure.DATA
            if kind is Failure.DATA:
                _split(chunk, exc, pending, outcome)
                continue
            idempotent = True
            if kind is Failure.DUPLICATE:
                pending.append(chunk)
                continue
            refused = kind is Failure.PERMANENT
            if refused:  # no retry can heal it: give the rows back at once
                outcome.refused = refusal(backend, exc)
            else:
                outage.failed()
            if (
                refused
                or time.monotonic() + delay > outage.deadline(retry_timeout)
                or (abort and abort())
            ):
                outcome.unwritten = [*chunk]
                for later in reversed(pending):  # a stack: the last pushed comes first
                    outcome.unwritten.extend(later)
                outcome.lost = len(outcome.unwritten)
                outcome.failure = describe_error(exc)
                return outcome
            logger.warning(
                "Writing %d rows to %s at %s failed (%s); retrying in %.2f s",
                len(chunk),
                table.name,
                backend.url,
                describe_error(exc),
                delay,
            )
            outcome.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
            pending.append(chunk)
        else:
            outage.recovered()
            outcome.written += len(chunk)
            if changes:
                add_changes(outcome.changes, changes)
    return outcome


def add_changes(total: dict[str, list[int]], more: Mapping[str, Sequence[int]]) -> None:
    """Add *more* new / changed / unchanged counts (by item type) to *total*."""
    for item_type, counts in more.items():
        found = total.setdefault(item_type, [0, 0, 0])
        for i in range(3):
            found[i] += counts[i]


def retry_call(
    backend: Backend,
    call: Callable[[], _T],
    what: str,
    retry_timeout: float,
    *,
    outage: Outage,
    abort: Callable[[], bool] | None = None,
) -> _T:
    """Run *call*, retrying transient failures like :func:`store_batch`; re-raise the last.

    A permanent failure is not retried: it is raised as :class:`BackendRefused`, with the
    cause and the fix."""
    delay = FIRST_RETRY_DELAY
    while True:
        try:
            result = call()
        except Exception as exc:
            kind = failure_of(backend, exc)
            if kind is Failure.PERMANENT:
                if isinstance(exc, BackendRefused):
                    raise
                raise BackendRefused(refusal(backend, exc)) from None
            if kind is not Failure.TRANSIENT:
                raise
            outage.failed()
            if time.monotonic() + delay > outage.deadline(retry_timeout) or (abort and abort()):
                raise
            logger.warning(
                "%s at %s failed (%s); retrying in %.2f s",
                what,
                backend.url,
                describe_error(exc),
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
        else:
            outage.recovered()
            return result


def failure_of(backend: Backend, exc: BaseException) -> Failure:
    """What *exc* means (:meth:`Backend.classify`); a :class:`BackendRefused` the backend
    raised itself (at open) is permanent."""
    if isinstance(exc, BackendRefused):
        return Failure.PERMANENT
    return backend.classify(exc)


def refusal(backend: Backend, exc: BaseException) -> str:
    """The cause and the fix of a permanent failure, in plain words, naming the database."""
    if isinstance(exc, BackendRefused):
        return str(exc)
    explain: Callable[[BaseException], str] | None = getattr(backend, "explain_refusal", None)
    if explain is not None:
        return explain(exc)
    return (
        f"{backend.url} refuses this crawl ({describe_error(exc)}): no retry can fix that. "
        "Fix: see docs/reliability.md for what this error needs"
    )


def _split(
    chunk: Sequence[Row], exc: Exception, pending: list[Sequence[Row]], outcome: WriteOutcome
) -> None:
    if len(chunk) == 1:
        outcome.dead.append((chunk[0], describe_error(exc)))
        return
    middle = len(chunk) // 2
    # pending is a stack: push the second half first so rows keep their order
    pending.append(chunk[middle:])
    pending.append(chunk[:middle])
