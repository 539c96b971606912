"""A writer process that takes no request for a long while never blocks the crawl's thread.

The crawl hands each batch to its writer process as a file plus a short request on the
writer's stdin, a pipe of 64 KiB: about 97 requests (a store request is about 680 bytes).
The writer answers one request at a time; while its ``COPY`` waits for a table lock it reads
none. The test holds ``LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE`` while the crawl hands
over several times as many batches as the pipe holds, and measures, with a ``LoopingCall``
every 0.1 s inside the crawl, that the crawl's thread never stops for 0.5 s; then every item
is stored once the lock is gone.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from _helpers import Crawl, Database, wait_for
from test_backend_hosts import _run_host_script

from scrapy_ingest._compat import _scrapy_version
from scrapy_ingest.hosting import _scratch_dir

if TYPE_CHECKING:
    from services import LocalSite

pytestmark = [pytest.mark.postgres, pytest.mark.crawl, pytest.mark.slow, pytest.mark.exclusive]

#: how often the probe's call runs, and the longest gap between two calls the crawl may show
TICK = 0.1
MAX_GAP = 0.5
#: batches handed over and not answered that the lock must see: 3x what the pipe holds
HANDED_OVER = 300
#: how long the lock is held at most, waiting for HANDED_OVER (a crawl whose thread blocks
#: on the full pipe hands over no more batches: it waits for the lock to go)
HOLD_AT_MOST = 60.0

PAGES = 600
PER_PAGE = 4


class LoopGapProbe:
    """An extension of the crawl under test: calls itself every ``TICK`` s from
    ``engine_started`` (a ``LoopingCall`` on a reactor, an asyncio task without one), and writes
    to ``TEST_GAPS_FILE`` at ``engine_stopped`` every gap between two calls longer than twice
    the interval, as ``[monotonic time of the earlier call, gap]``, and the number of calls."""

    def __init__(self, crawler: Any) -> None:
        from scrapy import signals

        self._path = Path(crawler.settings["TEST_GAPS_FILE"])
        self._last: float | None = None
        self._ticks = 0
        self._gaps: list[tuple[float, float]] = []
        self._loop: Any = None
        self._task: asyncio.Task[None] | None = None
        crawler.signals.connect(self._start, signal=signals.engine_started)
        crawler.signals.connect(self._stop, signal=signals.engine_stopped)

    @classmethod
    def from_crawler(cls, crawler: Any) -> LoopGapProbe:
        return cls(crawler)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last > 2 * TICK:
            self._gaps.append((self._last, now - self._last))
        self._last = now
        self._ticks += 1

    def _start(self) -> None:
        if "twisted.internet.reactor" in sys.modules:
            from twisted.internet.task import LoopingCall

            self._loop = LoopingCall(self._tick)
            self._loop.start(TICK)
        else:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._tick()
            await asyncio.sleep(TICK)

    def _stop(self) -> None:
        self._tick()
        if self._loop is not None:
            self._loop.stop()
        if self._task is not None:
            self._task.cancel()
        self._path.write_text(json.dumps({"ticks": self._ticks, "gaps": self._gaps}))


def handed_over(crawl_pid: int) -> int:
    """Batches the crawl process *crawl_pid* has handed to its writer process and that are not
    answered yet: their files (the writer removes each once it has answered for it)."""
    root = Path(_scratch_dir() or tempfile.gettempdir())
    return sum(len(list(d.glob("*.batch"))) for d in root.glob(f"scrapy_ingest_{crawl_pid}_*"))


def writer_waits_for_lock(locker: psycopg.Connection[Any]) -> bool:
    row = locker.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize(
    "reactor",
    [
        "asyncio",
        pytest.param(
            "none",
            marks=pytest.mark.skipif(
                _scrapy_version() < (2, 15), reason="Scrapy runs without a reactor from 2.15 on"
            ),
        ),
    ],
)
def test_a_writer_held_by_a_lock_never_blocks_the_crawls_thread(
    site: LocalSite, pg_url: str, tmp_path: Path, reactor: str
) -> None:
    gaps_file = tmp_path / "gaps.json"
    args = {
        "base_url": site.base_url,
        "reactor": reactor,
        "pages": PAGES,
        "per_page": PER_PAGE,
        # slow pages: the crawl outlasts the lock's first seconds, however fast the machine
        "delay_ms": 50,
        "settings": {
            "INGEST_DATABASE_URL": pg_url,
            "INGEST_SPILL_DIR": str(tmp_path / "spill"),
            # two batches per page: hundreds of requests to the writer during the lock
            "INGEST_BATCH_ROWS": 2,
            # a lock is slow, not down: nothing is to be spilled
            "INGEST_RETRY_TIMEOUT": 120,
            "LOGSTATS_INTERVAL": 0,
            "EXTENSIONS": {f"{__name__}.LoopGapProbe": 0},
            "TEST_GAPS_FILE": str(gaps_file),
        },
    }
    database = Database(pg_url)
    crawl = Crawl(args, tmp_path)
    try:
        wait_for(
            lambda: database.table_exists("ingest_items") and database.count("ingest_items"),
            timeout=60,
            what="the first items stored",
        )
        with psycopg.connect(pg_url) as locker, locker.transaction():
            locker.execute("LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE")
            lock_start = time.monotonic()
            wait_for(lambda: writer_waits_for_lock(locker), timeout=30, what="the writer to wait")
            deadline = lock_start + HOLD_AT_MOST
            most = 0
            while time.monotonic() < deadline and crawl.running:
                most = max(most, handed_over(crawl.process.pid))
                if most >= HANDED_OVER:
                    break
                time.sleep(0.05)
            lock_end = time.monotonic()
        result = crawl.wait()
    finally:
        crawl.kill()

    assert result.returncode == 0, result.describe()
    assert result.stats.get("finish_reason") == "finished", result.describe()
    assert "Traceback" not in result.output, result.describe()
    probe = json.loads(gaps_file.read_text())
    during = [gap for start, gap in probe["gaps"] if start + gap > lock_start and start < lock_end]
    longest = max(during, default=0.0)
    measured = (
        f"lock held {lock_end - lock_start:.1f} s; batches handed over and unanswered: at most "
        f"{most}; longest gap between two calls during the lock: {longest:.2f} s "
        f"({probe['ticks']} calls); gaps over {2 * TICK} s, from the lock's start: "
        + ", ".join(f"{start - lock_start:+.1f} s: {gap:.2f} s" for start, gap in probe["gaps"])
    )
    print(measured)
    # on a machine whose cores are all taken, gaps of 0.5 s show outside the lock too
    assert longest < MAX_GAP, measured
    assert most >= HANDED_OVER, measured
    # nothing lost, nothing twice
    [(stored, distinct)] = database.query(
        "SELECT count(*), count(DISTINCT (data->>'idx')::int) FROM ingest_items"
    )
    assert (stored, distinct) == (PAGES * PER_PAGE, PAGES * PER_PAGE)


_WRITER_DIES_WITH_REQUESTS_QUEUED = textwrap.dedent(
    """
    import faulthandler
    import threading
    from twisted.internet.task import deferLater
    from scrapy_ingest.hosting import WriterProcessDied

    async def main(reactor):
        host, items = await opened_host()
        with psycopg.connect({url!r}) as lock:
            lock.execute("LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE")
            # a thread blocked on the full pipe never gets back: say where it is, and fail
            faulthandler.dump_traceback_later(30, exit=True)
            started = time.monotonic()
            # the writer waits for the lock: 3x what its stdin holds
            stores = [host.store(items, Batch(make_rows(1, start=n))) for n in range(300)]
            handed_over = time.monotonic() - started
            faulthandler.cancel_dump_traceback_later()
            # the first writer and its 3 successors (each sent every request again) die
            for _ in range(4):
                pid = host._process.pid
                os.kill(pid, signal.SIGKILL)
                while host._process is not None and host._process.pid == pid:
                    await deferLater(reactor, 0.05)
            results = []
            for store in stores:
                try:
                    results.append((True, await store))
                except Exception as exc:
                    results.append((False, exc))
        failed = sorted({{type(r).__name__ for ok, r in results if not ok}})
        stored = sum(1 for ok, _ in results if ok)
        deadline = time.monotonic() + 30
        while any(t.name == "scrapy_ingest_feed" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a feed's thread outlives its writer"
            await deferLater(reactor, 0.05)
        print(json.dumps([handed_over, stored, failed]))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


@pytest.mark.postgres
def test_requests_queued_for_a_writer_that_dies_for_good_fail_with_writer_process_died(
    pg_url: str,
) -> None:
    (handed_over, stored, failed), stderr = _run_host_script(
        _WRITER_DIES_WITH_REQUESTS_QUEUED, pg_url
    )
    assert handed_over < 5  # nothing waited for the writer (a blocked write never returns)
    assert (stored, failed) == (0, ["WriterProcessDied"])
    assert stderr.count("starting it again") == 3
