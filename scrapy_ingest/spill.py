"""The spill journal: batches a database could not take, kept on disk until it can.

When a database stays unavailable past ``INGEST_RETRY_TIMEOUT``, the writer
stops waiting for it: each batch it cannot write goes to the journal, and the
crawl goes on at full speed. The journal is a directory per database under
``INGEST_SPILL_DIR``, named by a hash of what names the database (scheme, host,
port, database or file path; never the credentials, so the next crawl with the same
database finds it, a fixed password included, and no password is written anywhere): one
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
(``job-<hash of the job id>``), and written before the batches. A journal that has
taken a batch keeps a small ``RESERVE`` file, removed to make room for the job row's
last state when the disk is full (so that the job row can still be closed), and once
the journal is empty again.

Free space is watched too: :meth:`SpillJournal.low_on_space` (one ``statvfs``
per batch spilled) says when the disk under the journal has less than its minimum
free space (``INGEST_SPILL_MIN_FREE_BYTES``), which the crawl takes as a full journal. Any number of
processes may replay one journal at once: each file operation allows for another
process having done it first.

Rows the database refuses for their content when replayed never stop the replay:
the batch is split until they are found (every other row is stored), and they go
to the database's dead-letter table with the reason, as a crawl's would; those
that the dead-letter table refuses too are kept in a ``refused-<batch>`` file
beside the journal, with the reasons. A job row refused for its content is
written again with its text cleaned, else dead-lettered the same way. Only a
database that does not take a batch at all (unavailable, or refusing the replay:
a missing privilege, say) stops the replay; the rest waits for the next one.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scrapy_ingest._redact import redact_url
from scrapy_ingest._shapes import ReplayOutcome

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scrapy_ingest._shapes import Row, WriteOutcome
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: the layout of a batch file, in case it ever changes
FORMAT = 1
_BATCH = ".batch"
_JOB_PREFIX = "job-"
_REFUSED = "refused-"
_RESERVE = "RESERVE"
#: the size of the RESERVE file: room for a job row's last state (its stats and settings)
RESERVE_BYTES = 256 * 1024
#: the default minimum free space under the journal: the larger of this share of the disk...
MIN_FREE_SHARE = 0.01
#: ...and this many bytes
MIN_FREE_BYTES = 256 * 1024 * 1024


def default_min_free(total: int) -> int:
    """The minimum free space under a journal on a disk of *total* bytes, by default."""
    return max(int(total * MIN_FREE_SHARE), MIN_FREE_BYTES)


def database_identity(url: str) -> str:
    """What names the database of *url*, never its credentials: the scheme (without a driver,
    aliases folded), host, port, and database or file path; ``postgresql://u:pw@Db:5432/x``
    and ``postgres+psycopg://other@db:5432/x`` are one database. The query is left out."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    family = scheme.split("+", 1)[0].lower()
    family = _SCHEME_ALIASES.get(family, family)
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    if family in ("sqlite", "chdb"):  # a file or directory path, which may hold "@" or ":"
        return f"{family}://{rest}"
    netloc, _, path = rest.partition("/")
    host = netloc.rpartition("@")[2].lower()  # the last "@" ends the userinfo
    return f"{family}://{host}/{path}"


#: schemes that name the same kind of database
_SCHEME_ALIASES = {"postgres": "postgresql", "mariadb": "mysql", "clickhouses": "clickhouse"}


def journal_dir(root: str | os.PathLike[str], url: str) -> Path:
    """The journal directory of the database at *url* under *root*: named by a hash of what
    names the database (:func:`database_identity`), so that a crawl whose password was wrong
    and the replay run after the fix share it."""
    digest = hashlib.sha256(database_identity(url).encode()).hexdigest()[:16]
    return Path(root) / digest


class SpillJournal:
    """The journal of one database. Thread-safe; several processes may share it."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        url: str,
        *,
        on_replayed: Callable[[int], None] | None = None,
        min_free: int | None = None,
    ) -> None:
        self.dir = journal_dir(root, url)
        #: the free space under the journal below which it counts as full (None: the default,
        #: :func:`default_min_free`; 0: never)
        self._min_free = min_free
        self.url = redact_url(url)
        self._identity = database_identity(url)
        #: called with the rows of each batch replayed (the replay command's progress)
        self._on_replayed = on_replayed
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
        """Keep the latest state of a job row that could not be written; its last state (not
        ``running``), on a full disk, in the room of the ``RESERVE`` file."""
        data = pickle.dumps((FORMAT, table, dict(row)), protocol=pickle.HIGHEST_PROTOCOL)
        name = f"{_JOB_PREFIX}{hashlib.sha256(job_id.encode()).hexdigest()[:24]}"
        try:
            self._write(name, data)
        except OSError:
            reserve = self.dir / _RESERVE
            if row.get("status") == "running" or not reserve.exists():
                raise
            reserve.unlink()
            logger.warning(
                "The disk under the spill journal %s is full: its reserve makes room for the "
                "job row of %s",
                self.dir,
                job_id,
            )
            self._write(name, data)

    def keep_reserve(self) -> None:
        """Make sure the journal has its ``RESERVE`` file (room for the job row's last state
        on a full disk); quietly not, when the disk has no room for it."""
        reserve = self.dir / _RESERVE
        if reserve.exists():
            return
        try:
            self._write(_RESERVE, bytes(RESERVE_BYTES))
        except OSError:
            with contextlib.suppress(OSError):
                reserve.unlink()

    def low_on_space(self) -> str | None:
        """Why the journal counts as full although its disk still takes files (its free space
        is under the minimum), or None. One ``statvfs``: ask once per batch, not per row."""
        if self._min_free == 0:
            return None
        try:
            stat = os.statvfs(self.dir)
        except OSError:
            return None
        free = stat.f_bavail * stat.f_frsize
        minimum = self._min_free
        if minimum is None:
            minimum = default_min_free(stat.f_blocks * stat.f_frsize)
        if free >= minimum:
            return None
        return (
            f"the disk under the spill journal {self.dir} has {free:,} bytes free, less than "
            f"the minimum of {minimum:,} (INGEST_SPILL_MIN_FREE_BYTES)"
        )

    def _write(self, name: str, data: bytes) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._mark()
        self._write_whole(name, data)

    def _mark(self) -> None:
        """Name the database in the journal's ``DATABASE`` file, for people and `scrapy ingest
        replay` (written whole, or not at all: a full disk leaves no empty one)."""
        if not (self.dir / "DATABASE").exists():
            self._write_whole("DATABASE", f"{self.url}\n".encode())

    def _write_whole(self, name: str, data: bytes) -> None:
        """Write *name* in the journal through a temporary file, fsync'd, then renamed."""
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.dir / name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a part written to a full disk would take the room of others
            raise
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
        replay_job: Callable[[TableSpec, Mapping[str, Any]], WriteOutcome],
    ) -> ReplayOutcome:
        """Write every waiting job row and batch with the given functions, oldest first.

        Each function returns what became of its rows (a job row is one): written; refused
        for their content (``dead``: the function has put them in the dead-letter table,
        except those in ``dead_refused``, which go to a ``refused-*`` file here); or not
        written (``lost``), because the database is unavailable or refuses the replay
        (``refused``). Rows refused for their content never stop the replay; a database that
        does not take a batch does: it stays, with the rest, for the next replay.
        """
        outcome = ReplayOutcome()
        if not self._replaying.acquire(blocking=False):
            return outcome  # another thread of this process is at it
        try:
            self._adopt_other_journals()
            self._take_back_abandoned()
            if self._replay_jobs(replay_job, outcome):
                self._replay_batches(store, outcome)
            if not self.batches() and not self.jobs():
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / _RESERVE).unlink()  # nothing waits: no room to keep
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

    def _replay_jobs(
        self,
        replay_job: Callable[[TableSpec, Mapping[str, Any]], WriteOutcome],
        outcome: ReplayOutcome,
    ) -> bool:
        """Write the waiting job rows; False when the database did not take one."""
        for path in self.jobs():
            try:
                _, table, row = _load(path)
            except FileNotFoundError:
                continue  # another process replayed it
            result = replay_job(table, row)
            if result.lost:
                self._stopped(outcome, result)
                return False
            self._set_aside(path, table, result, outcome)
            with contextlib.suppress(FileNotFoundError):  # another process, in between
                path.unlink()
        return True

    def _replay_batches(
        self, store: Callable[[TableSpec, Sequence[Row]], WriteOutcome], outcome: ReplayOutcome
    ) -> None:
        for path in self.batches():
            claimed = path.with_name(f"{path.name}.replaying-{os.getpid()}")
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                continue  # another process took it
            _, table, rows = _load(claimed)
            result = store(table, rows)
            if result.lost:
                os.rename(claimed, path)  # the database failed again: keep it
                self._stopped(outcome, result)
                return
            self._set_aside(claimed, table, result, outcome)
            claimed.unlink()
            _fsync_dir(self.dir)
            outcome.batches += 1
            outcome.rows += result.written
            if self._on_replayed is not None:
                self._on_replayed(result.written)

    def _set_aside(
        self, path: Path, table: TableSpec, result: WriteOutcome, outcome: ReplayOutcome
    ) -> None:
        """Count the rows of *path* refused for their content (in *result*), and keep those
        the dead-letter table refused too in a ``refused-*`` file, with the reasons."""
        if not result.dead:
            return
        for _, reason in result.dead:
            outcome.reasons[reason] = outcome.reasons.get(reason, 0) + 1
        kept = result.dead_refused
        outcome.kept += len(kept)
        outcome.dead_lettered += len(result.dead) - len(kept)
        where = "its dead-letter table"
        if kept:
            name = path.name.split(".replaying-")[0].removesuffix(_BATCH)
            data = pickle.dumps((FORMAT, table, kept), protocol=pickle.HIGHEST_PROTOCOL)
            self._write(f"{_REFUSED}{name}", data)
            where = f"{self.dir / (_REFUSED + name)} ({len(kept)}: {kept[0][1]})"
        logger.error(
            "The database at %s refused %d replayed rows of %s for their content (%s); they "
            "are set aside in %s",
            self.url,
            len(result.dead),
            table.name,
            result.dead[0][1],
            where,
        )

    def _stopped(self, outcome: ReplayOutcome, result: WriteOutcome) -> None:
        outcome.failed = True
        outcome.refused = result.refused
        outcome.left = len(self.batches()) + len(self.jobs())
        log = logger.error if result.refused else logger.warning
        log(
            "Replaying the spill journal into %s stopped (%s); %d batch and job files wait in %s",
            self.url,
            result.refused or result.failure,
            outcome.left,
            self.dir,
        )

    def _adopt_other_journals(self) -> None:
        """Move into this journal the files of other journals of the same database: those
        named by the whole URL (before 0.1, so a wrong password made a journal of its own)."""
        root = self.dir.parent
        try:
            others = [p for p in root.iterdir() if p != self.dir and (p / "DATABASE").is_file()]
        except FileNotFoundError:
            return
        for other in others:
            try:
                shown = (other / "DATABASE").read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                continue  # adopted by another process in between
            if database_identity(shown) != self._identity:
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            self._mark()
            for path in other.iterdir():
                if path.name not in ("DATABASE", _RESERVE) and not path.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(path, self.dir / path.name)
            _fsync_dir(self.dir)
            logger.info("Moved the spill journal %s of %s into %s", other, self.url, self.dir)
            with contextlib.suppress(OSError):  # not empty: a process still writes there
                (other / _RESERVE).unlink(missing_ok=True)
                (other / "DATABASE").unlink()
                other.rmdir()

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
