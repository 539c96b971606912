"""What the crawl's rows came to: the stats of each batch answered, the rows per table for the
metrics, and the rows given up on, which fail the crawl and are reported at its end.

Stats: ``ingest/<kind>/stored|spilled|lost|dead_letter``, ``ingest/batches/written|retries``,
``ingest/spill/batches|rows|bytes|replayed_batches|replayed_rows``, ``ingest/backend/refused``,
``ingest/values/<kind>``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_url
from scrapy_ingest._stats import stat_key
from scrapy_ingest.backends.base import row_payload

if TYPE_CHECKING:
    from scrapy.statscollectors import StatsCollector

    from scrapy_ingest._shapes import WriteOutcome
    from scrapy_ingest.quality import ItemChecks
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: the close reason when the spill journal outgrows INGEST_SPILL_MAX_BYTES
SPILL_FULL = "ingest_spill_full"
#: the close reason when a database refuses the crawl mid-way (a Failure.PERMANENT error)
BACKEND_REFUSED = "ingest_backend_refused"
#: the close reason when rows were given up on because the spill journal failed too (its
#: disk full, say) for INGEST_RETRY_TIMEOUT
SPILL_FAILED = "ingest_spill_failed"
#: the close reason when rows were given up on for another reason (the writer process died
#: again and again, the dead-letter table refused a record)
ROWS_LOST = "ingest_rows_lost"

#: an observer of each batch answered: ``(url, table, outcome, seconds)``
OutcomeObserver = Callable[[str, "TableSpec", "WriteOutcome", float], None]


class Counters:
    """Count the outcomes of one crawler's writes.

    *close_spider(reason)* closes the spider (rows are being lost, the journal is full, a
    database refuses the crawl); *spill_root()* says where the spill journals are;
    *dead_letter(kind, reason, payload, url)* keeps a row its
    database refused; *describe(url)* names the settings that route to *url*; *closing()*
    says whether the spider closes already.
    """

    def __init__(
        self,
        stats: StatsCollector,
        *,
        spill_max_bytes: int,
        spill_root: Callable[[], str],
        close_spider: Callable[[str], None],
        dead_letter: Callable[[str, str, str | None, str], None],
        describe: Callable[[str], str],
        closing: Callable[[], bool],
    ) -> None:
        self.stats = stats
        self._spill_max_bytes = spill_max_bytes
        self._spill_root = spill_root
        #: INGEST_ITEM_SCHEMAS / INGEST_ITEM_KEYS, which count the changes written, if set
        self.item_checks: ItemChecks | None = None
        self._close_spider = close_spider
        self._dead_letter = dead_letter
        self._describe = describe
        self._closing = closing
        #: items safe in a database or a spill journal, for the job row
        self.items_stored = 0
        self._observers: list[OutcomeObserver] = []
        #: (database URL, table name) -> [rows written, rows refused or lost]
        self._write_counts: dict[tuple[str, str], list[int]] = {}
        self._spill_full = False
        #: a database refused the crawl mid-way: the spider closes, the process exits non-zero
        self.refused = False
        #: why rows were given up on -> how many: the spider closes at the first, and the
        #: process exits non-zero
        self._losses: dict[str, int] = {}
        #: kind -> rows given up on, by this process
        self._lost_kinds: dict[str, int] = {}
        self._closing_for_loss = False

    @property
    def failed(self) -> bool:
        """Whether the crawl must exit non-zero: rows were lost, or a database refused it."""
        return self.refused or bool(self._losses)

    def on_outcome(self, callback: OutcomeObserver) -> None:
        """Call ``callback(url, table, outcome, seconds)`` for each batch answered."""
        self._observers.append(callback)

    def start_table(self, url: str, table: str) -> None:
        """Count the rows of *table* at *url* from 0, so its metrics have a sample from the
        start."""
        self._write_counts.setdefault((url, table), [0, 0])

    def write_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(database URL, credentials redacted; table) -> (rows written, rows not written)."""
        return {
            (redact_url(url), table): (counts[0], counts[1])
            for (url, table), counts in list(self._write_counts.items())
        }

    def count_value(self, kind: str) -> None:
        self.stats.inc_value(stat_key("values", kind))

    def count_replayed(self, batches: int, rows: int) -> None:
        if batches:
            self.stats.inc_value(stat_key("spill", "replayed_batches"), batches)
            self.stats.inc_value(stat_key("spill", "replayed_rows"), rows)

    def count_outcome(
        self, url: str, table: TableSpec, outcome: WriteOutcome, seconds: float
    ) -> None:
        stats, kind = self.stats, table.kind
        counts = self._write_counts.setdefault((url, table.name), [0, 0])
        counts[0] += outcome.written
        counts[1] += outcome.lost + len(outcome.dead)
        for observer in self._observers:
            observer(url, table, outcome, seconds)
        if outcome.changes and self.item_checks is not None:
            self.item_checks.count_changes(outcome.changes)
        if outcome.written:
            stats.inc_value(stat_key(kind, "stored"), outcome.written)
            stats.inc_value(stat_key("batches", "written"))
            if kind == "items":
                self.items_stored += outcome.written
        if outcome.retries:
            stats.inc_value(stat_key("batches", "retries"), outcome.retries)
        if outcome.spilled:
            self._count_spilled(kind, outcome)
        if outcome.replayed_batches:
            self.count_replayed(outcome.replayed_batches, outcome.replayed_rows)
        if outcome.lost:
            stats.inc_value(stat_key(kind, "lost"), outcome.lost)
            why = outcome.spill_failed or outcome.failure or outcome.refused
            self._rows_lost(kind, outcome.lost, why)
        if outcome.refused:
            self._backend_refused(url, outcome.refused)
        for row, reason in outcome.dead:
            if kind == "dead_letters":
                stats.inc_value(stat_key(kind, "lost"))
                logger.error("A dead-letter record was refused too (%s); it is lost", reason)
                why = f"the dead-letter table refused a record: {reason}"
                self._rows_lost(kind, 1, why, close=False)  # one record: the crawl goes on
            else:
                payload = row_payload(kind, row)
                self._dead_letter(kind, f"the database refused it: {reason}", payload, url)

    def _count_spilled(self, kind: str, outcome: WriteOutcome) -> None:
        stats = self.stats
        if kind == "items":  # the job row's items_count: safe in the database or the journal
            self.items_stored += outcome.spilled
        stats.inc_value(stat_key(kind, "spilled"), outcome.spilled)
        stats.inc_value(stat_key("spill", "batches"))
        stats.inc_value(stat_key("spill", "rows"), outcome.spilled)
        stats.set_value(stat_key("spill", "bytes"), outcome.journal_bytes)
        limit = self._spill_max_bytes
        if self._spill_full:
            return
        if outcome.journal_bytes > limit:
            why = (
                f"the spill journal holds {outcome.journal_bytes} bytes, more than "
                f"INGEST_SPILL_MAX_BYTES ({limit})"
            )
        elif outcome.journal_low:
            why = outcome.journal_low
        else:
            return
        self._spill_full = True
        logger.error(
            "%s: closing the spider (%s) rather than lose what it scrapes. What it holds "
            "still goes to the journal; run `scrapy ingest replay` once the database answers "
            "again",
            why[0].upper() + why[1:],
            SPILL_FULL,
        )
        self._close_spider(SPILL_FULL)

    def _rows_lost(self, kind: str, rows: int, why: str, *, close: bool = True) -> None:
        """*rows* of *kind* were given up on: the process will exit non-zero, saying how many
        and why; with *close*, the spider closes (the crawl stops taking work it cannot keep)."""
        why = why or "the write failed"
        self._losses[why] = self._losses.get(why, 0) + rows
        self._lost_kinds[kind] = self._lost_kinds.get(kind, 0) + rows
        if close and not self._closing_for_loss and not self._closing():
            self._closing_for_loss = True
            self._close_spider(SPILL_FAILED if "spill journal" in why else ROWS_LOST)

    def _backend_refused(self, url: str, refusal: str) -> None:
        """A database refuses the crawl for good (its password changed, a grant was revoked):
        say so once, and close the spider; its host spills what is left."""
        if self.refused:
            return
        self.refused = True
        self.stats.set_value(stat_key("backend", "refused"), 1)
        logger.error(
            "The database of %s refuses this crawl: %s. Closing the spider (%s); what it "
            "scraped for that database is in the spill journal under %s. Once that is fixed, "
            "run `scrapy ingest replay` with the corrected settings to store it",
            self._describe(url),
            refusal,
            BACKEND_REFUSED,
            self._spill_root(),
        )
        self._close_spider(BACKEND_REFUSED)

    def report_losses(self) -> None:
        """The last word of a crawl that lost rows: how many, of which kinds, and why."""
        if not self._losses:
            return
        total = sum(self._losses.values())
        logger.error(
            "%d rows could not be kept (%s): %s. They are in no database and in no spill "
            "journal; the stats (ingest/<kind>/lost) and the job row's stats count them",
            total,
            ", ".join(f"{kind} {n}" for kind, n in self._lost_kinds.items()),
            "; ".join(f"{n} because {why}" for why, n in self._losses.items()),
        )
