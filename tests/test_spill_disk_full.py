"""A full disk under the spill journal: nothing is lost without being counted, said and failed.

Each test mounts a 2 MB tmpfs as the spill directory (root only: a missing mount skips
locally and fails in CI, like a missing service) and runs a crawl into a real PostgreSQL of its
own that it stops mid-crawl (or before it), then starts again and runs ``scrapy ingest replay``.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import Crawl, CrawlResult, Database, engine_paused, errors, wait_for
from conftest import service_missing
from test_spill import PASSWORD, crawl_args, replay, stored_ids

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres]

#: the size of the tmpfs under the journal: about 11,000 items of the test spider
DISK = "2m"
#: items stored before the database is stopped: the crawl is well under way
STORED_BEFORE_STOP = 2000
#: the rows the runtime counts as lost, by kind
KINDS = ("items", "requests", "logs", "dead_letters")


@pytest.fixture
def server() -> Iterator[tuple[services.LocalPostgres, str]]:
    """A PostgreSQL of this test's own, which it may stop and start; and a database URL."""
    with ExitStack() as stack:
        try:
            yield services.own_postgres(stack, PASSWORD)
        except services.ServiceUnavailable as exc:
            service_missing(str(exc))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path / "spill"`` (the spill directory of ``crawl_args``) on a 2 MB tmpfs."""
    spill = tmp_path / "spill"
    spill.mkdir()
    if os.geteuid() != 0:
        service_missing("mounting a tmpfs for the spill journal needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(spill)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        service_missing(f"cannot mount a tmpfs on {spill}: {mounted.stderr.strip()}")
    try:
        yield spill
    finally:
        if subprocess.run(["umount", str(spill)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(spill)], check=False)  # busy: detach it


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill *disk* with a file, then give back *leave* bytes of it."""
    filler = disk / "filler"
    chunk = bytes(64 * 1024)
    with open(filler, "wb") as file:
        try:
            while True:
                file.write(chunk)
                file.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def journal_files(disk: Path) -> list[str]:
    """The files in the journal but its DATABASE marker (temporary ones and RESERVE too)."""
    return sorted(p.name for p in disk.rglob("*") if p.is_file() and p.name != "DATABASE")


def stop_when_stored(local: services.LocalPostgres, url: str, crawl: Crawl) -> None:
    """Stop the database once the crawl has stored some items."""
    db = Database(url)
    wait_for(
        lambda: (
            not crawl.running
            or (db.table_exists("ingest_items") and db.count("ingest_items") >= STORED_BEFORE_STOP)
        ),
        timeout=60,
        interval=0.1,
        what=f"{STORED_BEFORE_STOP} items stored",
    )
    assert crawl.running, "the crawl ended before the database stopped"
    local.pause()


def replay_all(url: str, tmp_path: Path) -> tuple[list[Any], dict[str, Any]]:
    """Run ``scrapy ingest replay`` once the database is back; return the stored item ids (none
    stored twice) and the crawl's one job row."""
    answer = replay(url, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    ids = stored_ids(url)
    assert len(ids) == len(set(ids)), "an item was stored twice"
    [job] = Database(url).jobs()
    return ids, job


def lost(result: CrawlResult) -> dict[str, int]:
    return {k: n for k in KINDS if (n := result.stats.get(f"ingest/{k}/lost", 0))}


def disk_full_args(
    site: LocalSite, url: str, tmp_path: Path, pages: int = 250, **settings: Any
) -> dict[str, Any]:
    """*pages* pages of 100 items, slow enough that the crawl runs on once the database stops,
    and more than the disk takes."""
    args = crawl_args(site, url, tmp_path, **{"INGEST_RETRY_TIMEOUT": 2, **settings})
    args.update(pages=pages, per_page=100, delay_ms=100)
    return args


def test_a_full_disk_with_the_database_down_fails_the_crawl_and_counts_every_row_lost(
    site: LocalSite,
    server: tuple[services.LocalPostgres, str],
    small_disk: Path,
    tmp_path: Path,
) -> None:
    local, url = server
    args = disk_full_args(site, url, tmp_path, INGEST_SPILL_MIN_FREE_BYTES=0)
    crawl = Crawl(args, tmp_path / "crawl")
    try:
        stop_when_stored(local, url, crawl)
        result = crawl.wait(timeout=120)
    finally:
        crawl.kill()
    stats = result.stats
    assert result.returncode != 0, result.describe()
    assert stats["finish_reason"] == "ingest_spill_failed", result.describe()
    lost_rows = lost(result)
    assert lost_rows.get("items", 0) > 0, result.describe()
    assert "No space left on device" in result.output
    last_error = errors(result)[-1]
    assert f"{sum(lost_rows.values())} rows could not be kept" in last_error, last_error
    assert f"items {lost_rows['items']}" in last_error, last_error

    local.resume()
    ids, job = replay_all(url, tmp_path)
    assert len(ids) + lost_rows["items"] == stats["item_scraped_count"], (len(ids), stats)
    assert (job["status"], job["close_reason"]) == ("finished", "ingest_spill_failed"), job
    assert job["stats"]["ingest/items/lost"] == lost_rows["items"], job["stats"]
    assert journal_files(small_disk) == []  # no temporary file, no RESERVE


def test_the_free_space_guard_closes_the_crawl_before_the_disk_is_full(
    site: LocalSite,
    server: tuple[services.LocalPostgres, str],
    small_disk: Path,
    tmp_path: Path,
) -> None:
    local, url = server
    # INGEST_SPILL_MIN_FREE_BYTES at its default, 256 MiB: 4 times the buffer's default, 64 MiB.
    # On this 2 MB disk, the buffer must be smaller than what is left, as the default is on a
    # real disk: what the crawl holds when the guard fires still fits
    args = disk_full_args(
        site, url, tmp_path, INGEST_MAX_BUFFER_BYTES=1024 * 1024, INGEST_BATCH_BYTES=256 * 1024
    )
    crawl = Crawl(args, tmp_path / "crawl")
    try:
        stop_when_stored(local, url, crawl)
        result = crawl.wait(timeout=120)
    finally:
        crawl.kill()
    stats = result.stats
    assert result.returncode == 0, result.describe()
    assert stats["finish_reason"] == "ingest_spill_full", result.describe()
    assert lost(result) == {}, result.describe()
    assert stats["ingest/items/spilled"] > 0, result.describe()
    assert "INGEST_SPILL_MIN_FREE_BYTES" in result.output

    local.resume()
    ids, job = replay_all(url, tmp_path)
    assert len(ids) == stats["item_scraped_count"], (len(ids), stats)
    assert (job["status"], job["close_reason"]) == ("finished", "ingest_spill_full"), job
    assert journal_files(small_disk) == []


@pytest.mark.parametrize("back", ["database", "database and disk"])
def test_rows_wait_while_neither_takes_them_and_the_crawl_goes_on_when_one_does_again(
    back: str,
    site: LocalSite,
    server: tuple[services.LocalPostgres, str],
    small_disk: Path,
    tmp_path: Path,
) -> None:
    # What comes back while the rows wait: the database alone (the disk stays full: the rows
    # go to the database, whose pool is renewed at once rather than at psycopg_pool's next
    # reconnection, 1, 2, 4, 8, 16 s apart), or the disk too (the filler goes)
    local, url = server
    filler = fill(small_disk, leave=100_000)
    args = disk_full_args(
        site,
        url,
        tmp_path,
        pages=100,
        INGEST_SPILL_MIN_FREE_BYTES=0,
        INGEST_RETRY_TIMEOUT=4,
        CONCURRENT_REQUESTS=4,
    )
    args.update(delay_ms=800)  # 5 pages/s: 20 s, still running once the rows are stuck
    pauses = tmp_path / "pauses.txt"
    args["settings"].update(
        EXTENSIONS={"_crawl_script.PauseRecorder": 0}, TEST_PAUSES_FILE=str(pauses)
    )
    crawl = Crawl(args, tmp_path / "crawl")
    try:
        stop_when_stored(local, url, crawl)
        # the rows wait, and the crawl with them: its engine is paused while they are stuck
        wait_for(
            lambda: (
                not crawl.running
                or ("Neither the database" in crawl.log_path.read_text() and engine_paused(pauses))
            ),
            timeout=60,
            interval=0.1,
            what="the rows stuck and the crawl's engine paused",
        )
        assert crawl.running, "the crawl did not wait for its rows"
        if "disk" in back:
            filler.unlink()
        local.resume()
        result = crawl.wait(timeout=120)
    finally:
        crawl.kill()
    stats = result.stats
    assert result.returncode == 0, result.describe()
    assert stats["finish_reason"] == "finished", result.describe()
    assert lost(result) == {}, result.describe()
    assert stats["ingest/buffer/pauses"] >= 1, result.describe()  # the engine was held
    assert stats["item_scraped_count"] == 10_000, result.describe()

    ids, job = replay_all(url, tmp_path)  # what was spilled, if the crawl did not replay it
    assert len(ids) == stats["item_scraped_count"], (len(ids), stats)
    assert (job["status"], job["close_reason"]) == ("finished", "finished"), job
    assert [name for name in journal_files(small_disk) if name != filler.name] == []


def test_with_durable_on_a_full_disk_no_item_is_acknowledged_unless_kept(
    site: LocalSite,
    server: tuple[services.LocalPostgres, str],
    small_disk: Path,
    tmp_path: Path,
) -> None:
    local, url = server
    filler = fill(small_disk, leave=400_000)  # a few batches fit, then the disk is full
    acked = tmp_path / "acked.txt"
    args = crawl_args(
        site,
        url,
        tmp_path,
        INGEST_DURABLE=True,
        INGEST_RETRY_TIMEOUT=2,
        INGEST_SPILL_MIN_FREE_BYTES=0,
        ITEM_PIPELINES={"_crawl_script.AckedItemsPipeline": 950},
        TEST_ACKED_FILE=str(acked),
    )
    args.update(pages=100, per_page=100, delay_ms=20)
    local.pause()
    crawl = Crawl(args, tmp_path / "crawl")
    try:
        result = crawl.wait(timeout=120)
    finally:
        crawl.kill()
    stats = result.stats
    assert result.returncode != 0, result.describe()
    assert stats.get("item_dropped_count", 0) > 0, result.describe()  # the disk was full
    assert lost(result).get("items", 0) > 0, result.describe()
    returned = {int(line) for line in acked.read_text().splitlines() if line.strip()}
    assert len(returned) == stats.get("item_scraped_count", 0), result.describe()

    filler.unlink()
    local.resume()
    answer = replay(url, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    stored = {idx for (idx,) in Database(url).query("SELECT (data->>'idx')::int FROM ingest_items")}
    assert returned <= stored, sorted(returned - stored)[:20]


@pytest.mark.exclusive
def test_a_database_back_after_a_long_outage_is_written_to_at_once(
    server: tuple[services.LocalPostgres, str], caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg_pool reconnects with a backoff of its own (attempts about 1, 3, 7, 15, 31 s after
    the connection broke): a database back at 16 s would get its next connection at 31 s, long
    after the rows waiting for it were given up on (``LocalHost._keep``). The backend renews its
    pool as soon as a connection of its own goes through: the write after the one that found
    the database back goes through (measured: 1 failed write; without the renewal, 6 failed
    writes and 13.5 s)."""
    from scrapy_ingest.backends import make_backend
    from scrapy_ingest.schema import all_tables

    local, url = server
    tables = all_tables("ingest_")
    jobs = next(t for t in tables if t.kind == "jobs")
    backend = make_backend(url, tables, create_tables=True)
    backend.open()

    def insert(job_id: str) -> Exception | None:
        now = time.time()
        row = {
            "job_id": job_id,
            "crawl_id": "c",
            "spider": "s",
            "hostname": "h",
            "pid": 1,
            "status": "running",
            "started_at": now,
            "updated_at": now,
            "items_count": 0,
        }
        try:
            backend.insert_job(jobs, row)
        except Exception as exc:
            backend.classify(exc)  # what the writer asks of every failure
            return exc
        return None

    caplog.set_level(logging.INFO, logger="scrapy_ingest.backends.postgres")
    try:
        local.pause()
        broken = time.monotonic()
        # a writer retrying through the outage; its length is what is under test: psycopg_pool's
        # backoff grows with it, and at 16 s its next attempt is some 15 s away
        while time.monotonic() - broken < 16:
            assert insert("during") is not None
            time.sleep(0.5)
        local.resume()
        # the first write finds the pool without a connection and the server answering: it
        # renews the pool (and fails, as transient); the next one goes through
        failed: list[Exception] = []
        while (error := insert("after")) is not None:
            failed.append(error)
            # at once: not at psycopg_pool's next attempt, some 6 writes away
            assert len(failed) <= 2, f"{len(failed)} writes failed after the restart: {error}"
            time.sleep(0.25)
    finally:
        backend.close()
    assert Database(url).query("SELECT job_id FROM ingest_jobs") == [("after",)]
    renewed = [r for r in caplog.records if "its connection pool is renewed" in r.getMessage()]
    assert failed and renewed, (failed, caplog.text)  # the renewal brought the connection
