"""Tests marked with one ``xdist_group`` share a worker under ``pytest -n 2 --dist loadgroup``.

The tests that share a server (Prefect, the S3 store, the services stack) or a DVC project rely on
it; pytest 9 with pytest-xdist 3.8 ignored the marks without a word, which is why pyproject.toml
keeps pytest below 9. A tiny suite of its own is run in a subprocess: eight tests of one group in
two modules, beside eight ungrouped ones, must all report the same worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GROUPED = '''
import json, os, pytest

@pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("case", range(4))
def test_grouped(case):
    out = os.environ["GROUPS_OUT"]
    with open(os.path.join(out, f"{__name__}-{case}.json"), "w") as f:
        json.dump(os.environ["PYTEST_XDIST_WORKER"], f)
'''

UNGROUPED = '''
import time, pytest

@pytest.mark.parametrize("case", range(8))
def test_free(case):
    time.sleep(0.05)
'''


def test_one_group_runs_on_one_worker(tmp_path: Path):
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("test_a", "test_b"):
        (suite / f"{name}.py").write_text(GROUPED)
    (suite / "test_c.py").write_text(UNGROUPED)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
               "-p", "no:cacheprovider", "--rootdir", str(suite), str(suite)]  # fmt: skip
    done = subprocess.run(command, cwd=suite, env={**_env(), "GROUPS_OUT": str(out)},
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert len(workers) == 8, workers
    assert len(set(workers.values())) == 1, f"one group ran on several workers: {workers}"


def _env() -> dict[str, str]:
    """This environment without the outer pytest's worker variables."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
