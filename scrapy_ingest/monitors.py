"""Spidermon monitors on scrapy_ingest's own stats: a crawl that lost rows, left batches in the
spill journal, dead-lettered or failed to validate items, or did not close its job row, fails
them, and Spidermon's actions (Slack, email, Discord, Sentry, ...) say so.

Needs the ``spidermon`` extra (``pip install "scrapy-ingestion[spidermon]"``)::

    EXTENSIONS = {"scrapy_ingest.monitors.Spidermon": 500}
    SPIDERMON_ENABLED = True
    SPIDERMON_SPIDER_CLOSE_MONITORS = ["scrapy_ingest.monitors.IngestMonitorSuite"]

:class:`Spidermon` is Spidermon's own extension, whose spider-close monitors (the user's suites
too) run once scrapy_ingest has written its last batches and closed the job row: with
Spidermon's extension they run while that is still going on, on figures that are not final.

Settings: ``SPIDERMON_INGEST_MAX_DEAD_LETTERS`` (0), ``SPIDERMON_INGEST_MAX_VALIDATION_FAILURES``
(0). Stats read: ``ingest/<kind>/lost``, ``ingest/<kind>/spilled``, ``ingest/spill/batches``,
``ingest/spill/replayed_batches``, ``ingest/backend/refused``, ``ingest/<kind>/dead_letter``,
``ingest/quality/<ItemType>/invalid``, ``ingest/jobs/closed``. See docs/spidermon.md.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypeVar, cast

try:
    from spidermon import MonitorSuite, monitors
    from spidermon.contrib.scrapy.extensions import Spidermon as _SpidermonExtension
    from spidermon.contrib.scrapy.monitors.base import BaseScrapyMonitor
except ImportError as exc:  # pragma: no cover - the extra is installed wherever tests run
    raise ImportError(
        'scrapy_ingest.monitors needs Spidermon, which is not installed: pip install "scrapy-'
        f'ingestion[spidermon]" (or pip install spidermon). The import failed with: {exc}'
    ) from exc

from scrapy_ingest._stats import PREFIX, stat_key
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

__all__ = [
    "DeadLettersMonitor",
    "IngestMonitorSuite",
    "JobRowClosedMonitor",
    "NothingLostMonitor",
    "Spidermon",
    "SpillReplayedMonitor",
    "ValidationFailuresMonitor",
]

MAX_DEAD_LETTERS = "SPIDERMON_INGEST_MAX_DEAD_LETTERS"
MAX_VALIDATION_FAILURES = "SPIDERMON_INGEST_MAX_VALIDATION_FAILURES"

_F = TypeVar("_F", bound="Callable[..., Any]")


def _named(name: str) -> Callable[[_F], _F]:
    """Spidermon's ``monitors.name`` decorator (the name its reports show), typed."""
    return cast("Callable[[_F], _F]", monitors.name(name))


#: set by the runtime once the job row's final state is written (or kept in the spill journal)
JOB_CLOSED = stat_key("jobs", "closed")


class Spidermon(_SpidermonExtension):  # type: ignore[misc]
    """Spidermon's extension, whose spider-close monitors run after scrapy_ingest has closed.

    Scrapy calls every ``spider_closed`` handler at once; scrapy_ingest's drains its writers,
    replays the spill journal if the database is back and closes the job row, which takes
    database round trips, while Spidermon's runs its suites at once. This one waits for
    scrapy_ingest first, so that every monitor (ours and the project's) reads final figures.
    Without scrapy_ingest running, it is Spidermon's extension unchanged.
    """

    async def spider_closed(self, spider: Any) -> None:
        runtime = _runtime(self.crawler)
        if runtime is not None:
            await runtime.wait_closed()
        super().spider_closed(spider)


@_named("Ingest: nothing lost")
class NothingLostMonitor(BaseScrapyMonitor):  # type: ignore[misc]
    """No row given up on: every ``ingest/<kind>/lost`` stat is 0 or absent."""

    @_named("No rows lost")
    def test_nothing_lost(self) -> None:
        lost = _per_kind(self.data.stats, "lost")
        if not lost:
            return
        self.fail(
            f"{sum(lost.values())} rows were lost ({_kinds(lost)}): neither the database nor "
            "the spill journal took them, so they are nowhere. The crawl log's ERROR lines say "
            "why (most often the spill journal's disk was full, or the journal outgrew "
            "INGEST_SPILL_MAX_BYTES). Fix that (free disk space for INGEST_SPILL_DIR, or "
            "point it at a bigger disk) and crawl these pages again."
        )


@_named("Ingest: spill journal replayed")
class SpillReplayedMonitor(BaseScrapyMonitor):  # type: ignore[misc]
    """Every batch spilled to the journal while the database was down was replayed into it by
    the end of the crawl (``ingest/spill/replayed_batches`` >= ``ingest/spill/batches``)."""

    @_named("Spilled batches replayed")
    def test_spill_replayed(self) -> None:
        stats = self.data.stats
        spilled = _count(stats.get(stat_key("spill", "batches")))
        replayed = _count(stats.get(stat_key("spill", "replayed_batches")))
        if spilled <= replayed:
            return
        rows = _per_kind(stats, "spilled")
        runtime = _runtime(self.crawler)
        where = (
            f"the spill journal under {runtime.config.spill_root()}"
            if runtime is not None
            else "the spill journal (INGEST_SPILL_DIR)"
        )
        if _count(stats.get(stat_key("backend", "refused"))):
            cause = (
                "the database refused the crawl (a password or grant that no retry heals): "
                "fix that, then "
            )
        else:
            cause = "the database was down until the crawl closed: once it answers again, "
        self.fail(
            f"{spilled - replayed} of the {spilled} batches this crawl spilled are not in the "
            f"database ({sum(rows.values())} rows spilled: {_kinds(rows)}; close reason "
            f"{stats.get('finish_reason')!r}); they wait in {where}. Nothing is lost yet: "
            f"{cause}run `scrapy ingest replay` with the crawl's settings (the next crawl "
            "against that database replays them at its start too)."
        )


@_named("Ingest: dead letters")
class DeadLettersMonitor(BaseScrapyMonitor):  # type: ignore[misc]
    """Records sent to the dead-letter table (``ingest/<kind>/dead_letter``) are at most
    ``SPIDERMON_INGEST_MAX_DEAD_LETTERS`` (default 0)."""

    @_named("Dead letters under the limit")
    def test_dead_letters(self) -> None:
        letters = _per_kind(self.data.stats, "dead_letter")
        limit = _limit(self.crawler.settings, MAX_DEAD_LETTERS)
        total = sum(letters.values())
        if total <= limit:
            return
        table, job = _dead_letter_table(self.crawler)
        self.fail(
            f"{total} records went to the dead-letter table instead of their own "
            f"({_kinds(letters)}), more than {MAX_DEAD_LETTERS} ({limit}). Their reasons: "
            f"SELECT kind, reason, count(*) FROM {table} WHERE job_id = {job} GROUP BY 1, 2. "
            "Fix the spider (values that are not items, values the database refuses) or the "
            f"item schema, or raise {MAX_DEAD_LETTERS} if that many are expected."
        )


@_named("Ingest: validation failures")
class ValidationFailuresMonitor(BaseScrapyMonitor):  # type: ignore[misc]
    """Items their ``INGEST_ITEM_SCHEMAS`` model refused (``ingest/quality/<ItemType>/invalid``)
    are at most ``SPIDERMON_INGEST_MAX_VALIDATION_FAILURES`` (default 0)."""

    @_named("Validation failures under the limit")
    def test_validation_failures(self) -> None:
        invalid = _matching(self.data.stats, re.compile(rf"^{PREFIX}/quality/(.+)/invalid$"))
        limit = _limit(self.crawler.settings, MAX_VALIDATION_FAILURES)
        total = sum(invalid.values())
        if total <= limit:
            return
        rejected = _count(self.data.stats.get(stat_key("items", "rejected")))
        fate = (
            f"{rejected} of them were dropped (INGEST_VALIDATION = 'strict') and are in the "
            "dead-letter table"
            if rejected
            else "they were stored with their errors in the items table's errors column"
        )
        self.fail(
            f"{total} items failed validation against INGEST_ITEM_SCHEMAS ({_kinds(invalid)}), "
            f"more than {MAX_VALIDATION_FAILURES} ({limit}); {fate}. The site changed or the "
            f"model is too strict: fix the spider or the model, or raise "
            f"{MAX_VALIDATION_FAILURES} if that many are expected."
        )


@_named("Ingest: job row closed")
class JobRowClosedMonitor(BaseScrapyMonitor):  # type: ignore[misc]
    """The job row got its final state (status ``finished``, close reason, final stats):
    ``ingest/jobs/closed`` is set."""

    @_named("Job row closed")
    def test_job_row_closed(self) -> None:
        stats = self.data.stats
        if _count(stats.get(JOB_CLOSED)):
            return
        crawler = self.crawler
        runtime = _runtime(crawler)
        job = runtime.job.job_id if runtime is not None and runtime.job is not None else None
        if not _waits_for_ingest(crawler):
            self.fail(
                f"the job row of job {job} is not closed yet: this monitor ran while "
                "scrapy_ingest was still closing (Spidermon's own extension runs spider-close "
                "monitors alongside it, on figures that are not final). Fix: in EXTENSIONS, "
                "use scrapy_ingest.monitors.Spidermon in place of "
                "spidermon.contrib.scrapy.extensions.Spidermon."
            )
        if job is None:
            self.fail(
                "scrapy_ingest stored nothing of this crawl, not even its job row (close "
                f"reason {stats.get('finish_reason')!r}): the crawl log's first ERROR says "
                "why (a database that refused the crawl at start, an invalid setting). Fix "
                "that and crawl again."
            )
        self.fail(
            f"the job row of job {job} was not closed: its final update failed (the crawl "
            "log says why, after 'Could not close the job row'), so it still says 'running' "
            "with the stats of its last heartbeat, until a later crawl marks it 'crashed'. "
            "Fix the database connection; the rows of the crawl itself are counted by the "
            "other monitors."
        )


class IngestMonitorSuite(MonitorSuite):  # type: ignore[misc]
    """Every scrapy_ingest monitor. Use it in ``SPIDERMON_SPIDER_CLOSE_MONITORS``, or subclass
    it to add actions (``monitors_failed_actions``)."""

    monitors = [  # noqa: RUF012 (Spidermon's declarative class attribute)
        NothingLostMonitor,
        SpillReplayedMonitor,
        DeadLettersMonitor,
        ValidationFailuresMonitor,
        JobRowClosedMonitor,
    ]


def _runtime(crawler: Crawler) -> IngestRuntime | None:
    """The crawler's scrapy_ingest runtime, if scrapy_ingest runs (never creating one)."""
    runtime: IngestRuntime | None = crawler.__dict__.get(IngestRuntime._ATTRIBUTE)
    return runtime


def _waits_for_ingest(crawler: Crawler) -> bool:
    """Whether the crawler's Spidermon extension is ours (see :class:`Spidermon`)."""
    extensions = getattr(crawler, "extensions", None)
    middlewares = getattr(extensions, "middlewares", ())
    return any(isinstance(m, Spidermon) for m in middlewares)


def _count(value: Any) -> int:
    """A stats value as a number (a shared collector, scrapy-redis's, gives text back)."""
    if value is None:
        return 0
    return int(float(value))


def _matching(stats: Mapping[str, Any], pattern: re.Pattern[str]) -> dict[str, int]:
    """The non-zero stats whose key *pattern* matches, by the pattern's first group."""
    found: dict[str, int] = {}
    for key, value in stats.items():
        match = pattern.match(key)
        if match is not None and _count(value):
            found[match.group(1)] = _count(value)
    return found


def _per_kind(stats: Mapping[str, Any], event: str) -> dict[str, int]:
    """``ingest/<kind>/<event>`` by kind (``items``, ``requests``, ``logs``, ...), non-zero."""
    return _matching(stats, re.compile(rf"^{PREFIX}/([^/]+)/{re.escape(event)}$"))


def _kinds(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def _limit(settings: BaseSettings, name: str) -> int:
    value = settings.get(name)
    if value is None:
        return 0
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = -1
    if limit < 0 or isinstance(value, (bool, float)):
        raise ConfigError(
            f"{name} ({value!r}) is invalid: it must be a whole number, 0 or more. Fix: set it "
            "to the most the crawl may have, e.g. 0"
        )
    return limit


def _dead_letter_table(crawler: Crawler) -> tuple[str, str]:
    """The dead-letter table's name and this job's id as an SQL literal, for the message."""
    runtime = _runtime(crawler)
    if runtime is None or runtime.job is None:
        prefix = crawler.settings.get("INGEST_TABLE_PREFIX") or "ingest_"
        return f"{prefix}dead_letters", "'<this job_id>'"
    return runtime.tables["dead_letters"].name, f"'{runtime.job.job_id}'"
