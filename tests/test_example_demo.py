"""examples/demo keeps working: its spider crawls the bundled site, and the project, whose only
scrapy_ingest setting is the ADDONS line, stores every book in the default SQLite file."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"
BOOKS = len(list((DEMO_DIR / "site" / "books").glob("*.html")))

pytestmark = pytest.mark.crawl


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture(scope="module")
def demo_site() -> Iterator[str]:
    """The bundled bookshop served on 127.0.0.1, as run.sh does with `python -m http.server`."""
    handler = functools.partial(_QuietHandler, directory=str(DEMO_DIR / "site"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _crawl(cwd: Path, base_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A subprocess, like a user's `scrapy crawl`: the project's settings module is found
    # through SCRAPY_SETTINGS_MODULE, so the crawl can run in (and write to) tmp_path.
    env = {
        **os.environ,
        "SCRAPY_SETTINGS_MODULE": "demo.settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(DEMO_DIR), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "scrapy", "crawl", "books", "-a", f"base_url={base_url}"]
    result = subprocess.run(
        [*cmd, "-s", "TELNETCONSOLE_ENABLED=False", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_demo_spider_scrapes_every_book(demo_site: str, tmp_path: Path) -> None:
    # ADDONS={} takes the add-on out: this checks the spider alone.
    _crawl(tmp_path, demo_site, "-s", "ADDONS={}", "-O", "books.json")
    books = json.loads((tmp_path / "books.json").read_text())
    assert len(books) == BOOKS >= 20
    assert {b["category"] for b in books} == {"Fiction", "Science", "History"}
    for book in books:
        assert isinstance(book["price"], float)
        assert isinstance(book["rating"], int)
        assert 1 <= book["rating"] <= 5
        assert book["availability"] in {"In stock", "Out of stock"}
        assert book["tags"]
        assert all(isinstance(tag, str) for tag in book["tags"])
        assert book["url"].startswith(demo_site)


def test_demo_project_stores_books_in_default_sqlite(demo_site: str, tmp_path: Path) -> None:
    _crawl(tmp_path, demo_site)
    db = tmp_path / "ingest.sqlite3"
    assert db.exists(), "the add-on's default database is ingest.sqlite3 in the working dir"
    with sqlite3.connect(db) as conn:
        titles = conn.execute(
            "SELECT json_extract(data, '$.title') FROM ingest_items ORDER BY 1"
        ).fetchall()
        price = conn.execute(
            "SELECT json_extract(data, '$.price') FROM ingest_items"
            " WHERE json_extract(data, '$.title') = 'Harbour Lights'"
        ).fetchone()
        jobs = conn.execute("SELECT spider, status, items_count FROM ingest_jobs").fetchall()
    conn.close()
    assert len(titles) == BOOKS
    assert len(set(titles)) == BOOKS  # no duplicates
    assert price == (12.0,)
    assert jobs == [("books", "finished", BOOKS)]
