""".ci/run runs two suites side by side; a test marked ``exclusive`` waits until no test of the
other suite runs (tests/conftest.py, ``SCRAPY_INGEST_SUITE_LOCK``). Here this test plays "the
other suite": it holds the lock shared, as any running test does, and a pytest run of one
exclusive test must wait for it; a test that is not marked must not."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from _helpers import TESTS_DIR

if TYPE_CHECKING:
    from pathlib import Path

TEST_FILE = """
import pytest

{marker}
def test_one():
    pass
"""


def _pytest(tmp_path: Path, lock: Path, marker: str) -> subprocess.Popen[str]:
    (tmp_path / "conftest.py").write_text(
        (TESTS_DIR / "conftest.py").read_text(encoding="utf-8"), encoding="utf-8"
    )
    (tmp_path / "test_one.py").write_text(TEST_FILE.format(marker=marker), encoding="utf-8")
    env = {
        **os.environ,
        "SCRAPY_INGEST_SUITE_LOCK": str(lock),
        "PYTHONPATH": str(TESTS_DIR),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "markers=exclusive: x",
            str(tmp_path / "test_one.py"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(("marker", "waits"), [("@pytest.mark.exclusive", True), ("", False)])
def test_an_exclusive_test_waits_for_the_other_suite(
    tmp_path: Path, marker: str, waits: bool
) -> None:
    lock = tmp_path / "suite.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # a test of the other suite is running
        run = _pytest(tmp_path, lock, marker)
        try:
            run.wait(timeout=15)
        except subprocess.TimeoutExpired:
            finished_while_held = False
        else:
            finished_while_held = True
        fcntl.flock(held, fcntl.LOCK_UN)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 0, output
    assert "1 passed" in output
    assert finished_while_held is not waits, output
