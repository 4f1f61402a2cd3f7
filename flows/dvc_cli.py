"""The dvc command line beside the flow: what changed per stage; record the stages a flow ran in dvc.lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.flows.repo_lock import lent
from tilepipe.params import Params, load_params
from tilepipe.redaction import redact_text

PARAMS_YAML = Path("params.yaml")  # what dvc.yaml's stages read, and so what dvc.lock records


def executable() -> list[str]:
    """The ``dvc`` of this environment: the script beside ``sys.executable``, else ``python -m dvc``."""
    beside = Path(sys.executable).parent / "dvc"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "dvc"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``dvc <args>`` in the working directory (an argument list, no shell).

    A pipeline lock this process holds is lent to the command, which locks the repository itself.
    """
    with lent():
        return subprocess.run([*executable(), *args], capture_output=True, text=True, check=False)


def is_repo() -> bool:
    """True when the working directory is a DVC project with a pipeline."""
    return Path(".dvc").is_dir() and Path("dvc.yaml").is_file()


def yaml_params() -> Params | None:
    """params.yaml as the DVC stages see it, or None when it is missing or invalid."""
    try:
        return load_params(PARAMS_YAML)
    except TilepipeError:
        return None


def synthesis_is_current(params: Params) -> bool:
    """True when DVC's synthesize stage is up to date and params.yaml gives it these params."""
    base = yaml_params() if is_repo() else None
    if base is None or (base.synthesize, base.data.classes) != (params.synthesize, params.data.classes):
        return False
    return run("status", "--quiet", "synthesize").returncode == 0


def status(*stages: str) -> dict[str, list]:
    """``dvc status --json [stages]``: per stage, what changed against dvc.lock (absent: unchanged).

    A change is a deps, params or outs entry (``{"changed deps": {path: "modified"}}``) or a word
    (``"changed command"``, ``"always changed"``), as ``dvc repro`` sees it before running a stage.
    """
    result = run("status", "--json", *stages)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise TilepipeError(f"dvc status {' '.join(stages)} failed: {reason}")
    return json.loads(result.stdout or "{}")


def why_not_commit(params: Params) -> str | None:
    """Why dvc.lock must not record this run (None: it may)."""
    if not is_repo():
        return "the working directory is not a DVC project"
    if yaml_params() != params:
        return (
            "the flow ran with params (overrides or another params file) that differ from params.yaml, "
            "and dvc.lock must describe params.yaml; put the values in params.yaml to version a run"
        )
    return None


def commit(stages: list[str]) -> str:
    """``dvc commit --force <stages>``: dvc.lock records the outputs these stages just wrote."""
    result = run("commit", "--force", *stages)
    if result.returncode != 0:
        raise RuntimeError(f"dvc commit {' '.join(stages)} failed: {redact_text(result.stderr.strip())}")
    return result.stdout
