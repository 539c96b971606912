"""``.ci/run`` passes on pytest's exit code: a run where pytest collected no tests (exit code 5)
fails, as any other failure does, whichever of the two suites (newest Scrapy, Scrapy 2.13.0) it
happens in. ``.ci/run`` runs here against a stand-in ``tests/run.sh`` that only exits with the
code it is given for that suite."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from _helpers import REPO_DIR

if TYPE_CHECKING:
    from pathlib import Path

STAND_IN = """#!/usr/bin/env bash
calls="$(dirname "${BASH_SOURCE[0]}")/calls"
suite="$([[ -n "${SCRAPY_INGEST_VENV:-}" ]] && echo oldest || echo newest)"
if [[ -n "${SCRAPY_INGEST_SETUP_ONLY:-}" ]]; then
    echo "setup $suite" >>"$calls"
    exit 0
fi
echo "run.sh $suite $*" >>"$calls"
[[ "$suite" == newest ]] && exit "$NEWEST_STATUS" || exit "$OLDEST_STATUS"
"""

#: stands in for .venv/bin/python, which .ci/run gives scrapy_suite/run.py to last
PYTHON_STAND_IN = """#!/usr/bin/env bash
echo "python $*" >>"$(dirname "${BASH_SOURCE[0]}")/../../tests/calls"
"""


def _ci_run(tmp_path: Path, newest: int, oldest: int) -> subprocess.CompletedProcess[str]:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO_DIR / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "run.sh").write_text(STAND_IN, encoding="utf-8")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text(PYTHON_STAND_IN, encoding="utf-8")
    (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    env = {**os.environ, "NEWEST_STATUS": str(newest), "OLDEST_STATUS": str(oldest)}
    env.pop("SCRAPY_INGEST_VENV", None)
    return subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


@pytest.mark.parametrize(
    ("newest", "oldest", "status"),
    [(0, 0, 0), (1, 0, 1), (0, 1, 1), (5, 0, 5), (0, 5, 5), (1, 5, 1)],
)
def test_ci_run_fails_when_either_suite_fails_or_collects_nothing(
    tmp_path: Path, newest: int, oldest: int, status: int
) -> None:
    result = _ci_run(tmp_path, newest, oldest)
    assert result.returncode == status, result.stderr
    if 5 in (newest, oldest):
        assert "collected no tests" in result.stderr
    calls = (tmp_path / "tests" / "calls").read_text(encoding="utf-8").splitlines()
    # both venvs are set up first, then both suites run (side by side), then Scrapy's own tests
    # with the add-on, unless a suite failed
    assert calls[:2] == ["setup newest", "setup oldest"]
    assert sorted(calls[2:4]) == ["run.sh newest -q", "run.sh oldest -q"]
    assert calls[4:] == ([] if status else ["python scrapy_suite/run.py"])
