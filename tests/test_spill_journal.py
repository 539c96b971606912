"""The spill journal belongs to the database, not to its password, and any number of processes
may replay it at once: against a real PostgreSQL, through the real `scrapy ingest replay` and
real crawls."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import REPO_DIR, Crawl, Database, ingest_replay, item_row, job_row, password_role

from scrapy_ingest._redact import redact_url
from scrapy_ingest.schema import table_spec
from scrapy_ingest.spill import SpillJournal, database_identity, journal_dir

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.postgres]

ITEMS = table_spec("items", "ingest_")
JOBS = table_spec("jobs", "ingest_")


def _with_password(url: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    userinfo, _, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{password}@{host}"


def _spill(journal: SpillJournal, batches: int, rows: int, job_id: str) -> set[int]:
    """Spill *batches* batches of *rows* items of job *job_id*; return their ids."""
    ids: set[int] = set()
    for _ in range(batches):
        batch = []
        for n in range(rows):
            row_id = uuid.uuid4().int
            ids.add(row_id)
            batch.append(item_row(row_id, job_id, "spilled", "dict", None, 1.7e9, b'{"n": %d}' % n))
        journal.spill(ITEMS, batch)
    journal.save_job(JOBS, job_id, job_row(job_id))
    return ids


def _stored(url: str) -> list[Any]:
    return [row[0] for row in Database(url).query("SELECT id FROM ingest_items")]


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("postgresql://u:wrong@DB:5432/shop", "postgresql://u:right@db:5432/shop"),
        ("postgres://u:p@db:5432/shop", "postgresql+psycopg://other@db:5432/shop?sslmode=x"),
        ("mysql+pymysql://u:p@db/shop", "mariadb://u:q@db/shop"),
        ("sqlite:///data/ingest.sqlite3", "sqlite:///data/ingest.sqlite3"),
    ],
)
def test_one_database_one_journal(tmp_path: Path, one: str, other: str) -> None:
    assert journal_dir(tmp_path, one) == journal_dir(tmp_path, other)
    assert database_identity(redact_url(one)) == database_identity(one)


@pytest.mark.parametrize(
    "other",
    [
        "postgresql://u:p@db:5433/shop",  # another port
        "postgresql://u:p@db2:5432/shop",  # another host
        "postgresql://u:p@db:5432/shop2",  # another database
        "mysql://u:p@db:5432/shop",  # another kind of server
    ],
)
def test_other_databases_other_journals(tmp_path: Path, other: str) -> None:
    assert journal_dir(tmp_path, "postgresql://u:p@db:5432/shop") != journal_dir(tmp_path, other)


def test_a_journal_spilled_with_a_wrong_password_replays_once_it_is_fixed(
    pg_url: str, tmp_path: Path
) -> None:
    for role in password_role(pg_url):
        wrong = _with_password(role.url, "not-the-password")
        ids = _spill(SpillJournal(tmp_path / "spill", wrong), 3, 10, "job-wrong-pw")
        settings = {"INGEST_DATABASE_URL": role.url, "INGEST_SPILL_DIR": tmp_path / "spill"}
        answer = ingest_replay(settings, tmp_path)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "replayed 3 batches (30 rows)" in answer.stdout
        assert sorted(_stored(role.url)) == sorted(uuid.UUID(int=i) for i in ids)
        assert role.password not in answer.stdout + answer.stderr


def test_a_journal_named_by_the_whole_url_is_still_replayed(pg_url: str, tmp_path: Path) -> None:
    """Journals written before they were named without the password are found and moved."""
    root = tmp_path / "spill"
    journal = SpillJournal(root, pg_url)
    ids = _spill(journal, 2, 5, "job-legacy")
    legacy = root / hashlib.sha256(pg_url.encode()).hexdigest()[:16]
    assert legacy != journal.dir
    os.rename(journal.dir, legacy)
    settings = {"INGEST_DATABASE_URL": pg_url, "INGEST_SPILL_DIR": root}
    answer = ingest_replay(settings, tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "replayed 2 batches (10 rows)" in answer.stdout
    assert len(_stored(pg_url)) == len(ids)
    assert not legacy.exists()
    assert [row[0] for row in Database(pg_url).query("SELECT job_id FROM ingest_jobs")] == [
        "job-legacy"
    ]


def test_four_replays_at_once_store_every_row_once(pg_url: str, tmp_path: Path) -> None:
    root = tmp_path / "spill"
    ids = _spill(SpillJournal(root, pg_url), 40, 50, "job-four")
    for n in range(3):  # job rows of other crawls too
        SpillJournal(root, pg_url).save_job(JOBS, f"job-{n}", job_row(f"job-{n}"))
    command = [sys.executable, "-m", "scrapy.cmdline", "ingest", "replay"]
    command += ["-s", f"INGEST_DATABASE_URL={pg_url}", "-s", f"INGEST_SPILL_DIR={root}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    replays = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in replays]
    for process, output in zip(replays, outputs, strict=True):
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
    stored = _stored(pg_url)
    assert len(stored) == len(set(stored)) == len(ids) == 2000
    jobs = Database(pg_url).query("SELECT job_id FROM ingest_jobs ORDER BY job_id")
    assert [row[0] for row in jobs] == ["job-0", "job-1", "job-2", "job-four"]


@pytest.mark.crawl
def test_two_crawls_starting_together_share_a_spill_directory(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    """Both replay the journal they find at start; neither fails for the other's work."""
    root = tmp_path / "spill"
    ids = _spill(SpillJournal(root, pg_url), 20, 50, "job-before")
    for n in range(6):
        SpillJournal(root, pg_url).save_job(JOBS, f"job-{n}", job_row(f"job-{n}"))
    args = {
        "base_url": site.base_url,
        "pages": 2,
        "per_page": 10,
        "settings": {"INGEST_DATABASE_URL": pg_url, "INGEST_SPILL_DIR": str(root)},
    }
    crawls = [Crawl(args, tmp_path / f"crawl{n}") for n in range(2)]
    for crawl in crawls:
        crawl.wait().assert_clean()
    stored = _stored(pg_url)
    assert len(stored) == len(set(stored)) == len(ids) + 2 * 20
