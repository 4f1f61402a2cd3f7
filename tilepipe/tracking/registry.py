"""The MLflow model registry: register a trained model, move the ``champion`` alias when it wins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tilepipe.fsutil import file_sha256
from tilepipe.params import Params
from tilepipe.tracking.champion import DEFAULT_TASK, Scored, decide
from tilepipe.tracking.store import connected_mlflow

CHAMPION = "champion"


def _as_scored(version: Any, key: str) -> Scored:
    """A registered version as the champion decision sees it (from its tags)."""
    best = version.tags.get(f"test_{key}")
    return Scored(
        version=version.version,
        task=version.tags.get("task", DEFAULT_TASK),
        split_sha256=version.tags.get("test_split_sha256"),
        score=None if best is None else float(best),
    )


def register(
    run: dict[str, str], metrics: dict[str, Any], params: Params, split_json: Path
) -> dict[str, Any]:
    """Register the run's model once; move ``champion`` only if it beats the champion on this test split.

    A run whose model is registered already (a flow resumed, an evaluation rerun) adds no version.
    """
    mlflow = connected_mlflow()
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    name, key = params.track.model_name, params.track.champion_metric
    if (known := registered_version(client, name, run["run_id"])) is not None:
        print(f"register: {name} v{known}: this model (run {run['run_id']}) is registered already")
        return {"name": name, "version": known, "champion": False, "decision": "registered already"}
    split_hash = file_sha256(split_json)
    version = mlflow.register_model(run["model_uri"], name, tags={"run_id": run["run_id"]})
    score = float(metrics[key])
    client.set_model_version_tag(name, version.version, f"test_{key}", str(score))
    client.set_model_version_tag(name, version.version, "test_split_sha256", split_hash)
    client.set_model_version_tag(name, version.version, "task", params.train.task)
    try:
        champion = _as_scored(client.get_model_version_by_alias(name, CHAMPION), key)
    except MlflowException:
        champion = None
    decision = decide(Scored(version.version, params.train.task, split_hash, score), champion)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    crowned = " -> champion" if decision.promote else ""
    print(f"register: {name} v{version.version}: {decision.reason}{crowned}")
    return {
        "name": name,
        "version": int(version.version),
        "champion": decision.promote,
        "decision": decision.reason,
    }


def registered_version(client: Any, name: str, run_id: str) -> int | None:
    """The version of ``name`` registered from the run ``run_id`` (its ``run_id`` tag), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.run_id = '{run_id}'")
    return min((int(v.version) for v in found), default=None)
