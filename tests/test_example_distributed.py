"""examples/distributed/run.py keeps working: Redis, two workers of the bookshop project, one
SQLite file, and the crawl's row in SQL."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import service_missing

RUN = Path(__file__).resolve().parent.parent / "examples" / "distributed" / "run.py"
BOOKS = 21  # examples/demo/site/books

pytestmark = [pytest.mark.crawl, pytest.mark.slow]


def test_the_distributed_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("scrapy_redis")
    if shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"):
        service_missing("redis-server is not installed (apt-get install -y redis-server)")
    env = {**os.environ, "PYTHONPATH": str(RUN.parent.parent.parent)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, str(RUN), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # crawl_id, jobs, items, requests, errors
    row = re.search(r"^books:requests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    assert (int(row[1]), int(row[2]), int(row[4])) == (2, BOOKS, 0)
    logs = [(tmp_path / f"worker-{n}.log").read_text() for n in range(2)]
    assert all("Traceback" not in log and " ERROR: " not in log for log in logs), logs
