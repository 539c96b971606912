"""The spill-and-replay round trip on every backend (PostgreSQL, SQLite, MariaDB, chDB), through
the real `scrapy ingest replay`: every row stored once, rows the database refuses for their
content set aside (dead-lettered, or kept in a ``refused-*`` file) without blocking the rest,
two replayers at once, and a replay that fails part way."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import services
from _helpers import REPO_DIR, Database, ingest_command, ingest_replay, item_row, job_row

from scrapy_ingest.schema import table_spec
from scrapy_ingest.spill import SpillJournal

if TYPE_CHECKING:
    from pathlib import Path

ITEMS = table_spec("items", "ingest_")
JOBS = table_spec("jobs", "ingest_")

#: per backend: the fixture of its URL, and (columns of) an item row it refuses for its
#: content, which the crawl's own encoder would not have written (a journal may come from an
#: older version or another tool), with a word of the driver's reason
POISON: dict[str, tuple[str, dict[str, Any], str]] = {
    # jsonb refuses an escaped NUL (22P05 untranslatable_character)
    "postgres": ("pg_url", {"data": b'{"n": "\\u0000"}'}, "UntranslatableCharacter"),
    # an integer larger than SQLite's 64 bits
    "sqlite": ("sqlite_url", {"data": b"{}", "version": 2**70}, "OverflowError"),
    # MariaDB's JSON columns check json_valid (4025 constraint failed)
    "mysql": ("mysql_url", {"data": b"{not json"}, "4025"),
    # ClickHouse's JSON type refuses what does not parse (117 INCORRECT_DATA)
    "chdb": ("chdb_url", {"data": b"{not json"}, "117"),
}


def _url(request: pytest.FixtureRequest, backend: str) -> str:
    url: str = request.getfixturevalue(POISON[backend][0])
    return url


def _row(row_id: int, job_id: str, n: int, **columns: Any) -> tuple[Any, ...]:
    data = columns.pop("data", b'{"n": %d}' % n)
    return item_row(row_id, job_id, "spilled", "dict", None, 1.7e9 + n, data, **columns)


def _spill(
    journal: SpillJournal, batches: int, rows: int, job_id: str, poison: dict[str, Any] | None
) -> tuple[set[uuid.UUID], uuid.UUID | None]:
    """Spill *batches* batches of *rows* items of *job_id*, the first one with the *poison*
    row in its middle, and the job row; return the ids of the good rows, and the poison's."""
    good: set[uuid.UUID] = set()
    bad = None
    for b in range(batches):
        batch = []
        for n in range(rows):
            row_id = uuid.uuid4()
            if b == 0 and n == rows // 2 and poison is not None:
                bad = row_id
                batch.append(_row(row_id.int, job_id, n, **poison))
                continue
            good.add(row_id)
            batch.append(_row(row_id.int, job_id, n))
        journal.spill(ITEMS, batch)
    journal.save_job(JOBS, job_id, job_row(job_id))
    return good, bad


def _stored(url: str) -> list[uuid.UUID]:
    return [uuid.UUID(str(row[0])) for row in Database(url).query("SELECT id FROM ingest_items")]


def _settings(url: str, root: Path) -> dict[str, Any]:
    return {"INGEST_DATABASE_URL": url, "INGEST_SPILL_DIR": root, "INGEST_RETRY_TIMEOUT": 30}


def _left(root: Path) -> list[str]:
    return sorted(
        p.name
        for d in root.iterdir()
        for p in d.iterdir()
        if p.name.endswith(".batch") or p.name.startswith("job-")
    )


def _refused_files(root: Path) -> list[Path]:
    return [p for d in root.iterdir() for p in d.iterdir() if p.name.startswith("refused-")]


def _replay_at_once(settings: dict[str, Any], cwd: Path, count: int) -> list[tuple[int, str]]:
    command = [sys.executable, "-m", "scrapy.cmdline", "ingest", "replay"]
    for name, value in settings.items():
        command += ["-s", f"{name}={value}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    replays = [
        subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(count)
    ]
    return [(p.wait(120), p.communicate()[0]) for p in replays]


@pytest.mark.parametrize("backend", list(POISON))
def test_a_row_refused_on_replay_is_dead_lettered_and_the_rest_is_stored_once(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    """The FIRST batch holds a row the database refuses: every other row of it and every later
    batch (of another crawl too) is stored once, the row is dead-lettered with the reason,
    the report says so, exit 0; a second replay of the emptied journal stores nothing more."""
    url = _url(request, backend)
    _, poison, why = POISON[backend]
    root = tmp_path / "spill"
    journal = SpillJournal(root, url)
    good, bad = _spill(journal, 3, 20, "job-poisoned", poison)
    more, _ = _spill(journal, 2, 10, "job-other", None)  # a later, valid crawl
    answer = ingest_replay(_settings(url, root), tmp_path)
    output = answer.stdout + answer.stderr
    assert answer.returncode == 0, output
    assert (
        "replayed 5 batches (79 rows); 1 rows refused for their content: 1 dead-lettered in "
        "ingest_dead_letters, 0 kept in refused-* files" in answer.stdout
    ), output
    assert "ERROR: " in answer.stderr and "refused 1 replayed rows for their content" in output
    assert why in answer.stderr, output
    stored = _stored(url)
    assert sorted(stored) == sorted(good | more)  # once each
    [letter] = Database(url).dead_letters()
    assert letter["kind"] == "items" and letter["job_id"] == "job-poisoned"
    assert why in letter["reason"] and "replayed from the spill journal" in letter["reason"]
    assert bad is not None and letter["payload"]
    assert not _left(root) and not _refused_files(root)
    jobs = {row[0] for row in Database(url).query("SELECT job_id FROM ingest_jobs")}
    assert jobs == {"job-poisoned", "job-other"}

    # the same rows spilled again (a crawl that died before it unlinked them): stored once
    journal = SpillJournal(root, url)
    journal.spill(ITEMS, [_row(i.int, "job-other", 0) for i in sorted(more)[:5]])
    again = ingest_replay(_settings(url, root), tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "replayed 1 batches (5 rows)" in again.stdout, again.stdout
    assert sorted(_stored(url)) == sorted(good | more)
    assert len(Database(url).dead_letters()) == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_row_the_dead_letter_table_refuses_too_is_kept_in_a_refused_file(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    url = _url(request, backend)
    _, poison, why = POISON[backend]
    root = tmp_path / "spill"
    good, bad = _spill(SpillJournal(root, url), 2, 10, "job-kept", poison)
    db = Database(url)
    # the tables are there; then the dead-letter table refuses every row
    migrate = ingest_command(["migrate"], _settings(url, root), tmp_path)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    if backend == "sqlite":
        db.execute(
            "CREATE TRIGGER no_dead_letters BEFORE INSERT ON ingest_dead_letters "
            "BEGIN SELECT RAISE(ABORT, 'no dead letters here'); END"
        )
    else:
        db.execute(
            "ALTER TABLE ingest_dead_letters ADD CONSTRAINT no_dead_letters CHECK (kind = 'x')"
        )
    answer = ingest_replay(_settings(url, root), tmp_path)
    output = answer.stdout + answer.stderr
    assert answer.returncode == 0, output
    assert (
        "replayed 2 batches (19 rows); 1 rows refused for their content: 0 dead-lettered "
        "in ingest_dead_letters, 1 kept in refused-* files in " in answer.stdout
    ), output
    assert why in answer.stderr and "the dead-letter table refused it too" in answer.stderr
    assert sorted(_stored(url)) == sorted(good)
    assert not db.dead_letters()
    [refused] = _refused_files(root)
    _, table, kept = pickle.loads(refused.read_bytes())
    assert table.name == "ingest_items"
    [(row, reason)] = kept
    assert bad is not None and row[0] == bad.int and why in reason
    assert not _left(root)


@pytest.mark.parametrize("backend", list(POISON))
def test_two_replays_at_once_store_every_row_once_and_both_exit_0(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> None:
    url = _url(request, backend)
    _, poison, _ = POISON[backend]
    root = tmp_path / "spill"
    journal = SpillJournal(root, url)
    good, _ = _spill(journal, 12, 25, "job-twice", poison)
    for n in range(3):
        journal.save_job(JOBS, f"job-{n}", job_row(f"job-{n}"))
    answers = _replay_at_once(_settings(url, root), tmp_path, 2)
    for code, output in answers:
        assert code == 0, output
        assert "Traceback" not in output, output
    stored = _stored(url)
    assert len(stored) == len(set(stored)) and set(stored) == good
    assert len(Database(url).dead_letters()) == 1
    assert not _left(root)


def test_a_replay_that_fails_part_way_leaves_the_rest_and_the_next_one_finishes(
    tmp_path: Path,
) -> None:
    """The database stops in the middle of a replay: the replay stops (exit 1), the batches it
    did not write wait in the journal; the next replay, once it is back, stores them all."""
    with contextlib.ExitStack() as stack:
        try:
            local, url = services.own_postgres(stack)
        except services.ServiceUnavailable as exc:
            pytest.skip(str(exc))
        root = tmp_path / "spill"
        good, _ = _spill(SpillJournal(root, url), 200, 200, "job-stopped", None)
        command = [sys.executable, "-m", "scrapy.cmdline", "ingest", "replay"]
        for name, value in _settings(url, root).items():
            command += ["-s", f"{name}={value}"]
        env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
        env.pop("SCRAPY_SETTINGS_MODULE", None)
        replay = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # stop the server once some batches are stored, while others wait
        deadline = time.monotonic() + 60
        while len(_left(root)) > 150 and time.monotonic() < deadline:
            time.sleep(0.02)
        local.pause()
        out, err = replay.communicate(timeout=120)
        assert replay.returncode == 1, out + err
        left = _left(root)
        assert 0 < len(left) < 200 and "batches left" in out, out + err  # stopped part way
        local.resume()
        assert 0 < len(_stored(url)) < len(good)
        answer = ingest_replay(_settings(url, root), tmp_path)
        assert answer.returncode == 0, answer.stdout + answer.stderr
        stored = _stored(url)
        assert len(stored) == len(set(stored)) and set(stored) == good
        assert not _left(root)


def test_a_job_row_refused_on_replay_is_cleaned_and_never_blocks(
    pg_url: str, tmp_path: Path
) -> None:
    """A spilled job row PostgreSQL refuses (JSON it does not take, from an older version or
    another tool): written with that JSON left out, and the batches after it are replayed."""
    root = tmp_path / "spill"
    journal = SpillJournal(root, pg_url)
    good, _ = _spill(journal, 2, 10, "job-bad-row", None)
    bad = job_row("job-bad-row", stats=b'{"a": "\\u0000"}', settings=b"{not json")
    journal.save_job(JOBS, "job-bad-row", bad)
    answer = ingest_replay(_settings(pg_url, root), tmp_path)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "replayed 2 batches (20 rows)" in answer.stdout, answer.stdout + answer.stderr
    assert set(_stored(pg_url)) == good
    [(status, stats, settings, log_counts)] = Database(pg_url).query(
        "SELECT status, stats, settings, log_counts FROM ingest_jobs WHERE job_id = 'job-bad-row'"
    )
    assert (status, stats, settings, log_counts) == ("finished", None, None, {})
    assert not _left(root)


_CLASSIFY_SCRIPT = """
import json, subprocess, sys, time
from scrapy_ingest.backends import make_backend
from scrapy_ingest.backends.base import Failure
from scrapy_ingest.schema import all_tables
url = sys.argv[1]
backend = make_backend(url, list(all_tables("ingest_", keep_versions=False)), create_tables=True)
backend.open()
client = backend._client
found = {}
def classify(name, sql):
    try:
        client.query(sql)
    except Exception as exc:
        found[name] = [backend.classify(exc).value, backend.explain_refusal(exc)]
classify("unknown table", "SELECT * FROM no_such_table")
classify("unknown database", "SELECT * FROM no_such_db.t")
classify("unknown column", "INSERT INTO ingest_items (no_such_column) VALUES (1)")
classify("bad value", "SELECT toInt32('x')")
classify("bad JSON", "INSERT INTO ingest_items (data) FORMAT JSONEachRow {\\"data\\": 5}")
backend.close()
print(json.dumps(found))
"""

#: opens chDB at argv[1] and holds it until its stdin ends (the test is done with it), or says
#: how the open failed
_HOLD_SCRIPT = """
import sys
from scrapy_ingest.backends import make_backend
from scrapy_ingest.schema import all_tables
tables = list(all_tables("ingest_", keep_versions=False))
backend = make_backend(sys.argv[1], tables, create_tables=True)
try:
    backend.open()
except Exception as exc:
    print(backend.classify(exc.__context__ or exc).value, type(exc).__name__)
    sys.exit(0)
print("opened", flush=True)
sys.stdin.read()
"""


def test_clickhouse_errors_are_classified_by_their_code(chdb_url: str, tmp_path: Path) -> None:
    """Real chDB errors: a missing table, database or column is permanent, with the fix; a
    value it cannot parse is data; a directory another process holds is transient."""
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    run = subprocess.run(
        [sys.executable, "-c", _CLASSIFY_SCRIPT, chdb_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["unknown table"][0] == "permanent"
    assert "scrapy ingest migrate" in found["unknown table"][1]
    assert found["unknown database"][0] == "permanent"
    assert "does not exist" in found["unknown database"][1]
    assert "CREATE DATABASE" in found["unknown database"][1]
    assert found["unknown column"][0] == "permanent"
    assert found["bad value"][0] == "data"
    assert found["bad JSON"][0] == "data"

    # the holder keeps the directory for as long as the other one tries, however slow
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SCRIPT, chdb_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "opened"
        other = subprocess.run(
            [sys.executable, "-c", _HOLD_SCRIPT, chdb_url],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert holder.poll() is None, "the holder let the directory go"
        assert other.stdout.split() == ["transient", "BackendUnavailable"], other
    finally:
        holder.kill()
        holder.communicate()
