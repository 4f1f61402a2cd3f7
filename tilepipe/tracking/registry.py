"""The MLflow model registry: register a trained model, move the ``champion`` alias on a real gain."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tilepipe.fsutil import file_sha256
from tilepipe.params import Params
from tilepipe.tracking.champion import DEFAULT_TASK, Decision, Rule, Scored, decide
from tilepipe.tracking.store import connected_mlflow

CHAMPION = "champion"
SCENE_CONFUSION = "evaluation/scene_confusion.json"  # each test scene's matrix, logged by evaluate


def run_of(version: Any) -> str | None:
    """The MLflow run a registered version came from."""
    return version.tags.get("run_id") or getattr(version, "run_id", None)


def scene_confusion_of(run_id: str | None) -> dict[str, Any] | None:
    """The run's per-scene confusion matrices, or ``None`` if it has none (evaluated before they existed)."""
    if not run_id:
        return None
    mlflow = connected_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=SCENE_CONFUSION, dst_path=tmp
            )
            doc = json.loads(Path(path).read_text())
    except (MlflowException, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("scenes"), dict) else None


def _as_scored(version: Any, key: str) -> Scored:
    """A registered version as the champion decision sees it (its tags and its run's scene matrices)."""
    best = version.tags.get(f"test_{key}")
    return Scored(
        version=version.version,
        task=version.tags.get("task", DEFAULT_TASK),
        split_sha256=version.tags.get("test_split_sha256"),
        score=None if best is None else float(best),
        scenes=scene_confusion_of(run_of(version)),
    )


def decision_tags(decision: Decision, rule: Rule, champion: Scored | None) -> dict[str, str]:
    """What the new version records of the decision: its text, and the difference with its interval."""
    tags = {"champion_decision": decision.reason}
    if champion is not None:
        tags["champion_compared_with"] = str(champion.version)
    if decision.difference is not None:
        tags[f"champion_diff_{rule.metric}"] = f"{decision.difference:.4f}"
        interval = decision.interval
        tags[f"champion_diff_{rule.metric}_ci"] = "none" if interval is None else json.dumps(interval)
        tags["champion_confidence"] = f"{rule.confidence:g}"
    return tags


def register(
    run: dict[str, str],
    metrics: dict[str, Any],
    params: Params,
    split_json: Path,
    scene_confusion: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register the run's model once; move ``champion`` only on a real gain over it on this test split.

    A run whose model is registered already (a flow resumed, an evaluation rerun) adds no version.
    ``scene_confusion`` is evaluate's ``scene_confusion.json`` for this model; the champion's comes
    from its run's ``evaluation/scene_confusion.json``.
    """
    mlflow = connected_mlflow()
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    track = params.track
    name, key = track.model_name, track.champion_metric
    rule = Rule(key, track.champion_confidence, track.champion_margin)
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
    new = Scored(version.version, params.train.task, split_hash, score, scene_confusion)
    decision = decide(new, champion, rule)
    for tag, value in decision_tags(decision, rule, champion).items():
        client.set_model_version_tag(name, version.version, tag, value)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    crowned = " -> champion" if decision.promote else ""
    print(f"register: {name} v{version.version}: {decision.reason}{crowned}")
    return {
        "name": name,
        "version": int(version.version),
        "champion": decision.promote,
        "decision": decision.reason,
        "difference": decision.difference,
        "interval": decision.interval,
    }


def registered_version(client: Any, name: str, run_id: str) -> int | None:
    """The version of ``name`` registered from the run ``run_id`` (its ``run_id`` tag), or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.run_id = '{run_id}'")
    return min((int(v.version) for v in found), default=None)
