"""The host that runs a backend's work in the calling thread, with retries, the spill
journal and the replay of what it holds."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, TypeVar

from scrapy_ingest._shapes import OpenOutcome, ReplayOutcome, WriteOutcome
from scrapy_ingest.backends._retry import (
    FIRST_RETRY_DELAY,
    MAX_RETRY_DELAY,
    Outage,
    add_changes,
    failure_of,
    refusal,
    retry_call,
    store_batch,
)
from scrapy_ingest.backends.base import Failure, clean_job_row, dead_letter_row, describe_error
from scrapy_ingest.exceptions import BackendRefused, BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from scrapy_ingest._shapes import Batch, Row
    from scrapy_ingest.backends.base import Backend
    from scrapy_ingest.schema import TableSpec
    from scrapy_ingest.spill import SpillJournal

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class LocalHost:
    """Runs a backend's work in the calling thread (a writer thread, or the writer process).

    With a spill *journal*, rows the database does not take within the retry
    timeout go to the journal instead of being given up on, and the host goes
    *down*: it no longer waits for the database, it spills each batch at once,
    and tries the database once per backoff step (a *probe*: one write, or one
    connection attempt). The first write that goes through brings it back up,
    and the journal is replayed. A database that cannot be opened at start
    sends the host down at once, unless *require_backend*.

    A database that *refuses* the crawl (:attr:`Failure.PERMANENT`: a refused password, a
    missing database or privilege) is never retried: at start, :meth:`open` and
    :meth:`insert_job` raise :class:`BackendRefused` whatever *require_backend* says; during
    the crawl the host is *refused* from then on: every batch and job row state goes to the
    journal at once (or is given up, without one), with ``refused`` set in the outcome.
    """

    def __init__(
        self,
        backend: Backend,
        retry_timeout: float,
        *,
        abort: Callable[[], bool] | None = None,
        tables: Sequence[TableSpec] = (),
        journal: SpillJournal | None = None,
        require_backend: bool = True,
        on_stuck: Callable[[bool], None] | None = None,
    ) -> None:
        self.backend = backend
        #: called with True when neither the database nor the journal takes rows (the crawl
        #: must stop taking work), with False once one of them does again
        self._on_stuck = on_stuck
        #: names of the tables prepared by open(); others are created at their first write
        self._ready = {table.name for table in tables}
        #: where replayed records refused for their content go
        self._dead_letters = next((t for t in tables if t.kind == "dead_letters"), None)
        self.url = backend.url
        self.threads = backend.threads
        self._retry_timeout = retry_timeout
        self._abort = abort
        self._outage = Outage()
        self._opened = False
        self._journal = journal
        self._require = require_backend or journal is None
        #: the latest state of each job row written through this host, to spill it whole
        self._jobs: dict[str, tuple[TableSpec, dict[str, Any]]] = {}
        self._down = False
        #: why the database refuses this crawl (the cause and the fix), once it has
        self._refused: str | None = None
        self._next_probe = 0.0
        self._probe_delay = FIRST_RETRY_DELAY
        #: (batches, rows) replayed and not reported yet in a store() outcome or by recover()
        self._unreported = (0, 0)
        #: a replay stopped part way while the database answered again (it failed once more):
        #: tried again at the next probe time, and at the end of the crawl
        self._replay_pending = False
        #: since when neither the database nor the journal takes rows (monotonic), if so
        self._stuck_since: float | None = None

    # lifecycle

    def open(self) -> OpenOutcome:
        """Connect, prepare the tables, and replay the spill journal. Raise BackendUnavailable
        (when the database must be there) or SchemaError."""
        try:
            self.backend.open()
        except BackendRefused:
            raise  # no journal can help: nothing it holds would ever be written
        except BackendUnavailable as exc:
            if self._require:
                raise
            assert self._journal is not None
            self._go_down()
            return OpenOutcome(unavailable=str(exc), journal=str(self._journal.dir))
        self._opened = True
        return OpenOutcome(replayed=self._replay())

    def close(self) -> None:
        self.backend.close()

    def recover(self) -> ReplayOutcome | None:
        """At the end of a crawl: a database that is down gets a try now, whatever the probe
        schedule (the journal is replayed if it answers), and so do the batches drained next."""
        batches, rows = self._unreported
        self._unreported = (0, 0)
        unreported = ReplayOutcome(batches, rows)
        if self._journal is None or self._refused is not None:
            return unreported
        if not self._down:
            if self._replay_pending:  # up again, but a replay stopped part way: once more
                self._replay_again()
                more_batches, more_rows = self._unreported
                self._unreported = (0, 0)
                unreported.batches += more_batches
                unreported.rows += more_rows
            return unreported
        self._next_probe = 0.0
        try:
            self._ensure_open()
        except Exception:
            return unreported
        outcome = self._replay()
        if outcome is None:
            return unreported
        if outcome.batches and not outcome.failed:
            self._down = False
            self._outage.recovered()
        outcome.batches += batches
        outcome.rows += rows
        return outcome

    def _ensure_open(self) -> None:
        # a writer process restarted while the database was down opens it at its next call
        if self._opened:
            return
        if self._down:
            self.backend.open()  # a probe: one attempt
            self._opened = True
            return
        retry_call(
            self.backend,
            self.backend.open,
            "Opening the database",
            self._retry_timeout,
            outage=self._outage,
            abort=self._abort,
        )
        self._opened = True

    def _retry(self, call: Callable[[], _T], what: str) -> _T:
        self._ensure_open()
        return retry_call(
            self.backend, call, what, self._retry_timeout, outage=self._outage, abort=self._abort
        )

    # down and up again

    def _go_down(self) -> None:
        if not self._down:
            self._down = True
            self._probe_delay = FIRST_RETRY_DELAY
        self._outage.failed()
        self._next_probe = time.monotonic() + self._probe_delay
        self._probe_delay = min(self._probe_delay * 2, MAX_RETRY_DELAY)

    def _probe_due(self) -> bool:
        return time.monotonic() >= self._next_probe

    def _came_back(self) -> None:
        logger.info("The database at %s answers again; replaying the spill journal", self.url)
        self._probe_delay = FIRST_RETRY_DELAY
        self._down = False
        self._outage.recovered()
        self._replay_again()

    def _replay_again(self) -> None:
        """Replay the journal; what it replays is reported with the next batch's outcome, or by
        recover(). If the database fails again part way, the rest waits for the next probe."""
        replayed = self._replay()
        if replayed is None:
            return
        batches, rows = self._unreported
        self._unreported = (batches + replayed.batches, rows + replayed.rows)
        self._replay_pending = replayed.failed
        if replayed.failed:
            self._next_probe = time.monotonic() + self._probe_delay

    def _replay(self) -> ReplayOutcome | None:
        journal = self._journal
        if journal is None:
            return None
        return journal.replay(self._store_replayed, self._replay_job)

    def _store_replayed(self, table: TableSpec, rows: Sequence[Row]) -> WriteOutcome:
        """Write a spilled batch: split until the rows refused for their content are found,
        which go to the dead-letter table (as a crawl's would); the rest is stored. A batch
        the database does not take at all comes back ``lost``, to stay in the journal."""
        try:
            self._prepare(table)
            outcome = store_batch(
                self.backend,
                table,
                rows,
                0,  # no waiting: a batch the database does not take stays in the journal
                outage=Outage(),
                abort=self._abort,
                idempotent=True,
            )
            if outcome.dead and not outcome.lost:
                outcome.dead_refused = self._dead_letter(table, outcome.dead)
        except Exception as exc:
            return self._not_replayed(len(rows), exc)
        return outcome

    def _replay_job(self, table: TableSpec, row: Mapping[str, Any]) -> WriteOutcome:
        """Write a spilled job row; one refused for its content is written again with its
        values cleaned (:func:`clean_job_row`), else dead-lettered: it never blocks."""
        try:
            try:
                self._write_job(table, row)
            except Exception as exc:
                if failure_of(self.backend, exc) is not Failure.DATA:
                    raise
                cleaned = clean_job_row(table, row)
                if cleaned == row:
                    raise
                self._write_job(table, cleaned)
                logger.warning(
                    "The database at %s refused the spilled job row of %s (%s); it was "
                    "written with its text and JSON cleaned",
                    self.url,
                    row.get("job_id"),
                    describe_error(exc),
                )
        except Exception as exc:
            if failure_of(self.backend, exc) is not Failure.DATA:
                return self._not_replayed(1, exc)
            dead: list[tuple[Any, str]] = [(dict(row), describe_error(exc))]
            try:
                kept = self._dead_letter(table, dead)
            except Exception as later:
                return self._not_replayed(1, later)
            return WriteOutcome(dead=dead, dead_refused=kept)
        return WriteOutcome(written=1)

    def _write_job(self, table: TableSpec, row: Mapping[str, Any]) -> None:
        self.backend.insert_job(table, row)
        self.backend.update_job(table, row["job_id"], row, unless_finished=False)

    def _not_replayed(self, rows: int, exc: BaseException) -> WriteOutcome:
        """*rows* a replay could not write, because of *exc* (the database is unavailable,
        or refuses the replay)."""
        outcome = WriteOutcome(lost=rows, failure=describe_error(exc))
        if failure_of(self.backend, exc) is Failure.PERMANENT:
            outcome.refused = refusal(self.backend, exc)
        return outcome

    def _dead_letter(
        self, table: TableSpec, dead: Sequence[tuple[Any, str]]
    ) -> list[tuple[Any, str]]:
        """Put the replayed records in *dead*, refused for their content, in the dead-letter
        table; return those it refuses too (or all, without one), with both reasons. Raise
        when the database is unavailable (the batch stays in the journal: written again,
        nothing is stored twice, the dead letters' ids being those of their records)."""
        letters_table = self._dead_letters
        if letters_table is None or table.kind == "dead_letters":
            return list(dead)
        letters = [dead_letter_row(table, record, reason) for record, reason in dead]
        self._prepare(letters_table)
        result = store_batch(
            self.backend, letters_table, letters, 0, outage=Outage(), idempotent=True
        )
        if result.lost and not result.refused:
            raise BackendUnavailable(result.failure)
        refused = {letter[0]: why for letter, why in result.dead}
        refused.update((letter[0], result.refused) for letter in result.unwritten)
        return [
            (record, f"{reason}; the dead-letter table refused it too: {refused[letter[0]]}")
            for (record, reason), letter in zip(dead, letters, strict=True)
            if letter[0] in refused
        ]

    # writing

    def store(self, table: TableSpec, batch: Batch) -> WriteOutcome:
        if self._refused is not None:
            rows = batch.rows(text=self.backend.json_as_text)
            return self._set_aside(table, rows, WriteOutcome(refused=self._refused))
        was_down = self._down
        if was_down and not self._probe_due():
            rows = batch.rows(text=self.backend.json_as_text)
            return self._spill(table, rows, WriteOutcome(), "the database is still unavailable")
        try:
            self._ensure_open()
            self._prepare(table)
        except Exception as exc:
            return self._not_ready(table, batch.rows(text=self.backend.json_as_text), exc)
        outcome = store_batch(
            self.backend,
            table,
            # a backend that takes batches reads the packed rows and their payload itself
            batch if self.backend.takes_batches else batch.rows(text=self.backend.json_as_text),
            0 if was_down else self._retry_timeout,
            outage=self._outage,
            abort=self._abort,
            idempotent=was_down,
        )
        if outcome.unwritten or outcome.refused:
            return self._not_written(table, outcome)
        if was_down:
            self._came_back()
        elif self._replay_pending and self._probe_due():
            self._replay_again()
        # replays since the last answer (a job row write may have brought the host back)
        outcome.replayed_batches, outcome.replayed_rows = self._unreported
        self._unreported = (0, 0)
        return outcome

    def _not_ready(self, table: TableSpec, rows: list[Row], exc: Exception) -> WriteOutcome:
        """*rows* when the database could not be opened, or the table prepared, for them."""
        if failure_of(self.backend, exc) is Failure.PERMANENT:
            self._refused = refusal(self.backend, exc)
            return self._set_aside(table, rows, WriteOutcome(refused=self._refused))
        if self._journal is None or not self._transient(exc):
            return self._give_up(table, rows, describe_error(exc))
        self._go_down()
        return self._spill(table, rows, WriteOutcome(), describe_error(exc))

    def _not_written(self, table: TableSpec, outcome: WriteOutcome) -> WriteOutcome:
        """The rows a write gave back: refused, or not written within the retry timeout."""
        if outcome.refused:
            self._refused = outcome.refused
            return self._set_aside(table, outcome.unwritten, outcome)
        if self._journal is None:
            return self._give_up(table, outcome.unwritten, outcome.failure, outcome)
        self._go_down()
        return self._spill(table, outcome.unwritten, outcome, outcome.failure)

    def _transient(self, exc: Exception) -> bool:
        if isinstance(exc, BackendRefused):
            return False
        return isinstance(exc, BackendUnavailable) or self.backend.classify(exc) is (
            Failure.TRANSIENT
        )

    def _set_aside(self, table: TableSpec, rows: list[Row], outcome: WriteOutcome) -> WriteOutcome:
        """The rows of a refused database: to the journal, where `scrapy ingest replay` finds
        them once the cause is fixed (or given up, without a journal)."""
        if self._journal is None:
            return self._give_up(table, rows, outcome.refused, outcome)
        return self._spill(table, rows, outcome, "the database refuses this crawl")

    def _prepare(self, table: TableSpec) -> None:
        if table.history is not None:
            self._prepare(table.history)
        if table.name not in self._ready:
            self._retry(lambda: self.backend.create_table(table), f"Creating {table.name}")
            self._ready.add(table.name)

    def _spill(
        self, table: TableSpec, rows: list[Row], outcome: WriteOutcome, reason: str
    ) -> WriteOutcome:
        try:
            return self._spill_now(table, rows, outcome, reason)
        except OSError as exc:
            return self._keep(table, rows, outcome, reason, exc)

    def _spill_now(
        self, table: TableSpec, rows: list[Row], outcome: WriteOutcome, reason: str
    ) -> WriteOutcome:
        """Put *rows* in the journal; raise OSError when it cannot take them."""
        journal = self._journal
        assert journal is not None
        size = journal.spill(table, rows)
        journal.keep_reserve()
        self._unstuck()
        outcome.lost = 0
        outcome.unwritten = []
        outcome.spilled += len(rows)
        outcome.journal_bytes = journal.add_bytes(size)
        outcome.journal_low = journal.low_on_space() or ""
        logger.warning(
            "Spilled %d rows for %s to %s (%s)", len(rows), table.name, journal.dir, reason
        )
        return outcome

    def _keep(
        self,
        table: TableSpec,
        rows: list[Row],
        outcome: WriteOutcome,
        reason: str,
        error: OSError,
    ) -> WriteOutcome:
        """Neither the database nor the journal takes *rows* (its disk is full, say): try both
        again, with backoff, until ``retry_timeout`` after the journal first failed.

        The batch waits meanwhile, and the batches behind it: the crawl's buffer fills and
        its engine pauses, so the crawl stops taking work instead of dropping it. The time
        counts once for all batches: once it is up, each batch gets one try of each, and
        what neither takes is given up on (``lost``, with ``spill_failed`` saying why)."""
        assert self._journal is not None
        if self._stuck_since is None:
            self._stuck_since = time.monotonic()
            if self._on_stuck is not None:
                self._on_stuck(True)
            logger.error(
                "Neither the database at %s (%s) nor the spill journal in %s (%s) takes rows: "
                "the crawl waits, and tries both again for up to %s s (INGEST_RETRY_TIMEOUT)",
                self.url,
                reason,
                self._journal.dir,
                error,
                self._retry_timeout,
            )
        deadline = self._stuck_since + self._retry_timeout
        delay = FIRST_RETRY_DELAY
        while time.monotonic() + delay <= deadline and not (self._abort and self._abort()):
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
            rows = self._try_database(table, rows, outcome)
            if not rows:
                self._unstuck()
                return outcome
            try:
                return self._spill_now(table, rows, outcome, reason)
            except OSError as exc:
                error = exc
        outcome.spill_failed = f"the spill journal in {self._journal.dir} failed too: {error}"
        return self._give_up(table, rows, f"{reason}; {outcome.spill_failed}", outcome)

    def _unstuck(self) -> None:
        if self._stuck_since is not None:
            self._stuck_since = None
            if self._on_stuck is not None:
                self._on_stuck(False)

    def _try_database(self, table: TableSpec, rows: list[Row], outcome: WriteOutcome) -> list[Row]:
        """One attempt to write *rows* (no waiting), added to *outcome*; return those not
        written. A database that answers again gets its journal replayed."""
        if self._refused is not None:
            return rows
        try:
            self._ensure_open()
            self._prepare(table)
        except Exception:
            return rows
        result = store_batch(
            self.backend, table, rows, 0, outage=Outage(), abort=self._abort, idempotent=True
        )
        outcome.written += result.written
        outcome.dead.extend(result.dead)
        outcome.retries += result.retries
        add_changes(outcome.changes, result.changes)
        if result.refused:
            self._refused = outcome.refused = result.refused
            return result.unwritten
        if result.written and self._down:
            self._came_back()
            outcome.replayed_batches, outcome.replayed_rows = self._unreported
            self._unreported = (0, 0)
        return result.unwritten

    def _give_up(
        self, table: TableSpec, rows: list[Row], reason: str, outcome: WriteOutcome | None = None
    ) -> WriteOutcome:
        outcome = outcome or WriteOutcome()
        outcome.unwritten = []
        outcome.lost = len(rows)
        logger.error(
            "Giving up on %d rows for %s at %s: %s", len(rows), table.name, self.url, reason
        )
        return outcome

    # the job row

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        self._jobs[row["job_id"]] = (table, dict(row))
        # at start: a refusal is raised (the crawl does not start), never spilled
        return bool(
            self._job_call(
                row["job_id"],
                lambda: self.backend.insert_job(table, row),
                "Inserting",
                True,
                refusable=False,
            )
        )

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        known = self._jobs.get(job_id)
        if known is not None:
            known[1].update(values)
        self._job_call(
            job_id,
            lambda: self.backend.update_job(table, job_id, values, unless_finished=unless_finished),
            "Updating",
            None,
        )

    def _job_call(
        self,
        job_id: str,
        call: Callable[[], _T],
        verb: str,
        spilled: _T,
        *,
        refusable: bool = True,
    ) -> _T:
        """Write the job row, or, while the database is down (or, if *refusable*, refuses
        this crawl), keep its latest state in the journal (written back before the batches)
        and return *spilled*."""
        known = self._jobs.get(job_id)
        spillable = self._journal is not None and known is not None
        if self._refused is not None and spillable and refusable:
            self._save_job(job_id)
            return spilled
        if self._down and spillable and not self._probe_due():
            self._save_job(job_id)
            return spilled
        try:
            if self._down:
                self._ensure_open()
                result = call()  # a probe
            else:
                result = self._retry(call, f"{verb} the job row")
        except Exception as exc:
            if spillable and refusable and failure_of(self.backend, exc) is Failure.PERMANENT:
                self._refused = refusal(self.backend, exc)
                self._save_job(job_id)
                return spilled
            if not spillable or not self._transient(exc):
                if self._down and failure_of(self.backend, exc) is Failure.PERMANENT:
                    raise BackendRefused(refusal(self.backend, exc)) from None
                raise
            self._go_down()
            self._save_job(job_id)
            return spilled
        if self._down:
            self._came_back()
        return result

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        if self._down or self._refused is not None:
            return []  # the next crawl will see them
        return self._retry(
            lambda: self.backend.mark_crashed(table, stale_before, alive, crawl_id),
            "Marking crashed jobs",
        )

    def _save_job(self, job_id: str) -> None:
        assert self._journal is not None
        table, row = self._jobs[job_id]
        self._journal.save_job(table, job_id, row)
