"""Orchestration overhead: the Prefect flow vs `dvc repro` vs direct stage calls, same tiny data.

Each runs the whole pipeline from nothing in its own fresh copy of the repository (the files git
sees, as the tests copy it, committed to a new git repo) with the same tiny params:

* direct: one Python process calling each dvc.yaml stage's `tilepipe ...` command in order
  through ``tilepipe.cli.main`` (no orchestrator at all);
* dvc: `dvc repro`, then a second, no-op `dvc repro` (everything up to date);
* flow: `tilepipe flow` (Prefect 3, a temporary local server started for the run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import ROOT, WORK

TINY = {
    "synthesize": {"scenes": 5, "min_size": 160, "max_size": 260, "seed": 3},
    "tile": {"size": 32, "stride": 32, "workers": 2},
    "train": {"epochs": 2, "width": 8, "batch_size": 32},
    "evaluate": {"min_test_tiles": 1},
}

DIRECT = """
import shlex, sys, time, yaml
from tilepipe.cli import main
stages = yaml.safe_load(open("dvc.yaml"))["stages"]
t = time.perf_counter()
for name, stage in stages.items():
    if main(shlex.split(stage["cmd"])[1:]) != 0:
        sys.exit(f"stage {name} failed")
print(time.perf_counter() - t)
"""


def _merge(raw: dict, changes: dict) -> dict:
    for key, value in changes.items():
        raw[key] = _merge(raw.get(key, {}), value) if isinstance(value, dict) else value
    return raw


def _env(repo: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONHASHSEED": "0",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }


def _sh(args: list[str], repo: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed in {repo}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return time.perf_counter() - started, done.stdout


def fresh_copy(name: str) -> Path:
    """A new git repository holding the project's sources and the tiny params."""
    from tests.conftest import copy_repo  # the tests' notion of "the sources", kept in one place

    repo = WORK / "orchestration" / name
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    git = ["git", "-c", "init.defaultBranch=main"]
    for args in ([*git, "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "bench copy"]):
        _sh(args, repo)
    return repo


def run() -> dict:
    """Wall seconds of each way of running the tiny pipeline from nothing, and of a no-op `dvc repro`."""
    repo = fresh_copy("direct")
    _, stdout = _sh([sys.executable, "-c", DIRECT], repo)
    direct = float(stdout.strip().splitlines()[-1])
    repo = fresh_copy("dvc")
    dvc, _ = _sh([str(Path(sys.executable).parent / "dvc"), "repro"], repo)
    noop, stdout = _sh([str(Path(sys.executable).parent / "dvc"), "repro"], repo)
    noop_ran = "Running stage" in stdout
    repo = fresh_copy("flow")
    flow, _ = _sh([str(Path(sys.executable).parent / "tilepipe"), "flow"], repo)
    shutil.rmtree(WORK / "orchestration", ignore_errors=True)
    return {
        "direct_stage_calls_s": round(direct, 1),
        "dvc_repro_s": round(dvc, 1),
        "prefect_flow_s": round(flow, 1),
        "dvc_overhead_s": round(dvc - direct, 1),
        "prefect_overhead_s": round(flow - direct, 1),
        "dvc_repro_noop_s": round(noop, 1),
        "noop_ran_a_stage": noop_ran,
        "params": json.dumps(TINY),
        "stages": list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
