"""MLflow at the edge: runs, per-epoch metrics, artifacts, the logged model and the champion alias.

Stages never import this module; the CLI and the flows wrap stage calls with it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from stages.fsutil import file_sha256, write_json
from stages.params import Params, flatten
from stages.tracking_check import fail_fast

CHAMPION = "champion"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _mlflow():
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def lineage_tags(split_json: Path) -> dict[str, str]:
    """Git commit and dirty flag, DVC hashes of the tile and split outputs, scenes per split."""
    tags = {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain"))),
    }
    lock = Path("dvc.lock")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in ("tile", "split"):
            for out in stages.get(stage, {}).get("outs", []):
                tags[f"dvc_{stage}_md5"] = str(out.get("md5", ""))
    members = json.loads(Path(split_json).read_text())["members"]
    for name, scenes in members.items():
        tags[f"scenes_{name}"] = str(len(scenes))
    tags["split_sha256"] = file_sha256(split_json)
    return tags


@contextmanager
def training_run(params: Params, split_json: Path, run_name: str | None = None) -> Iterator[Any]:
    """Open an MLflow run in the params' experiment with params and lineage tags logged."""
    mlflow = _mlflow()
    with fail_fast(tracking_uri()):  # bounded probe: a down server or a locked store fails here
        mlflow.set_experiment(params.track.experiment)
        active = mlflow.start_run(run_name=run_name)
    with active as run:
        mlflow.log_params(flatten(params))
        mlflow.set_tags(lineage_tags(split_json))
        yield run


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Log one point per metric at ``step=epoch`` (the same names in every run)."""
    _mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)


def log_trained_model(model_dir: Path) -> dict[str, str]:
    """Log the training artifacts and the best model (with signature and input example)."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from stages.train import load_model

    for name in ("learning_curves.png", "val_confusion.png", "history.csv", "train.json"):
        if (model_dir / name).is_file():
            mlflow.log_artifact(str(model_dir / name), artifact_path="training")
    model, meta = load_model(model_dir / "model.pt")
    example = np.random.default_rng(0).random((2, len(meta["bands"]), meta["tile_size"], meta["tile_size"]))
    example = example.astype(np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.log_dict(meta, "model_meta.json")
    mlflow = _mlflow()
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )
    run = mlflow.active_run()
    record = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "model_uri": info.model_uri,
        "tracking_uri": tracking_uri(),
    }
    write_json(model_dir / "run.json", record)
    return record


def log_evaluation(run_id: str, metrics: dict[str, Any], out_dir: Path) -> None:
    """Log test metrics and evaluation artifacts to the training's run."""
    mlflow = _mlflow()
    flat = {f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    for scene, acc in metrics.get("per_scene_accuracy", {}).items():
        flat[f"test_scene_accuracy_{scene}"] = float(acc)
    for name, scores in metrics.get("per_class", {}).items():
        flat[f"test_f1_{name}"] = float(scores["f1"])
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        for name in ("metrics.json", "test_confusion.png", "report.txt"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path="evaluation")
        scenes = out_dir / "scenes"  # full-scene map scores and prediction-vs-label previews
        for path in sorted(scenes.glob("*.png")) + sorted(scenes.glob("*.json")) if scenes.is_dir() else []:
            mlflow.log_artifact(str(path), artifact_path="evaluation/scenes")


def register(
    run: dict[str, str], metrics: dict[str, Any], params: Params, split_json: Path
) -> dict[str, Any]:
    """Register the run's model; move ``champion`` only if it beats the champion on this test split."""
    mlflow = _mlflow()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    name, key = params.track.model_name, params.track.champion_metric
    split_hash = file_sha256(split_json)
    version = mlflow.register_model(run["model_uri"], name, tags={"run_id": run["run_id"]})
    score = float(metrics[key])
    client.set_model_version_tag(name, version.version, f"test_{key}", str(score))
    client.set_model_version_tag(name, version.version, "test_split_sha256", split_hash)
    client.set_model_version_tag(name, version.version, "task", params.train.task)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    decision = "first version"
    promote = champion is None
    if champion is not None:
        same_split = champion.tags.get("test_split_sha256") == split_hash
        best = champion.tags.get(f"test_{key}")
        if champion.tags.get("task", "classification") != params.train.task:
            decision = (
                f"champion v{champion.version} is a {champion.tags.get('task', 'classification')} model: kept"
            )
        elif not same_split or best is None:
            decision = f"champion v{champion.version} was scored on another test split: not comparable, kept"
        elif score > float(best):
            promote, decision = True, f"beats champion v{champion.version} ({score:.4f} > {float(best):.4f})"
        else:
            decision = f"does not beat champion v{champion.version} ({score:.4f} <= {float(best):.4f})"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    print(f"register: {name} v{version.version}: {decision}{' -> champion' if promote else ''}")
    return {"name": name, "version": int(version.version), "champion": promote, "decision": decision}


def tracked_train(
    params: Params, tiles_dir: Path, split_json: Path, out_dir: Path, on_epoch: Any = None
) -> dict[str, Any]:
    """Train inside an MLflow run: params, tags, one point per epoch, artifacts and the model."""
    from stages.train import load_checkpoint, train

    last = Path(out_dir) / "checkpoints" / "last.pt"
    if params.train.resume and last.is_file():
        load_checkpoint(last)  # a truncated or foreign checkpoint fails here, before any MLflow run

    def log_and_forward(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    with training_run(params, split_json):
        summary = train(params, tiles_dir, split_json, out_dir, on_epoch=log_and_forward)
        run = log_trained_model(out_dir)
    return {**summary, **run}


def tracked_evaluate(
    params: Params,
    model_dir: Path,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    maps_dir: Path | None = None,
    scenes_json: Path | None = None,
) -> dict[str, Any]:
    """Evaluate on the test scenes (tiles, and full-scene maps if given) and log to the training's run."""
    from stages.evaluate import evaluate

    metrics = evaluate(params, model_dir, tiles_dir, split_json, out_dir, maps_dir, scenes_json)
    run_file = Path(model_dir) / "run.json"
    if run_file.is_file():
        log_evaluation(json.loads(run_file.read_text())["run_id"], metrics, out_dir)
    else:
        print(f"evaluate: {run_file} not found, so nothing is logged to MLflow")
    return metrics


def register_trained(params: Params, model_dir: Path, metrics_dir: Path, split_json: Path) -> dict[str, Any]:
    """Register the model of ``model_dir/run.json`` with its test metrics; maybe crown it."""
    run = json.loads((Path(model_dir) / "run.json").read_text())
    metrics = json.loads((Path(metrics_dir) / "metrics.json").read_text())
    return register(run, metrics, params, split_json)
