"""Run a backend in a writer process of its own.

Why a process: writer threads share the GIL with the reactor thread. While a
crawl keeps the reactor busy, every blocking call a writer thread makes (each
chunk of a ``COPY``) costs it up to a GIL switch interval to get back in, and
the PostgreSQL write path ran 3x slower in our measurements. A child process
has its own interpreter: the crawl process only pickles each batch into a
file and waits, off the reactor thread, for a short answer.

The parent side is :class:`ProcessHost`; the child runs :func:`main`
(``python -m scrapy_ingest.backends._process``). Messages are pickled and
length-prefixed, on the child's stdin (requests) and on a copy of its stdout
(answers, and log records, which the parent logs under the same logger
names). The child's own stdout is pointed at stderr so that nothing else can
write into the answer stream. It exits when its stdin closes, so a crawl
process that dies takes its writer with it.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import scrapy_ingest
from scrapy_ingest import exceptions
from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends.base import Batch
from scrapy_ingest.exceptions import BackendUnavailable, IngestError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from scrapy_ingest.backends.base import BackendHost, WriteOutcome
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_STOP_TIMEOUT = 30


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


class WriterProcessDied(BackendUnavailable):
    """The writer process exited while it had work."""


class ProcessHost:
    """The parent side: the same methods as LocalHost, carried out by a child process."""

    threads = 1

    def __init__(
        self, url: str, tables: Sequence[TableSpec], *, create_tables: bool, retry_timeout: float
    ) -> None:
        self.url = redact_url(url)
        self._init = (url, list(tables), create_tables, retry_timeout)
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._sequence = itertools.count()

    def open(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="scrapy_ingest_"))
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        # the child must import this very copy of scrapy_ingest
        root = str(Path(scrapy_ingest.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "scrapy_ingest.backends._process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._call("open", *self._init)

    def close(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            self._call("close")
        finally:
            self._process = None
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    def store(self, table: TableSpec, batch: Batch) -> WriteOutcome:
        try:
            return self._store(table, batch)
        except WriterProcessDied as exc:
            # the batch is still here: start a new writer and hand it over again
            logger.error("%s; starting a new writer process", exc)
            self._start()
            return self._store(table, batch)

    def _store(self, table: TableSpec, batch: Batch) -> WriteOutcome:
        assert self._dir is not None, "store() before open()"
        # a file, not the pipe: a few write calls, where a pipe would block every
        # 64 KiB; the JSON payload goes in as it is, only the small rows are pickled
        rows = pickle.dumps(batch.packed_rows, protocol=pickle.HIGHEST_PROTOCOL)
        path = self._dir / f"{next(self._sequence)}.batch"
        with path.open("wb") as file:
            file.write(_HEADER.pack(len(rows)))
            file.write(rows)
            if batch.payload is not None:
                file.write(batch.payload)
        outcome: WriteOutcome = self._call("store", table, str(path), batch.payload is not None)
        return outcome

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        inserted: bool = self._call("insert_job", table, dict(row))
        return inserted

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, only_running: bool
    ) -> None:
        self._call("update_job", table, job_id, dict(values), only_running)

    def _call(self, operation: str, *args: Any) -> Any:
        process = self._process
        if process is None:
            raise BackendUnavailable(f"the writer process for {self.url} is not running")
        assert process.stdin is not None and process.stdout is not None
        with self._lock:
            try:
                _send(process.stdin, (operation, args))
                while True:
                    message = _receive(process.stdout)
                    if message[0] != "log":
                        break
                    _, name, level, text = message
                    logging.getLogger(name).log(level, "%s", text)
            except (EOFError, BrokenPipeError, OSError):
                code = process.poll()
                raise WriterProcessDied(
                    f"the writer process for {self.url} exited (code {code})"
                ) from None
        if message[0] == "error":
            raise _rebuild(message[1], message[2])
        return message[1]


def _rebuild(name: str, text: str) -> Exception:
    cls = getattr(exceptions, name, None)
    if isinstance(cls, type) and issubclass(cls, IngestError):
        return cls(text)
    return IngestError(f"{name}: {text}")


# the child


class _ForwardHandler(logging.Handler):
    def __init__(self, reply: Any) -> None:
        super().__init__(logging.INFO)
        self._reply = reply

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
        self._reply(("log", record.name, record.levelno, text))


def main() -> None:
    """Serve one backend until stdin closes."""
    from scrapy_ingest.backends import local_host

    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    lock = threading.Lock()

    def reply(message: Any) -> None:
        with lock:
            _send(answers, message)

    logging.getLogger().addHandler(_ForwardHandler(reply))
    logging.getLogger().setLevel(logging.INFO)
    host: BackendHost | None = None
    while True:
        try:
            operation, args = _receive(requests)
        except EOFError:
            break
        try:
            if operation == "open":
                url, tables, create_tables, retry_timeout = args
                host = local_host(url, tables, create_tables=create_tables, retry_timeout=retry_timeout)
                host.open()
                result: Any = None
            else:
                assert host is not None, f"{operation} before open"
                result = _serve(host, operation, args)
        except Exception as exc:
            reply(("error", type(exc).__name__, str(exc)))
            continue
        reply(("ok", result))
        if operation == "close":
            break


def _serve(host: BackendHost, operation: str, args: tuple[Any, ...]) -> Any:
    if operation == "store":
        table, path, packed = args
        data = Path(path).read_bytes()
        os.unlink(path)
        (size,) = _HEADER.unpack_from(data)
        end = _HEADER.size + size
        rows = pickle.loads(data[_HEADER.size : end])
        return host.store(table, Batch(rows, data[end:] if packed else None))
    if operation == "insert_job":
        return host.insert_job(*args)
    if operation == "update_job":
        table, job_id, values, only_running = args
        return host.update_job(table, job_id, values, only_running=only_running)
    if operation == "close":
        return host.close()
    raise ValueError(f"unknown operation {operation!r}")


if __name__ == "__main__":
    main()
