"""Where a backend's work runs: in writer threads, or in a writer process.

Both hosts offer the same asynchronous interface to the crawl's thread: coroutines, and
:meth:`~Host.store` a :class:`~scrapy_ingest._aio.Future`, set on the crawl's thread.

* :class:`ProcessHost` runs the backend in a child process
  (:mod:`scrapy_ingest.backends._process`). Every backend uses it by default: the crawl
  process then imports no driver (nor SQLAlchemy), and the per-row work of writing takes
  nothing from the crawl's thread.
* :class:`ThreadHost` runs the backend's blocking calls in a small thread pool
  of the crawl process: with ``INGEST_WRITER_PROCESS = False``, or where there is no
  Python executable to start (``sys.executable`` empty, as in some embedded Pythons).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

import scrapy_ingest
from scrapy_ingest import exceptions
from scrapy_ingest._aio import Future, in_thread
from scrapy_ingest._compat import thread_caller
from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends import check_driver, check_url, local_host
from scrapy_ingest.backends._process import HEADER, frame, receive
from scrapy_ingest.exceptions import BackendUnavailable, IngestError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from scrapy_ingest._shapes import OpenOutcome, ReplayOutcome
    from scrapy_ingest.backends import Batch, LocalHost, WriteOutcome
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_STOP_TIMEOUT = 30
_MAX_RESTARTS = 3


class Host(Protocol):
    #: the database URL with credentials redacted, for messages
    url: str

    def start(self) -> None: ...

    async def open(self) -> OpenOutcome: ...

    def discard(self) -> None: ...

    async def close(self) -> None: ...

    async def recover(self) -> ReplayOutcome | None: ...

    async def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]: ...

    def store(self, table: TableSpec, batch: Batch) -> Future[WriteOutcome]:
        """Hand *batch* over: a future, not a coroutine, so that the batch leaves now and
        the caller counts it as answered the moment it is."""
        ...

    async def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool: ...

    async def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None: ...


def create_host(
    url: str,
    tables: Sequence[TableSpec],
    *,
    create_tables: bool,
    retry_timeout: float,
    writer_process: bool,
    spill_dir: str | None = None,
    require_backend: bool = True,
    spill_min_free: int | None = None,
    on_stuck: Callable[[bool], None] | None = None,
) -> Host:
    """Return the host for the backend of *url*; raise ConfigError for a bad URL or driver.

    *on_stuck* is called on the reactor thread with True when neither the database nor the
    spill journal takes rows (the crawl must stop taking work), with False once one does.
    """
    options: dict[str, Any] = {
        "create_tables": create_tables,
        "retry_timeout": retry_timeout,
        "spill_dir": spill_dir,
        "require_backend": require_backend,
        "spill_min_free": spill_min_free,
    }
    if writer_process and sys.executable:
        # a bad URL or driver fails here, not in the child; without building the backend,
        # whose module imports its driver (psycopg, clickhouse_connect, SQLAlchemy): only the
        # child needs it
        check_url(url)
        check_driver(url)
        return ProcessHost(url, tables, on_stuck=on_stuck, **options)
    from_thread = None if on_stuck is None else partial(thread_caller(), on_stuck)
    return ThreadHost(local_host(url, tables, on_stuck=from_thread, **options))


class ThreadHost:
    """Run a backend's blocking calls in writer threads of the crawl process."""

    def __init__(self, local: LocalHost) -> None:
        self._local = local
        self.url = local.url
        self._executor: ThreadPoolExecutor | None = None

    def _run(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._local.threads, thread_name_prefix="scrapy_ingest"
            )
        return in_thread(fn, *args, executor=self._executor)

    def start(self) -> None:
        """Nothing to start ahead: opening in a writer thread early would take the crawl's
        thread's time (the GIL) all the same."""

    async def open(self) -> OpenOutcome:
        try:
            return await self._run(self._local.open)
        except BaseException:
            self._shut_down()
            raise

    def discard(self) -> None:
        """Nothing was started (see start)."""

    async def close(self) -> None:
        try:
            await self._run(self._local.close)
        finally:
            self._shut_down()

    async def recover(self) -> ReplayOutcome | None:
        return await self._run(self._local.recover)

    async def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        return await self._run(self._local.mark_crashed, table, stale_before, alive, crawl_id)

    def _shut_down(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def store(self, table: TableSpec, batch: Batch) -> Future[WriteOutcome]:
        return self._run(self._local.store, table, batch)

    async def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        return await self._run(self._local.insert_job, table, row)

    async def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        update = partial(self._local.update_job, unless_finished=unless_finished)
        await self._run(update, table, job_id, values)


class WriterProcessDied(BackendUnavailable):
    """The writer process exited, and could not be started again."""


@dataclass
class _Request:
    operation: str
    args: tuple[Any, ...]
    answer: Future[Any]


class ProcessHost:
    """Run a backend in a writer process, driven from the reactor thread.

    Why a process: writer threads share the GIL with the reactor thread.
    While a crawl keeps the reactor busy, every blocking call a writer thread
    makes costs it up to a GIL switch interval to get back in: the PostgreSQL
    write path ran 3x slower next to a busy reactor in our measurements. The
    writer process has an interpreter of its own.

    Why no thread on our side either: a thread that pickles batches and
    waits on pipes has the same problem. So the reactor thread hands each
    batch over itself, in a few hundred microseconds: it pickles the rows
    (small tuples; the JSON stays one buffer) into a file in a private
    directory (in ``/dev/shm`` where there is one, so nothing waits for a
    disk), and writes a short request to the child's stdin, without waiting:
    while the child is busy (a lock, an outage) and its stdin is full, the
    requests wait in a queue that a thread writes out as the child reads
    (:class:`_Feed`). One thread in this process only waits for answers and
    passes them to the reactor.

    Once its file is written, the batch is not kept in this process: the
    file is the batch until the child has answered for it (the child removes
    it then), so the rows and JSON of the batches in flight take no room in
    this process's heap, where the crawl's own objects are made and freed
    (measured: the crawl runs about 4% faster than with each batch kept until
    its answer). The child answers in order. If it dies, it is started again
    (up to ``_MAX_RESTARTS`` times) and every unanswered request is sent
    again, naming the same files; the record ids keep batches written twice
    from being stored twice.
    """

    def __init__(
        self,
        url: str,
        tables: Sequence[TableSpec],
        *,
        create_tables: bool,
        retry_timeout: float,
        spill_dir: str | None = None,
        require_backend: bool = True,
        spill_min_free: int | None = None,
        on_stuck: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = redact_url(url)
        self._on_stuck = on_stuck
        self._backend_args = (
            url,
            list(tables),
            create_tables,
            retry_timeout,
            spill_dir,
            require_backend,
            spill_min_free,
        )
        self._process: subprocess.Popen[bytes] | None = None
        #: writes requests to the process's stdin
        self._feed: _Feed | None = None
        #: requests not answered yet, sent or still queued in the feed, in order
        self._pending: deque[_Request] = deque()
        self._dir: Path | None = None
        self._sequence = itertools.count()
        self._restarts = 0
        self._closing = False
        #: the open request, from start() until open() returns it
        self._opening: Future[OpenOutcome] | None = None
        #: the process whose answers are read (see _listen)
        self._listening: subprocess.Popen[bytes] | None = None
        #: stops the current process if this host is dropped without close() or discard()
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], _Feed], ProcessHost] | None = (
            None
        )

    # lifecycle

    def start(self) -> None:
        """Start the writer process and ask it to open the database, without waiting for
        either: callable before the crawl's thread runs its loop (the answers wait in the
        pipe until :meth:`open`). Called early, this overlaps the writer's start-up (its
        imports, connecting, creating the tables) with the crawl's own."""
        if self._opening is not None:
            return
        # named after the crawl's process, so that one can tell whose batches these are
        self._dir = Path(
            tempfile.mkdtemp(prefix=f"scrapy_ingest_{os.getpid()}_", dir=_scratch_dir())
        )
        self._start()
        self._opening = self._request("open", self._backend_args)

    async def open(self) -> OpenOutcome:
        """Start (unless :meth:`start` has) and return the open request's answer: call it on
        the crawl's thread, once."""
        self.start()
        opening, self._opening = self._opening, None
        assert opening is not None, "open() twice"
        self._listen()
        try:
            return await opening
        except BaseException:
            self._stop_process()
            raise

    def _start(self) -> None:
        env = dict(os.environ)
        # the child must import this very copy of scrapy_ingest
        root = str(Path(scrapy_ingest.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        # the batch directory as an argument, not in a request: the child removes it if this
        # process dies without closing it, even before the child has read anything
        process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_ingest.backends._process", str(self._dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            # a session of its own: Ctrl-C in a terminal stops the crawl, which then closes
            # its writer in order, instead of killing the writer in the middle of a batch
            start_new_session=True,
        )
        self._process = process
        assert process.stdin is not None
        self._feed = _Feed(process.stdin)
        # a crawl that fails before its spider opens (another component's from_crawler
        # raising) neither opens nor discards this host: once the host is dropped, the
        # writer is told to exit and is waited for, its pipes closed
        self._finalizer = weakref.finalize(self, _abandon, process, self._feed)

    def _listen(self) -> None:
        """Read the current process's answers from now on (on the crawl's thread: they are
        passed to it)."""
        process = self._process
        if process is None or process is self._listening:
            return
        self._listening = process
        threading.Thread(
            target=self._read_answers,
            args=(process, thread_caller()),
            name="scrapy_ingest_answers",
            daemon=True,
        ).start()

    def discard(self) -> None:
        """Stop a writer process that :meth:`start` started and nobody opened: at the end of
        its stdin it removes the batch directory and exits. Call it on the crawl's thread."""
        if self._opening is None:
            return
        self._opening = None
        self._pending.clear()
        process = self._stop_process()
        if process is not None:
            in_thread(_reap, process)  # off the crawl's thread: nobody reads its answers

    async def close(self) -> None:
        if self._process is None:
            return
        self._closing = True
        try:
            await self._request("close", ())
        finally:
            process = self._stop_process()
            if process is not None:
                # the child exits right after answering "close"; wait for it off the
                # crawl's thread
                await in_thread(_wait, process)

    def _stop_process(self) -> subprocess.Popen[bytes] | None:
        process, self._process = self._process, None
        self._detach_finalizer()
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return process

    def _detach_finalizer(self) -> None:
        """The current process is stopped or gone: dropping this host no longer stops it."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    # requests (reactor thread)

    def store(self, table: TableSpec, batch: Batch) -> Future[WriteOutcome]:
        return self._request("store", (table, self._write_batch(batch), batch.payload is not None))

    async def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        return await self._request("insert_job", (table, dict(row)))  # type: ignore[no-any-return]

    async def recover(self) -> ReplayOutcome | None:
        return await self._request("recover", ())  # type: ignore[no-any-return]

    async def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        return await self._request(  # type: ignore[no-any-return]
            "mark_crashed", (table, stale_before, alive, crawl_id)
        )

    async def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        await self._request("update_job", (table, job_id, dict(values), unless_finished))

    def _write_batch(self, batch: Batch) -> str:
        assert self._dir is not None, "store() before open()"
        rows = pickle.dumps(batch.packed_rows, protocol=pickle.HIGHEST_PROTOCOL)
        path = self._dir / f"{next(self._sequence)}.batch"
        with path.open("wb") as file:
            file.write(HEADER.pack(len(rows)))
            file.write(rows)
            if batch.payload is not None:
                file.write(batch.payload)
        return str(path)

    def _request(self, operation: str, args: tuple[Any, ...]) -> Future[Any]:
        request = _Request(operation, args, Future())
        self._pending.append(request)
        self._send(request)
        return request.answer

    def _send(self, request: _Request) -> None:
        assert self._feed is not None
        # a write that fails (the writer died) is dropped: the answer reader sees the end of
        # the stream and starts the writer again, which is sent every unanswered request
        self._feed.send(frame((request.operation, request.args)))

    # answers

    def _read_answers(
        self, process: subprocess.Popen[bytes], call_from_thread: Callable[..., Any]
    ) -> None:
        """Thread: pass each answer of *process* to the crawl's thread.

        Without a reactor, the crawl's loop may close (``asyncio.run()`` returning) between
        the writer's last answer and the end of its stream, which this thread reads last:
        there is nobody left to tell then, and nothing to print."""
        assert process.stdout is not None

        def tell(fn: Callable[..., Any], *args: Any) -> bool:
            try:
                call_from_thread(fn, *args)
            except RuntimeError:  # the asyncio loop is closed: the crawl is over
                return False
            return True

        while True:
            try:
                message = receive(process.stdout)
            except (EOFError, OSError):
                _reap(process)  # it closed its end: it is exiting
                tell(self._exited, process)
                return
            if message[0] == "log":
                _, name, level, text = message
                logging.getLogger(name).log(level, "%s", text)
            elif message[0] == "stuck":
                if self._on_stuck is not None and not tell(self._on_stuck, message[1]):
                    return
            elif not tell(self._answered, message):
                return

    def _answered(self, message: tuple[Any, ...]) -> None:
        request = self._pending.popleft()
        if message[0] == "error":
            request.answer.set_exception(_rebuild(message[1], message[2]))
        else:
            request.answer.set_result(message[1])

    def _exited(self, process: subprocess.Popen[bytes]) -> None:
        if process is not self._process or (self._closing and not self._pending):
            return
        code = process.poll()
        if self._feed is not None:
            self._feed.abandon()  # what is queued for the dead writer goes to the next one
            self._feed = None
        self._detach_finalizer()
        if self._restarts >= _MAX_RESTARTS or self._closing:
            error = WriterProcessDied(
                f"the writer process for {self.url} exited (code {code}) "
                f"after {self._restarts} restarts"
            )
            self._stop_process()
            pending, self._pending = self._pending, deque()
            for request in pending:
                request.answer.set_exception(error)
            return
        self._restarts += 1
        logger.error(
            "The writer process for %s exited (code %s); starting it again and sending it "
            "the %d unanswered requests",
            self.url,
            code,
            len(self._pending),
        )
        pending, self._pending = self._pending, deque()
        self._start()
        self._listen()
        if not any(r.operation == "open" for r in pending):
            self._request("open", self._backend_args).add_done_callback(_log_reopen_failure)
        # a store's file is still there: the child removes it only once it has answered
        for request in pending:
            self._pending.append(request)
            self._send(request)


class _Feed:
    """Write requests to a writer process's stdin without ever blocking the crawl's thread.

    The writer reads a request only once it has answered the one before, so while it waits
    (for a lock, or for a database that is down, up to ``INGEST_RETRY_TIMEOUT``) its stdin, a
    pipe of 64 KiB (about 90 store requests), fills. The crawl's thread writes a request
    itself while the pipe has room: one non-blocking write, what the blocking one it replaces
    cost. What the pipe does not take waits here, in order, and a thread of the feed's own,
    started the first time, writes it as the writer reads. The queue needs no bound of its
    own: each store request in it names a batch whose rows count against the buffer budget
    until the batch is answered (see :class:`~scrapy_ingest.batching.BufferBudget`), so a
    full budget stops it growing; the other requests are a few per crawl and per heartbeat.
    """

    def __init__(self, stdin: IO[bytes]) -> None:
        self._stdin = stdin
        self._fd = stdin.fileno()
        os.set_blocking(self._fd, False)
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        #: what the pipe has not taken yet, in order (the first one maybe in part)
        self._backlog: deque[bytes | memoryview] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        #: the writer is gone: nothing more is written
        self._broken = False

    def send(self, data: bytes) -> None:
        """Write *data* to the pipe, or queue it if the pipe is full (crawl's thread)."""
        with self._lock:
            if self._broken or self._closing:
                return
            if not self._backlog:
                written = self._write(data)
                if written == len(data) or self._broken:
                    return
                self._backlog.append(memoryview(data)[written:])
            else:
                self._backlog.append(data)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._drain, name="scrapy_ingest_feed", daemon=True
                )
                self._thread.start()
            else:
                self._more.notify()

    def close(self) -> None:
        """Close the pipe once all that is queued is written: the writer exits at its end."""
        with self._lock:
            self._closing = True
            if self._thread is not None:
                self._more.notify()
                return  # the thread closes it
        self._close_pipe()

    def abandon(self) -> None:
        """The writer is gone: drop what is queued and close the pipe."""
        with self._lock:
            self._broken = True
            self._backlog.clear()
            if self._thread is not None:
                self._more.notify()
                return
        self._close_pipe()

    def _write(self, data: bytes | memoryview) -> int:
        """Write what the pipe takes of *data* now; how much it took (the lock is held)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # the writer is gone: its answer reader sees it and acts
            self._broken = True
            self._backlog.clear()
            return 0

    def _write_backlog(self) -> None:
        backlog = self._backlog
        while backlog:
            chunk = backlog[0]
            written = self._write(chunk)
            if self._broken:
                return
            if written < len(chunk):
                backlog[0] = memoryview(chunk)[written:]
                return
            backlog.popleft()

    def _drain(self) -> None:
        """Thread: write the backlog as the writer reads; close the pipe when done."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_WRITE)
            while True:
                with self._lock:
                    while not (self._backlog or self._closing or self._broken):
                        self._more.wait()
                    self._write_backlog()
                    if self._broken or not self._backlog:
                        if self._broken or self._closing:
                            break
                        continue
                # until the pipe has room, or the writer is gone (then the write fails); the
                # timeout only bounds how long an abandoned feed's thread lingers
                selector.select(1.0)
        self._close_pipe()

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError):  # the writer is gone
            self._stdin.close()


def _rebuild(name: str, text: str) -> Exception:
    cls = getattr(exceptions, name, None)
    if isinstance(cls, type) and issubclass(cls, IngestError):
        return cls(text)
    return IngestError(f"{name}: {text}")


def _scratch_dir() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for a writer whose stdin is closed (it exits at its end), then close its
    stdout: a pipe left for the garbage collector is a ResourceWarning in the crawl."""
    _wait(process)
    if process.stdout is not None:
        process.stdout.close()


def _abandon(process: subprocess.Popen[bytes], feed: _Feed) -> None:
    """A started host dropped without close() or discard(): close the writer's stdin (it
    removes its batch directory and exits at its end) and reap it, on the thread that dropped
    the host (or at the interpreter's exit): a writer never opened only waits on its stdin."""
    feed.close()
    _reap(process)


def _log_reopen_failure(reopen: Future[Any]) -> None:
    if reopen.exception() is not None:
        logger.error("Reopening failed: %s", reopen.exception())
