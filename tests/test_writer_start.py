"""The writer process starts as the crawl starts, not at spider open: it imports its backend,
connects and creates the tables while Scrapy builds its engine. SQLite is written from it too.
A writer started for a crawl that never opens its databases exits, and leaves no batch files.
"""

from __future__ import annotations

import platform
import textwrap
from pathlib import Path
from typing import Any

import pytest
from _helpers import Database, last_json, run_python

REPO_DIR = Path(__file__).resolve().parent.parent

#: a crawl into the SQLite file argv[1] whose downloader middleware, which Scrapy builds with
#: its engine (after the extensions, among them the add-on's jobs extension), prints the
#: command lines of the crawl process's children at that moment
_CRAWL = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import scrapy
    from scrapy.crawler import CrawlerProcess

    SEEN = []


    def children():
        pid = os.getpid()
        listed = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\\0", b" ").decode()
                for c in listed]


    class SeeChildren:
        @classmethod
        def from_crawler(cls, crawler):
            SEEN.extend(children())
            return cls()


    class EmptySpider(scrapy.Spider):
        name = "empty"
        start_urls = ["data:,"]

        def parse(self, response):
            return []


    process = CrawlerProcess(settings={
        "ADDONS": {"scrapy_ingest.IngestAddon": 0},
        "DOWNLOADER_MIDDLEWARES": {SeeChildren: 1},
        "INGEST_DATABASE_URL": sys.argv[1],
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
    })
    process.crawl(EmptySpider)
    process.start()
    print(json.dumps(SEEN))
    """
)


@pytest.mark.crawl
def test_the_writer_process_runs_before_scrapy_builds_the_engine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ingest.sqlite3'}"
    seen = _run_script(tmp_path, _CRAWL, url)
    assert [c for c in seen if "scrapy_ingest.backends._process" in c], seen
    [(status,)] = Database(url).query("SELECT status FROM ingest_jobs")
    assert status == "finished"


_NEVER_OPENED = textwrap.dedent(
    """
    import json
    import os
    import sys

    from twisted.internet import defer, task, threads

    sys.path.insert(0, {tests!r})
    from test_backend_hosts import _children, _writer_dirs

    from scrapy_ingest.hosting import ProcessHost
    from scrapy_ingest.schema import all_tables


    async def main(reactor):
        host = ProcessHost({url!r}, all_tables("ingest_"), create_tables=True, retry_timeout=30)
        host.start()
        started = [_children(os.getpid()), sorted(map(str, _writer_dirs(os.getpid())))]
        host.discard()
        # the writer reads the end of its stdin and exits; discard() reaps it
        for _ in range(600):
            if not _children(os.getpid()):
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        left = [_children(os.getpid()), sorted(map(str, _writer_dirs(os.getpid())))]
        print(json.dumps([started, left]))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def test_a_writer_started_and_never_opened_exits_and_leaves_no_batch_dir(tmp_path: Path) -> None:
    script = _NEVER_OPENED.format(
        tests=str(REPO_DIR / "tests"), url=f"sqlite:///{tmp_path / 'ingest.sqlite3'}"
    )
    (children, dirs), left = _run_script(tmp_path, script)
    assert len(children) == 1 and len(dirs) == 1  # started: a writer and its batch dir
    assert left == [[], []]


#: the page faults of making and freeing buffers the size of a batch's, 50 times, after the
#: writer's malloc parameters (argv[1] == "keep") or without them
_FAULTS = textwrap.dedent(
    """
    import json
    import resource
    import sys

    if sys.argv[1] == "keep":
        from scrapy_ingest.backends._process import _keep_freed_memory

        _keep_freed_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        read = b"x" * 1_600_000  # the batch file
        block = read + b"y" * 1_700_000  # a COPY block
        del read, block
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc's parameters are glibc's")
def test_the_writer_keeps_freed_memory_for_the_next_batch(tmp_path: Path) -> None:
    # freed batch buffers went back to the kernel and were faulted in again for the next batch:
    # 46,600 page faults in the 100,000-item benchmark crawl, half the writer's system time
    plain = _run_script(tmp_path, _FAULTS, "plain")
    kept = _run_script(tmp_path, _FAULTS, "keep")
    assert kept * 10 < plain, (kept, plain)


def _run_script(cwd: Path, script: str, *args: str) -> Any:
    """Run *script* in a Python process of its own, in *cwd*: the JSON of its last line."""
    done = run_python(script, *args, cwd=cwd)
    assert "Traceback" not in done.stderr, done.stderr
    return last_json(done)
