"""The memory of a crawl measured from outside its process, for the memory-bound test and
``bench/locked_table.py``.

What a crawl holds in memory is more than its own RSS: its writer process
(``python -m scrapy_ingest.backends._process``, a child of the crawl) and the batches handed
to it, which wait as files in ``/dev/shm/scrapy_ingest_<crawl pid>_*/`` (tmpfs: RAM, counted in
no process's RSS, since both sides use ``write()``/``read()``, not ``mmap``). A
:class:`MemorySampler` reads all three every ``interval`` seconds from ``/proc`` and keeps the
samples, so that a baseline (the mean over a window) and peaks can be taken afterwards.

Scrapy's own ``memusage/max`` is no measure here: it samples the crawl process alone, at start
and then every ``MEMUSAGE_CHECK_INTERVAL_SECONDS`` (60 s).
"""

from __future__ import annotations

import glob
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _helpers import Crawl, CrawlResult

MIB = 1024 * 1024
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class MemorySample:
    at: float  #: time.monotonic(), the same clock in every process of the machine
    crawl: int  #: RSS of the crawl process, bytes
    children: int  #: RSS of all its descendants (the writer process), bytes
    shm: int  #: bytes of the files under /dev/shm/scrapy_ingest_<crawl pid>_*

    @property
    def total(self) -> int:
        return self.crawl + self.children + self.shm


def rss(pid: int) -> int:
    """VmRSS of *pid* in bytes; 0 once it is gone (or a zombie, which has no VmRSS line)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below *pid* (children of all its threads, theirs, ...)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for path in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                text = Path(path).read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            children = [int(word) for word in text.split()]
            found += children
            todo += children
    return found


def shm_bytes(pid: int) -> int:
    """Bytes of the batch files the crawl *pid* has in /dev/shm."""
    total = 0
    for directory in SHM.glob(f"scrapy_ingest_{pid}_*"):
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # answered and removed meanwhile
                        continue
        except FileNotFoundError:
            continue
    return total


def sample(pid: int) -> MemorySample:
    return MemorySample(
        at=time.monotonic(),
        crawl=rss(pid),
        children=sum(rss(child) for child in descendants(pid)),
        shm=shm_bytes(pid),
    )


class MemorySampler:
    """Samples the memory of the crawl process *pid* in a thread of this process, every
    *interval* seconds, from :meth:`start` to :meth:`stop` (or the crawl's end)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[MemorySample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            found = sample(self.pid)
            if found.crawl == 0:  # the crawl has ended
                return
            self.samples.append(found)
            self._stop.wait(self.interval)

    def between(self, start: float, end: float = float("inf")) -> list[MemorySample]:
        return [s for s in self.samples if start <= s.at < end]

    def baseline(self, start: float, end: float) -> MemorySample:
        """The mean of each measure over the samples taken from *start* to *end*."""
        window = self.between(start, end)
        assert window, f"no memory sample between {start} and {end}: {len(self.samples)} in all"
        n = len(window)
        return MemorySample(
            at=end,
            crawl=sum(s.crawl for s in window) // n,
            children=sum(s.children for s in window) // n,
            shm=sum(s.shm for s in window) // n,
        )

    def peaks(self, start: float = 0.0, end: float = float("inf")) -> MemoryPeaks:
        """The highest value of each measure, and of their sum, from *start* to *end*."""
        window = self.between(start, end)
        assert window, f"no memory sample between {start} and {end}: {len(self.samples)} in all"
        return MemoryPeaks(
            crawl=max(s.crawl for s in window),
            children=max(s.children for s in window),
            shm=max(s.shm for s in window),
            total=max(s.total for s in window),
            samples=len(window),
        )


@dataclass(frozen=True)
class MemoryPeaks:
    crawl: int
    children: int
    shm: int
    #: the peak of the sum (not the sum of the peaks, which never happen at once)
    total: int
    samples: int


def yielded_times(path: Path) -> list[float]:
    """The times (monotonic) of the items that ``CountingPipeline`` of the crawl script saw."""
    if not path.exists():
        return []
    return [float(line) for line in path.read_text(encoding="ascii").split()]


def count_between(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


# the locked-table scenario (issue 23): tests/test_spill.py and bench/locked_table.py


@dataclass(frozen=True)
class LockedTableRun:
    """What :func:`run_locked_table` measured; times are ``time.monotonic()``."""

    result: CrawlResult
    sampler: MemorySampler
    yielded: list[float]
    baseline_start: float
    lock_start: float
    #: when the engine was first paused during the lock (None: never)
    paused_at: float | None
    lock_end: float
    stored: int  #: rows in ingest_items after the crawl
    distinct: int  #: distinct idx values among them

    @property
    def baseline(self) -> MemorySample:
        return self.sampler.baseline(self.baseline_start, self.lock_start)

    @property
    def peaks(self) -> MemoryPeaks:
        """From the lock to the crawl's end (the release and the catching up included)."""
        return self.sampler.peaks(self.lock_start)

    @property
    def growth(self) -> int:
        """Peak of crawl + writer + /dev/shm over its mean before the lock, bytes."""
        return self.peaks.total - self.baseline.total

    @property
    def growth_during_lock(self) -> int:
        """The same, from the lock to its release only (the rest came while catching up)."""
        return self.sampler.peaks(self.lock_start, self.lock_end).total - self.baseline.total

    @property
    def growth_catching_up(self) -> int:
        """The same, from the lock to 10 s after its release (the backlog written, the engine
        running again)."""
        peaks = self.sampler.peaks(self.lock_start, self.lock_end + 10)
        return peaks.total - self.baseline.total

    @property
    def rate_before(self) -> float:
        """Items yielded per second in the baseline window."""
        seconds = self.lock_start - self.baseline_start
        return count_between(self.yielded, self.baseline_start, self.lock_start) / seconds

    def describe(self) -> str:
        """The figures, for an assertion's message."""
        peaks, baseline = self.peaks, self.baseline
        first, second = self.lock_halves
        buffer_stats = {k: v for k, v in self.result.stats.items() if k.startswith("ingest/buffer")}
        return (
            f"growth {self.growth / MIB:.1f} MiB: peak {peaks.total / MIB:.1f} MiB over a "
            f"baseline of {baseline.total / MIB:.1f} (crawl {baseline.crawl / MIB:.1f}, writer "
            f"{baseline.children / MIB:.1f}, /dev/shm {baseline.shm / MIB:.1f}); peaks: crawl "
            f"{peaks.crawl / MIB:.1f}, writer {peaks.children / MIB:.1f}, /dev/shm "
            f"{peaks.shm / MIB:.1f}; growth during the lock "
            f"{self.growth_during_lock / MIB:.1f} MiB, to 10 s after it "
            f"{self.growth_catching_up / MIB:.1f} MiB; lock held "
            f"{self.lock_end - self.lock_start:.1f} s, the engine paused {self._paused_after()}; "
            "items yielded: "
            f"{self.rate_before:.0f}/s before the lock, "
            f"{first} + {second} in its two halves; stored {self.stored} ({self.distinct} "
            f"distinct); {buffer_stats}"
        )

    def _paused_after(self) -> str:
        if self.paused_at is None:
            return "never"
        return f"{self.paused_at - self.lock_start:.1f} s into it"

    @property
    def lock_halves(self) -> tuple[int, int]:
        """Items yielded in the first and the second half of the lock."""
        middle = (self.lock_start + self.lock_end) / 2
        return (
            count_between(self.yielded, self.lock_start, middle),
            count_between(self.yielded, middle, self.lock_end),
        )


def run_locked_table(
    base_url: str,
    url: str,
    workdir: Path,
    *,
    buffer: int,
    pages: int,
    per_page: int,
    size: int,
    lock_seconds: float,
    warmup_seconds: float = 3.0,
    baseline_seconds: float = 2.0,
    settings: dict[str, Any] | None = None,
) -> LockedTableRun:
    """Crawl ``pages`` x ``per_page`` items of ``size`` bytes of padding into *url* with
    ``INGEST_MAX_BUFFER_BYTES = buffer``; once items are stored, ``warmup_seconds`` and then
    ``baseline_seconds`` (the baseline's window) have passed, hold ``LOCK TABLE ingest_items
    IN ACCESS EXCLUSIVE MODE`` in another connection (see :func:`_hold_lock`); sample the
    crawl's memory all along."""
    import psycopg
    from _helpers import Crawl, Database

    workdir.mkdir(parents=True, exist_ok=True)
    yielded_file = workdir / "yielded.txt"
    pauses_file = workdir / "pauses.txt"
    args = {
        "base_url": base_url,
        "pages": pages,
        "per_page": per_page,
        "size": size,
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(workdir / "spill"),
            "INGEST_MAX_BUFFER_BYTES": buffer,
            # a lock is slow, not down: nothing is to be spilled
            "INGEST_RETRY_TIMEOUT": 120,
            "INGEST_FLUSH_INTERVAL": 0.2,
            "LOGSTATS_INTERVAL": 0,
            # before ours (900): it sees each item as it is yielded
            "ITEM_PIPELINES": {"_crawl_script.CountingPipeline": 100},
            "TEST_YIELDED_FILE": str(yielded_file),
            "EXTENSIONS": {"_crawl_script.PauseRecorder": 0},
            "TEST_PAUSES_FILE": str(pauses_file),
            **(settings or {}),
        },
    }
    database = Database(url)
    crawl = Crawl(args, workdir)
    sampler = MemorySampler(crawl.process.pid).start()
    try:
        deadline = time.monotonic() + 60
        while not (database.table_exists("ingest_items") and database.count("ingest_items")):
            if not crawl.running or time.monotonic() > deadline:
                raise AssertionError(f"no item stored: {crawl.wait(10).describe()}")
            time.sleep(0.05)
        time.sleep(warmup_seconds)  # the crawl's heap grows in its first seconds, lock or not
        baseline_start = time.monotonic()
        time.sleep(baseline_seconds)
        with psycopg.connect(url) as locker, locker.transaction():
            locker.execute("LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE")
            lock_start = time.monotonic()
            if not crawl.running:
                raise AssertionError("the crawl ended before the lock: give it more pages")
            paused_at = _hold_lock(crawl, pauses_file, lock_start, lock_seconds)
            lock_end = time.monotonic()
        result = crawl.wait()
    finally:
        crawl.kill()
        sampler.stop()
    [(stored, distinct)] = database.query(
        "SELECT count(*), count(DISTINCT (data->>'idx')::int) FROM ingest_items"
    )
    return LockedTableRun(
        result=result,
        sampler=sampler,
        yielded=yielded_times(yielded_file),
        baseline_start=baseline_start,
        lock_start=lock_start,
        paused_at=paused_at,
        lock_end=lock_end,
        stored=int(stored),
        distinct=int(distinct),
    )


def _hold_lock(crawl: Crawl, pauses: Path, lock_start: float, lock_seconds: float) -> float | None:
    """Return when the lock taken at *lock_start* may go: once it has lasted *lock_seconds*,
    and the engine (``PauseRecorder`` writes to *pauses*) has been paused for as long as the
    lock had lasted when it paused, so that the lock's second half (``lock_halves``) begins
    with the engine paused, however slowly the buffer fills. An engine still running after
    2 x *lock_seconds* is not waited for. Return when it paused (None: it did not)."""
    from _helpers import engine_pauses

    paused_at = None
    while crawl.running:
        paused_at = _first_pause(engine_pauses(pauses), lock_start)
        if paused_at is None:
            release = lock_start + 2 * lock_seconds
        else:
            release = max(lock_start + lock_seconds, 2 * paused_at - lock_start)
        if time.monotonic() >= release:
            break
        time.sleep(0.05)
    return paused_at


def _first_pause(changes: list[tuple[float, bool]], since: float) -> float | None:
    """When the engine was first paused from *since* on (*since* if it was paused then)."""
    before = [paused for at, paused in changes if at < since]
    if before and before[-1]:
        return since
    return next((at for at, paused in changes if paused and at >= since), None)
