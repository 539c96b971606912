"""``.ci/run`` passes on pytest's exit code: a run where pytest collected no tests (exit code 5)
fails, as any other failure does. ``.ci/run`` runs here against a stand-in ``tests/run.sh``
that only exits with the code it is given."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from _helpers import REPO_DIR

if TYPE_CHECKING:
    from pathlib import Path

STAND_IN = """#!/usr/bin/env bash
echo "run.sh $*" >>"$(dirname "${BASH_SOURCE[0]}")/calls"
exit %d
"""

#: stands in for .venv/bin/python, which .ci/run gives scrapy_suite/run.py to last
PYTHON_STAND_IN = """#!/usr/bin/env bash
echo "python $*" >>"$(dirname "${BASH_SOURCE[0]}")/../../tests/calls"
"""


def _ci_run(tmp_path: Path, pytest_status: int) -> subprocess.CompletedProcess[str]:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO_DIR / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "run.sh").write_text(STAND_IN % pytest_status, encoding="utf-8")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text(PYTHON_STAND_IN, encoding="utf-8")
    (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    return subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("pytest_status", "failed"), [(0, False), (1, True), (5, True)])
def test_ci_run_fails_when_pytest_fails_or_collects_nothing(
    tmp_path: Path, pytest_status: int, failed: bool
) -> None:
    result = _ci_run(tmp_path, pytest_status)
    assert (result.returncode != 0) is failed, result.stderr
    if pytest_status == 5:
        assert "collected no tests" in result.stderr
        assert result.returncode == 5
    calls = (tmp_path / "tests" / "calls").read_text(encoding="utf-8").splitlines()
    # the oldest Scrapy runs too, then Scrapy's own tests with the add-on, unless the newest
    # already failed
    assert len(calls) == (1 if failed else 3)
    if not failed:
        assert calls[-1] == "python scrapy_suite/run.py"
