"""Two pipeline runs on one repository: the second fails at once, whichever of `dvc repro` and
`tilepipe flow` holds the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zc.lockfile
from dvc.lock import make_lock

from tests.conftest import copy_repo
from tilepipe.flows import dvc_cli
from tilepipe.flows.repo_lock import LOCK_FILE, pipeline_lock

pytestmark = pytest.mark.xdist_group("dvc")
BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC copy of the project's sources, with no pipeline output."""
    root = tmp_path / "repo"
    root.mkdir()
    copy_repo(root)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=root, env=_env(), check=True)
    return root


def _outputs(repo: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(repo)) for p in (repo / "data").glob("*"))
        if (repo / "data").exists()
        else []
    )


def _is_locked(path: Path) -> bool:
    try:
        zc.lockfile.LockFile(str(path)).close()
    except zc.lockfile.LockError:
        return True
    return False


def test_flow_fails_at_once_while_dvc_holds_the_repo_lock(repo):
    before = _outputs(repo)
    (repo / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)  # as dvc.repo.Repo() does
    lock = make_lock(str(repo / LOCK_FILE))  # DVC's own lock, as `dvc repro` takes it
    lock.lock()
    try:
        started = time.monotonic()
        result = subprocess.run(
            [str(BIN / "tilepipe"), "flow"], cwd=repo, env=_env(), capture_output=True, text=True, timeout=300
        )
        seconds = time.monotonic() - started
    finally:
        lock.unlock()
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"tilepipe flow: error: another pipeline run holds the lock on {repo}: "), (
        lines
    )
    assert f"process {os.getpid()}" in lines[0]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert _outputs(repo) == before, "the second run must not write anything"


def test_dvc_repro_fails_while_the_flow_holds_the_lock_and_the_flow_lends_it_to_its_own_dvc(
    repo, monkeypatch
):
    monkeypatch.chdir(repo)
    path = repo / LOCK_FILE
    with pipeline_lock():  # what `tilepipe flow` holds for its whole run
        assert _is_locked(path)
        result = subprocess.run(
            ["dvc", "repro"], cwd=repo, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert result.returncode != 0, result.stdout
        assert "Unable to acquire lock" in result.stderr, result.stderr
        assert "Running stage" not in result.stdout
        assert _outputs(repo) == []
        # The flow's own dvc commands (status, commit) get the lock lent, then it is taken back.
        status = dvc_cli.run("status", "--quiet", "synthesize")
        assert "Unable to acquire lock" not in status.stderr, status.stderr
        assert status.returncode == 1  # ran, and found the stage out of date
        assert _is_locked(path)
    assert not _is_locked(path)
