"""However a crawl ends, its writer process exits and its pipes are closed by the add-on, not
left to the garbage collector: a pipe the collector closes is a ResourceWarning in the user's
crawl, an error under ``-W error`` (Scrapy's own test suite runs so), and a writer nobody stops
lives on beside the crawl.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _helpers import Database, last_json, run_python

from scrapy_ingest.hosting import ProcessHost

REPO_DIR = Path(__file__).resolve().parent.parent

#: a crawl into the SQLite file argv[1], ended as argv[2] says; then every object is collected
#: and the add-on's threads are given time to end; prints what the crawl process has left
_CRAWL = textwrap.dedent(
    """
    import gc
    import json
    import os
    import sys
    import threading
    import time

    import scrapy
    from scrapy.crawler import Crawler, CrawlerProcess
    from scrapy.utils.defer import maybe_deferred_to_future
    from twisted.internet import task

    sys.path.insert(0, {tests!r})
    from test_backend_hosts import _children, _writer_dirs


    class FailsToOpen:
        async def open_spider(self, spider):
            # Scrapy opens the pipelines side by side: the add-on's is opening its
            # databases when this one fails
            from twisted.internet import reactor

            await maybe_deferred_to_future(task.deferLater(reactor, 0, lambda: None))
            raise ValueError("this pipeline cannot open")

        def process_item(self, item, spider):
            return item


    class FailsToBuild:
        @classmethod
        def from_crawler(cls, crawler):
            raise ValueError("this middleware cannot be built")


    class OneItemSpider(scrapy.Spider):
        name = "one_item"
        start_urls = ["data:,"]

        def parse(self, response):
            yield {{"url": response.url}}


    ending = sys.argv[2]
    settings = {{
        "ADDONS": {{"scrapy_ingest.IngestAddon": 0}},
        "INGEST_DATABASE_URL": sys.argv[1],
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "ERROR",
    }}
    if ending == "pipeline fails to open":
        settings["ITEM_PIPELINES"] = {{FailsToOpen: 100}}
    elif ending == "middleware fails to build":
        # built with the engine, after the add-on has started its writer
        settings["DOWNLOADER_MIDDLEWARES"] = {{FailsToBuild: 1}}
    process = CrawlerProcess(settings=settings)
    process.crawl(OneItemSpider)
    process.start()
    del process
    gc.collect()
    # Scrapy 2.13's own log counter handler keeps a crawl that failed before its engine ran
    # alive, and with it the add-on's writer, until the interpreter exits
    crawler_kept = any(isinstance(o, Crawler) for o in gc.get_objects())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not crawler_kept:
        gc.collect()
        if threading.active_count() == 1 and not _children(os.getpid()):
            break
        time.sleep(0.05)
    print(json.dumps({{
        "crawler kept": crawler_kept,
        "writers": _children(os.getpid()),
        "batch directories": sorted(map(str, _writer_dirs(os.getpid()))),
    }}))
    """
)


@pytest.mark.crawl
@pytest.mark.parametrize(
    "ending", ["finished", "pipeline fails to open", "middleware fails to build"]
)
def test_no_pipe_left_to_the_garbage_collector(tmp_path: Path, ending: str) -> None:
    url = f"sqlite:///{tmp_path / 'ingest.sqlite3'}"
    script = _CRAWL.format(tests=str(REPO_DIR / "tests"))
    done = run_python(
        script, url, ending, cwd=tmp_path, python_args=("-W", "error::ResourceWarning")
    )
    # an unclosed pipe raises in its finalizer: Python prints "Exception ignored in: ..."
    assert "ResourceWarning" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
    left = last_json(done)
    if ending != "middleware fails to build" or not left["crawler kept"]:
        # the add-on closed its writer itself, or the collector took the crawl that failed
        assert (left["writers"], left["batch directories"]) == ([], []), done.stderr
    # a writer the crawl process still had at its exit was stopped then, its batch dir removed
    for pid in left["writers"]:
        assert not Path(f"/proc/{pid}").exists(), f"writer {pid} outlived the crawl process"
    for path in left["batch directories"]:
        assert not Path(path).exists(), f"{path} outlived the crawl process"
    if ending == "finished":
        assert Database(url).count("ingest_items") == 1
    if ending == "pipeline fails to open":
        # no job row left "running" (the databases may finish opening after the spider closed)
        assert Database(url).count("ingest_jobs", "status = 'running'") == 0


def test_the_end_of_a_writers_stream_after_the_crawls_loop_closed_is_not_an_error() -> None:
    """Without a reactor, ``asyncio.run()`` may close the crawl's loop between the writer's last
    answer and the end of its stream, which the answer reader reads last (seen once in about 40
    runs of tests/test_reactorless.py): the reader stops quietly, its writer reaped. It raised
    RuntimeError there ("Event loop is closed"): a traceback at the end of a finished crawl."""
    loop = asyncio.new_event_loop()
    loop.close()
    writer = subprocess.Popen(
        [sys.executable, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.close()
    host = ProcessHost("sqlite:///unused.sqlite3", [], create_tables=False, retry_timeout=1)
    # on this thread: what the reader thread raised would raise here
    host._read_answers(writer, loop.call_soon_threadsafe)
    assert writer.returncode == 0
    assert writer.stdout.closed
