"""The writer process: a backend served in a child process of the crawl.

The parent side is :class:`scrapy_ingest.hosting.ProcessHost`, which says why.
The child runs :func:`main` (``python -m scrapy_ingest.backends._process BATCH_DIR``)
and imports neither Scrapy nor Twisted. Messages are pickled and
length-prefixed: requests on the child's stdin, answers (and log records,
which the parent logs under the same logger names) on a copy of its stdout.
The child's own stdout is pointed at stderr so that nothing else can write
into the answer stream. A batch comes as a file: pickled rows, then the JSON
payload as it is; the child removes it once it has answered for the batch. The child
answers requests in order, and exits when its stdin closes, so a crawl process
that dies takes its writer with it, or right after answering ``close``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import pickle
import shutil
import struct
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from scrapy_ingest._shapes import Batch

if TYPE_CHECKING:
    from scrapy_ingest.backends._local import LocalHost

HEADER = struct.Struct(">I")

#: glibc's mallopt parameters (malloc.h), and what the writer sets them to
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest
TRIM_THRESHOLD = 64 * 1024 * 1024


def frame(message: Any) -> bytes:
    """A message as it travels: length, then pickle."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _send(stream: IO[bytes], message: Any) -> None:
    stream.write(frame(message))
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """Read one message; raise EOFError at the end of the stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError
    (size,) = HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


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

    # while the backend and its driver (SQLAlchemy, psycopg) are imported, the garbage
    # collector runs for nothing: importing makes many objects and little garbage, and the
    # collections cost the writer's start-up about 15% of its CPU time
    gc.disable()
    _keep_freed_memory()

    parent = os.getppid()  # if it changes, the crawl process is gone: stop retrying
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    lock = threading.Lock()

    def reply(message: Any) -> None:
        with lock:
            _send(answers, message)

    logging.getLogger().addHandler(_ForwardHandler(reply))
    logging.getLogger().setLevel(logging.INFO)
    host: LocalHost | None = None
    # the batch directory of the crawl process, to remove if it dies without closing us
    scratch = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        while True:
            operation, args = receive(requests)
            try:
                if operation == "open":
                    url, tables, create_tables, retry_timeout, spill_dir, require, min_free = args
                    # kept even if opening fails: its next operation opens it again
                    host = local_host(
                        url,
                        tables,
                        create_tables=create_tables,
                        retry_timeout=retry_timeout,
                        abort=lambda: os.getppid() != parent,
                        spill_dir=spill_dir,
                        require_backend=require,
                        spill_min_free=min_free,
                        on_stuck=lambda stuck: reply(("stuck", stuck)),
                    )
                    if not gc.isenabled():  # imported: what it made stays, collected no more
                        gc.freeze()
                        gc.enable()
                    result: Any = host.open()
                else:
                    assert host is not None, f"{operation} before open"
                    result = _serve(host, operation, args)
            except Exception as exc:
                reply(("error", type(exc).__name__, str(exc)))
            else:
                reply(("ok", result))
                if operation == "close":
                    _exit_now()
            if operation == "store":
                # the crawl process keeps no copy of the batch and sends this file again to the
                # next writer if this one dies before its answer is out: removed only now
                Path(args[1]).unlink(missing_ok=True)
    except (EOFError, BrokenPipeError):
        # the crawl process is gone without closing us: remove its batch files, which
        # would otherwise stay in memory (/dev/shm) until the machine restarts
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        os._exit(0)  # nobody is left to read what exiting normally would flush


def _keep_freed_memory() -> None:
    """Have malloc keep the memory of a batch once it is freed, for the next batch.

    Every batch makes a few buffers of a megabyte or more (the file read, the rows' text, the
    ``COPY`` block). glibc's malloc gave each back to the kernel when it was freed (``munmap``,
    or trimming the heap) and took fresh pages for the next batch: about 800 page faults a batch,
    40,000 in the 100,000-item benchmark crawl, half of the writer's system time. Taken from the
    heap and kept, the pages are reused. The writer's memory then stays at its peak, a few
    batches, rather than falling back between batches. Other C libraries are left as they are.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load (Windows), not glibc
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def _exit_now() -> None:
    """Exit once the backend is closed and its answer sent, without the interpreter's
    teardown: freeing every module and object (SQLAlchemy's, a driver's) took longer than
    the whole close, and the crawl process waits for this process to end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _serve(host: LocalHost, operation: str, args: tuple[Any, ...]) -> Any:
    if operation == "store":
        table, path, packed = args
        data = Path(path).read_bytes()
        (size,) = HEADER.unpack_from(data)
        end = HEADER.size + size
        rows = pickle.loads(data[HEADER.size : end])
        return host.store(table, Batch(rows, memoryview(data)[end:] if packed else None))
    if operation == "insert_job":
        return host.insert_job(*args)
    if operation == "update_job":
        table, job_id, values, unless_finished = args
        return host.update_job(table, job_id, values, unless_finished=unless_finished)
    if operation == "recover":
        return host.recover()
    if operation == "mark_crashed":
        return host.mark_crashed(*args)
    if operation == "close":
        return host.close()
    raise ValueError(f"unknown operation {operation!r}")


if __name__ == "__main__":
    main()
