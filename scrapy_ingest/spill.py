"""The spill journal: batches a database could not take, kept on disk until it can.

When a database stays unavailable past ``INGEST_RETRY_TIMEOUT``, the writer
stops waiting for it: each batch it cannot write goes to the journal, and the
crawl goes on at full speed. The journal is a directory per database under
``INGEST_SPILL_DIR``, named by a hash of the database URL (so the next crawl
with the same settings finds it, and no password is written anywhere): one
file per batch, written to a temporary name, fsync'd, then renamed, so a file
with a final name is always whole. A file holds its table (name, kind and
columns) and its rows, each with the id it was given when it was captured:
writing it again, twice or after a crash, stores nothing twice.

Batches are replayed, oldest first, when the database answers again (by the
same writer, while the crawl goes on), when a crawl with the same database
starts, and by ``scrapy ingest replay``. A process replaying a file first
renames it to ``<name>.replaying-<pid>``, so two processes never replay the
same file; a file left so by a process that died is taken back.

The latest state of each job row that could not be written is kept too
(``job-<hash of the job id>``), and written before the batches. Rows the
database refuses for their content when replayed (where a crawl would have
dead-lettered them) are kept in ``refused-<batch>`` files, with the reasons.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy_ingest._redact import redact_url

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scrapy_ingest.backends.base import Row, WriteOutcome
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: the layout of a batch file, in case it ever changes
FORMAT = 1
_BATCH = ".batch"
_JOB_PREFIX = "job-"
_REFUSED = "refused-"


def journal_dir(root: str | os.PathLike[str], url: str) -> Path:
    """The journal directory of the database at *url* (credentials and all) under *root*."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(root) / digest


@dataclass
class OpenOutcome:
    """What opening a host found: what it replayed, and why the database is unavailable if it
    is (the host spills until it answers)."""

    replayed: ReplayOutcome | None = None
    unavailable: str | None = None
    journal: str | None = None


@dataclass
class ReplayOutcome:
    batches: int = 0
    rows: int = 0
    dead: int = 0
    #: batches left in the journal, because the database failed again
    left: int = 0
    #: the replay stopped at a job row or batch the database did not take
    failed: bool = False


class SpillJournal:
    """The journal of one database. Thread-safe; several processes may share it."""

    def __init__(self, root: str | os.PathLike[str], url: str) -> None:
        self.dir = journal_dir(root, url)
        self.url = redact_url(url)
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._replaying = threading.Lock()
        #: bytes of the batch files, counted once, then kept up to date by add_bytes
        self._bytes: int | None = None

    # writing

    def spill(self, table: TableSpec, rows: Sequence[Row]) -> int:
        """Write *rows* of *table* to a new batch file; return its size in bytes."""
        return self.spill_file(table, rows)[1]

    def spill_file(self, table: TableSpec, rows: Sequence[Row]) -> tuple[Path, int]:
        """Write *rows* of *table* to a new batch file; return its path and size."""
        data = pickle.dumps((FORMAT, table, list(rows)), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence):06d}"
        path = self.dir / f"{name}-{table.name}{_BATCH}"
        self._write(path.name, data)
        return path, len(data)

    def save_job(self, table: TableSpec, job_id: str, row: Mapping[str, Any]) -> None:
        """Keep the latest state of a job row that could not be written."""
        data = pickle.dumps((FORMAT, table, dict(row)), protocol=pickle.HIGHEST_PROTOCOL)
        self._write(f"{_JOB_PREFIX}{hashlib.sha256(job_id.encode()).hexdigest()[:24]}", data)

    def _write(self, name: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = self.dir / "DATABASE"
        if not marker.exists():  # which database this is, for people and `scrapy ingest replay`
            marker.write_text(self.url + "\n", encoding="utf-8")
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.dir / name)
        _fsync_dir(self.dir)

    # reading

    def batches(self) -> list[Path]:
        """Batch files waiting, oldest first."""
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.endswith(_BATCH))
        except FileNotFoundError:
            return []

    def jobs(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.startswith(_JOB_PREFIX))
        except FileNotFoundError:
            return []

    def add_bytes(self, size: int) -> int:
        """Count a batch file of *size* bytes just spilled; return the journal's size."""
        with self._lock:
            if self._bytes is None:
                self._bytes = self.size()  # the new file included
            else:
                self._bytes += size
            return self._bytes

    def size(self) -> int:
        """Bytes of batch files waiting."""
        total = 0
        for path in self.batches():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    # replaying

    def replay(
        self,
        store: Callable[[TableSpec, Sequence[Row]], WriteOutcome],
        insert_job: Callable[[TableSpec, Mapping[str, Any]], Any],
        update_job: Callable[[TableSpec, str, Mapping[str, Any]], Any],
    ) -> ReplayOutcome:
        """Write every waiting job row and batch with the given functions, oldest first; stop
        at the first one the database does not take (it stays for the next replay)."""
        outcome = ReplayOutcome()
        if not self._replaying.acquire(blocking=False):
            return outcome  # another thread of this process is at it
        try:
            self._take_back_abandoned()
            for path in self.jobs():
                try:
                    _, table, row = _load(path)
                    insert_job(table, row)
                    update_job(table, row["job_id"], row)
                except FileNotFoundError:
                    continue
                except Exception as exc:
                    return self._stopped(outcome, exc)
                path.unlink()
            for path in self.batches():
                claimed = path.with_name(f"{path.name}.replaying-{os.getpid()}")
                try:
                    os.rename(path, claimed)
                except FileNotFoundError:
                    continue  # another process took it
                _, table, rows = _load(claimed)
                try:
                    result = store(table, rows)
                except Exception as exc:
                    os.rename(claimed, path)  # the database failed again: keep it
                    return self._stopped(outcome, exc)
                if result.lost:
                    os.rename(claimed, path)
                    return self._stopped(outcome, result.failure)
                if result.dead:
                    self._keep_refused(claimed, table, result.dead)
                claimed.unlink()
                _fsync_dir(self.dir)
                outcome.batches += 1
                outcome.rows += result.written
                outcome.dead += len(result.dead)
        finally:
            with self._lock:
                self._bytes = None  # counted again at the next spill
            self._replaying.release()
        if outcome.batches:
            logger.info(
                "Replayed %d spilled batches (%d rows) into %s from %s",
                outcome.batches,
                outcome.rows,
                self.url,
                self.dir,
            )
        return outcome

    def _keep_refused(self, path: Path, table: TableSpec, dead: list[tuple[Row, str]]) -> None:
        """Rows the database refused for their content when replayed: kept, with the reasons,
        in a ``refused-*`` file beside the journal (a crawl would have dead-lettered them)."""
        name = path.name.split(".replaying-")[0].removesuffix(_BATCH)
        data = pickle.dumps((FORMAT, table, dead), protocol=pickle.HIGHEST_PROTOCOL)
        self._write(f"{_REFUSED}{name}", data)
        logger.error(
            "The database at %s refused %d replayed rows of %s (%s); they are kept in %s",
            self.url,
            len(dead),
            table.name,
            dead[0][1],
            self.dir / f"{_REFUSED}{name}",
        )

    def _stopped(self, outcome: ReplayOutcome, failure: BaseException | str) -> ReplayOutcome:
        outcome.failed = True
        outcome.left = len(self.batches())
        logger.warning(
            "Replaying the spill journal into %s stopped (%s); %d batches wait in %s",
            self.url,
            failure,
            outcome.left,
            self.dir,
        )
        return outcome

    def _take_back_abandoned(self) -> None:
        """Files a replaying process left when it died go back to the queue."""
        try:
            paths = list(self.dir.iterdir())
        except FileNotFoundError:
            return
        for path in paths:
            name, sep, pid = path.name.rpartition(".replaying-")
            if sep and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, path.with_name(name))


def spilled_databases(root: str | os.PathLike[str]) -> Iterator[tuple[Path, str, int]]:
    """(journal directory, redacted URL, batch and job files waiting) of every database with
    a journal under *root*."""
    try:
        dirs = sorted(Path(root).iterdir())
    except FileNotFoundError:
        return
    for path in dirs:
        marker = path / "DATABASE"
        if marker.is_file():
            waiting = sum(
                1
                for p in path.iterdir()
                if p.name.endswith(_BATCH) or p.name.startswith(_JOB_PREFIX)
            )
            yield path, marker.read_text(encoding="utf-8").strip(), waiting


def _load(path: Path) -> tuple[int, Any, Any]:
    with open(path, "rb") as file:
        version, table, content = pickle.load(file)  # our own files
    if version != FORMAT:
        raise ValueError(f"{path} has spill format {version}; this version reads {FORMAT}")
    return version, table, content


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
