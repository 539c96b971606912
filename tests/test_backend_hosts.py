"""Writes that fail and are tried again: real outages, duplicate batches, a dying writer process."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from _helpers import REPO_DIR, Crawl, Database, item_row, last_json, run_python, wait_for

from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import Batch, LocalHost, local_host
from scrapy_ingest.hosting import _scratch_dir
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from services import LocalSite

TABLES = all_tables("ingest_")
ITEMS = next(t for t in TABLES if t.kind == "items")


def make_rows(count: int, start: int = 0) -> list[tuple[Any, ...]]:
    encoder, ids = RecordEncoder(), IdFactory()
    rows = []
    for i in range(start, start + count):
        now = time.time()
        data = encoder.encode({"n": i, "title": f"item {i}"})
        rows.append(item_row(ids(now), "job", "spider", "dict", f"http://127.0.0.1/{i}", now, data))
    return rows


def opened(url: str) -> LocalHost:
    host = local_host(url, TABLES, create_tables=True, retry_timeout=30)
    host.open()
    return host


def stored_numbers(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT (data->>'n')::int FROM ingest_items ORDER BY 1")]


@pytest.mark.parametrize("payload_type", [bytes, bytearray, memoryview])
@pytest.mark.parametrize(
    "texts",
    [
        ['{"n":1}', "{}", '{"title":"a \\"quoted\\" \\\\ title"}'],
        # non-ASCII text: byte offsets are no longer character offsets
        ['{"n":1}', '{"title":"Zo\u00eb \u2603 \U0001f600"}', "{}", '{"t":"\u00e9"}'],
    ],
    ids=["ascii", "utf-8"],
)
def test_a_batchs_json_is_cut_out_of_its_payload_as_bytes_or_text(
    payload_type: type, texts: list[str]
) -> None:
    # packed as BatchWriter packs them: the payload holds the JSON, each row its end offset
    payload, packed = bytearray(), []
    for n, text in enumerate(texts):
        payload += text.encode()
        packed.append((n, f"row {n}", len(payload)))
    batch = Batch(packed, payload_type(payload))
    assert batch.rows() == [(n, f"row {n}", t.encode()) for n, t in enumerate(texts)]
    assert batch.rows(text=True) == [(n, f"row {n}", t) for n, t in enumerate(texts)]
    rows = [(1, b"{}")]
    assert Batch(rows).rows() is rows  # not packed: the rows as they are


@pytest.mark.postgres
def test_a_dropped_connection_is_retried_and_nothing_is_stored_twice(pg_url: str) -> None:
    host = opened(pg_url)
    try:
        assert host.store(ITEMS, Batch(make_rows(100))).written == 100
        # the server drops every connection of the writer, as in a restart or failover
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        outcome = host.store(ITEMS, Batch(make_rows(100, start=100)))
    finally:
        host.close()
    assert outcome.written == 100
    assert outcome.retries >= 1
    assert outcome.lost == 0
    assert stored_numbers(pg_url) == list(range(200))


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_a_batch_written_twice_is_stored_once(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    rows = make_rows(50)
    host = opened(url)
    try:
        assert host.store(ITEMS, Batch(rows)).written == 50
        again = host.store(ITEMS, Batch(rows))
        assert again.dead == []
        assert again.lost == 0
    finally:
        host.close()
    if database == "postgres":
        assert stored_numbers(url) == list(range(50))
    else:
        import sqlite3

        path = url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            numbers = [
                r[0]
                for r in conn.execute(
                    "SELECT json_extract(data, '$.n') FROM ingest_items ORDER BY 1"
                )
            ]
        assert numbers == list(range(50))


#: the start of every ProcessHost script: imports, and a host opened on the test database
_HOST_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import psycopg
    from twisted.internet import defer, task
    from scrapy_ingest.backends import Batch
    from scrapy_ingest.hosting import ProcessHost
    from scrapy_ingest.schema import all_tables
    sys.path.insert(0, {tests!r})
    from test_backend_hosts import make_rows

    async def opened_host():
        tables = all_tables("ingest_")
        items = next(t for t in tables if t.kind == "items")
        host = ProcessHost({url!r}, tables, create_tables=True, retry_timeout=30)
        await host.open()
        return host, items
    """
)

_WRITER_DIES = textwrap.dedent(
    """
    async def main(reactor):
        host, items = await opened_host()
        first = await host.store(items, Batch(make_rows(100)))
        os.kill(host._process.pid, signal.SIGKILL)
        # handed over while the writer is dead or dying: sent again to its successor
        second = await host.store(items, Batch(make_rows(100, start=100)))
        await host.close()
        print(json.dumps([first.written, second.written]))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def _run_host_script(body: str, pg_url: str) -> tuple[Any, str]:
    """Run _HOST_SCRIPT and *body* in a process of its own: what it printed last, its stderr."""
    script = (_HOST_SCRIPT + body).format(tests=str(REPO_DIR / "tests"), url=pg_url)
    done = run_python(script, cwd=REPO_DIR)
    return last_json(done), done.stderr


@pytest.mark.postgres
def test_a_writer_process_that_dies_is_replaced_and_loses_nothing(pg_url: str) -> None:
    written, stderr = _run_host_script(_WRITER_DIES, pg_url)
    assert written == [100, 100]
    assert "starting it again" in stderr
    assert stored_numbers(pg_url) == list(range(200))


_WRITER_DIES_WHILE_STORING = textwrap.dedent(
    """
    async def main(reactor):
        host, items = await opened_host()
        with psycopg.connect({url!r}) as lock:
            # the writer's COPY waits for this lock: it has read the batch's file, not stored it
            lock.execute("LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE")
            stored = host.store(items, Batch(make_rows(100)))
            deadline = time.monotonic() + 30
            while not lock.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the writer never waited for the lock"
                time.sleep(0.05)
            os.kill(host._process.pid, signal.SIGKILL)
        # the lock is released; the batch is handed to the next writer from the same file
        outcome = await stored
        # answered in order: once a later request is answered, the batch's file has gone
        await host.recover()
        left = os.listdir(host._dir)
        await host.close()
        print(json.dumps([outcome.written, left]))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


@pytest.mark.postgres
def test_a_writer_process_that_dies_while_storing_a_batch_loses_none_of_it(pg_url: str) -> None:
    # the crawl process keeps no copy of a batch it handed over: its file must outlive the writer
    (written, left), stderr = _run_host_script(_WRITER_DIES_WHILE_STORING, pg_url)
    assert written == 100
    assert left == []
    assert "starting it again" in stderr
    assert stored_numbers(pg_url) == list(range(100))


def _writer_dirs(pid: int) -> set[Path]:
    """The batch directories of the writers of the crawl process *pid* (not of other crawls
    that may run on the machine at the same time)."""
    return set(Path(_scratch_dir() or tempfile.gettempdir()).glob(f"scrapy_ingest_{pid}_*"))


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


@pytest.mark.postgres
def test_a_killed_crawl_leaves_no_writer_process_nor_batch_files(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    crawl = Crawl(
        {
            "base_url": site.base_url,
            "pages": 40,
            "per_page": 5,
            "delay_ms": 200,
            "settings": {"INGEST_DATABASE_URL": pg_url, "CONCURRENT_REQUESTS": 1},
        },
        tmp_path,
    )
    try:
        writers = wait_for(lambda: _children(crawl.process.pid), timeout=30, what="a writer")
        new = wait_for(lambda: _writer_dirs(crawl.process.pid), timeout=30, what="its batch dir")
        crawl.process.send_signal(signal.SIGKILL)  # no chance to close anything
        crawl.process.wait()
        wait_for(
            lambda: not any(d.exists() for d in new), timeout=30, what=f"the batch dirs {new} to go"
        )
        for pid in writers:
            wait_for(
                lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid),
                timeout=30,
                what=f"writer {pid} to exit",
            )
    finally:
        crawl.kill()


def test_a_writer_whose_crawl_dies_before_any_request_removes_the_batch_dir(
    tmp_path: Path,
) -> None:
    # the crawl process can die between starting its writer and sending it the first request
    batches = tmp_path / "scrapy_ingest_batches"
    batches.mkdir()
    (batches / "0.batch").write_bytes(b"")
    writer = subprocess.Popen(
        [sys.executable, "-m", "scrapy_ingest.backends._process", str(batches)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=REPO_DIR,
    )
    assert writer.stdin is not None
    writer.stdin.close()  # what the crawl process's death does to the writer's stdin
    assert writer.wait(timeout=60) == 0
    assert not batches.exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.postgres
def test_a_host_whose_open_failed_opens_at_its_next_write(pg_url: str) -> None:
    # what a writer process restarted during an outage does once the database is back
    host = local_host(pg_url, TABLES, create_tables=True, retry_timeout=30)
    try:
        outcome = host.store(ITEMS, Batch(make_rows(10)))
    finally:
        host.close()
    assert outcome.written == 10
    assert stored_numbers(pg_url) == list(range(10))


def test_one_outage_costs_the_retry_timeout_once_not_once_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a port where nothing listens: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://postgres:secret@127.0.0.1:{port}/nothing"
    host = local_host(url, TABLES, create_tables=True, retry_timeout=1.0)
    started = time.monotonic()
    first = host.store(ITEMS, Batch(make_rows(5)))
    first_took = time.monotonic() - started
    first_waits = _retry_waits(caplog)
    second = host.store(ITEMS, Batch(make_rows(5, start=5)))
    assert (first.lost, second.lost) == (5, 5)
    # the first batch waits out the retry timeout (a lower bound: load only makes it longer)
    assert first_waits and first_took >= 0.5, (first_waits, first_took)
    # every wait of both batches falls within the one outage's retry timeout, from its start
    assert sum(_retry_waits(caplog)) <= 1.0, _retry_waits(caplog)


def _retry_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits of the 'failed (...); retrying in N s' warnings logged so far."""
    return [
        float(m[1])
        for r in caplog.records
        if (m := re.search(r"; retrying in ([0-9.]+) s", r.getMessage()))
    ]


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_a_job_insert_tried_again_finds_its_own_row_but_refuses_another_crawls(
    database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    jobs = next(t for t in TABLES if t.kind == "jobs")
    now = time.time()
    row = {
        "job_id": "nightly",
        "crawl_id": "nightly",
        "spider": "s",
        "hostname": "h",
        "pid": 42,
        "status": "running",
        "started_at": now,
        "updated_at": now,
        "items_count": 0,
    }
    host = opened(url)
    try:
        assert host.insert_job(jobs, row) is True
        # the same insert again, as after a lost answer: its own row, no conflict
        assert host.insert_job(jobs, row) is True
        # another crawl with the same job id: refused
        assert host.insert_job(jobs, {**row, "pid": 43, "started_at": now + 5}) is False
    finally:
        host.close()


def test_many_openers_of_one_new_sqlite_file_all_succeed(tmp_path: Path) -> None:
    # crawlers starting at once on one file (two crawlers of one process, say): switching a new
    # file to WAL, and preparing the tables (a read, then writes), must wait for each other,
    # not fail with "database is locked"
    for attempt in range(20):
        url = f"sqlite:///{tmp_path / f'race-{attempt}.sqlite3'}"
        hosts = [local_host(url, TABLES, create_tables=True, retry_timeout=0) for _ in range(6)]
        errors = _open_at_once(hosts)
        for host in hosts:
            host.close()
        assert errors == [], errors


def _open_at_once(hosts: list[LocalHost]) -> list[BaseException]:
    barrier = threading.Barrier(len(hosts))
    errors: list[BaseException] = []

    def open_host(host: LocalHost) -> None:
        barrier.wait()
        try:
            host.open()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_host, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _job_row(job_id: str, updated_at: float) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "crawl_id": "c",
        "spider": "s",
        "hostname": "h",
        "pid": 42,
        "status": "running",
        "started_at": updated_at - 60,
        "updated_at": updated_at,
        "items_count": 0,
    }


@pytest.mark.parametrize("database", ["postgres", "sqlite", "mysql"])
def test_running_jobs_not_refreshed_in_time_are_marked_crashed(
    database: str, request: pytest.FixtureRequest
) -> None:
    fixture = {"postgres": "pg_url", "sqlite": "sqlite_url", "mysql": "mysql_url"}[database]
    url = request.getfixturevalue(fixture)
    jobs = next(t for t in TABLES if t.kind == "jobs")
    now = time.time()
    host = opened(url)
    try:
        host.insert_job(jobs, _job_row("stale", now - 100))
        host.insert_job(jobs, _job_row("fresh", now - 1))
        host.insert_job(jobs, {**_job_row("done", now - 100), "status": "finished"})
        host.insert_job(jobs, _job_row("mine", now - 100))  # the crawl asking: alive
        host.insert_job(jobs, _job_row("late", now - 100))
        host.insert_job(jobs, {**_job_row("other", now - 100), "crawl_id": "other crawl"})
        # at a heartbeat: only the jobs of the crawl asking
        assert sorted(host.mark_crashed(jobs, now - 30, "mine", "c")) == ["late", "stale"]
        assert host.mark_crashed(jobs, now - 30, "mine") == ["other"]  # at start: every crawl's
        assert host.mark_crashed(jobs, now - 30, "mine") == []  # once
        # a heartbeat of a crawl taken for crashed revives its row; a closed row stays closed
        alive = {"status": "running", "close_reason": None, "finished_at": None}
        for job_id in ("late", "done"):
            host.update_job(jobs, job_id, {**alive, "updated_at": now}, unless_finished=True)
    finally:
        host.close()
    rows = {
        job_id: (status, reason, finished_at is None)
        for job_id, status, reason, finished_at in Database(url).query(
            "SELECT job_id, status, close_reason, finished_at FROM ingest_jobs"
        )
    }
    assert rows == {
        "stale": ("crashed", "crashed", False),
        "fresh": ("running", None, True),
        "done": ("finished", None, True),
        "mine": ("running", None, True),
        "late": ("running", None, True),
        "other": ("crashed", "crashed", False),
    }
