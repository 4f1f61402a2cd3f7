"""MLflow runs: params and lineage tags, one metric point per epoch, artifacts and the logged model.

The one place (with the rest of ``tilepipe.tracking``) that talks to MLflow; stages call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tilepipe.fsutil import file_sha256, write_json
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.pretrained import InitSpec, checked_file
from tilepipe.params import Params, flatten
from tilepipe.redaction import redact
from tilepipe.tracking.check import fail_fast, is_unreachable, lost, quick_http
from tilepipe.tracking.fetch import WEIGHTS
from tilepipe.tracking.store import connected_mlflow, tracking_uri

TRAINING_ARTIFACTS = ("learning_curves.png", "val_confusion.png", "history.csv", "train.json")
DVC_EXP_ENV = {"dvc_exp_name": "DVC_EXP_NAME", "dvc_exp_baseline_rev": "DVC_EXP_BASELINE_REV"}


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """dvc.lock and every path dvc.yaml's stages write (outs, metrics, plots): pipeline state, not code."""
    if not dvc_yaml.is_file():
        return []
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    paths = ["dvc.lock"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            paths += [next(iter(o)) if isinstance(o, dict) else str(o) for o in stage.get(kind, [])]
    return paths


def lineage_tags(split_json: Path) -> dict[str, str]:
    """Git commit and dirty flag, DVC hashes of the tile and split outputs, scenes per split.

    ``git_dirty`` is about the code and params: the outputs ``dvc repro`` is rewriting at that moment
    (a committed ``models/history.csv`` it deleted before training, ``dvc.lock``) do not count.
    """
    outputs = [f":(exclude){path}" for path in pipeline_outputs()]
    tags = {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--", ".", *outputs))),
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


def params_hash(params: Params) -> str:
    """8 hex digits of the SHA-256 of the run's logged params (``flatten``) as canonical JSON.

    Two runs share it exactly when the MLflow UI shows them the same params.
    """
    text = json.dumps(flatten(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def dvc_exp_tags() -> dict[str, str]:
    """``dvc_exp_name`` and ``dvc_exp_baseline_rev``: what ``dvc exp run`` exports to its stages."""
    return {tag: os.environ[var] for tag, var in DVC_EXP_ENV.items() if os.environ.get(var)}


def run_name(params: Params) -> str:
    """The DVC experiment's name under ``dvc exp run``, else ``<model>-w<width>-<params hash>``."""
    exp = os.environ.get("DVC_EXP_NAME")
    return exp or f"{params.train.model}-w{params.train.width}-{params_hash(params)}"


def init_tags(params: Params) -> dict[str, str]:
    """``init_file`` and ``init_sha256`` of the pretrained weights (``train.init``), checked; {} without."""
    if not params.train.init:
        return {}
    spec = InitSpec.parse(params.train.init)
    return {"init_file": spec.path.name, "init_sha256": checked_file(spec)}


@contextmanager
def training_run(
    params: Params,
    split_json: Path,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    model_dir: Path | None = None,
) -> Iterator[Any]:
    """Open an MLflow run in the params' experiment with params, lineage tags and ``tags`` logged.

    The run is called ``name`` (default: :func:`run_name`) and tagged with the DVC experiment.
    A tracking server that stops answering is retried by MLflow (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    with backoff): a short outage only pauses the logging call. One gone for good ends the run here
    with one line; the model and checkpoint already written in ``model_dir`` stay.
    """
    init = init_tags(params)  # a missing or altered init file fails here, before any run is opened
    mlflow = connected_mlflow()
    uri = tracking_uri()
    with fail_fast(uri):  # bounded probe: a down server or a locked store fails here
        mlflow.set_experiment(params.track.experiment)
        run = mlflow.start_run(run_name=name or run_name(params))
    try:
        mlflow.log_params(redacted(flatten(params)))
        mlflow.set_tags(redacted({**lineage_tags(split_json), **dvc_exp_tags(), **init, **(tags or {})}))
        yield run
    except BaseException as exc:
        unreachable = is_unreachable(exc)
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        try:
            with quick_http() if unreachable else nullcontext():
                mlflow.end_run(status)
        except Exception:  # noqa: BLE001, S110 - the server is gone: the run stays RUNNING there
            pass
        if unreachable:
            raise lost(uri, exc, model_dir) from None
        raise
    mlflow.end_run()


def redacted(values: dict[str, Any]) -> dict[str, Any]:
    """Params or tags as MLflow shows them: any URI without user info, password or query string."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    """Log one point per metric at ``step=epoch`` (the same names in every run)."""
    connected_mlflow().log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)


def log_run_metrics(metrics: dict[str, float]) -> None:
    """Log metrics without a step to the active run."""
    connected_mlflow().log_metrics({k: float(v) for k, v in metrics.items()})


def log_training_files(model_dir: Path) -> None:
    """Log the training's curves, confusion matrix, history and summary (those that exist)."""
    mlflow = connected_mlflow()
    for name in TRAINING_ARTIFACTS:
        if (model_dir / name).is_file():
            mlflow.log_artifact(str(model_dir / name), artifact_path="training")


def log_band_stats(stats_json: Path) -> None:
    """Log the training tiles' band statistics (the analyze stage's file) under ``training/``."""
    connected_mlflow().log_artifact(str(stats_json), artifact_path="training")


def log_trained_model(model_dir: Path) -> dict[str, str]:
    """Log the training artifacts and the best model (with signature and input example)."""
    import mlflow.pytorch  # noqa: F401 - registers the flavour on the mlflow module
    import torch
    from mlflow.models import infer_signature

    log_training_files(model_dir)
    mlflow = connected_mlflow()
    model, meta = load_model(model_dir / "model.pt")
    example = np.random.default_rng(0).random((2, len(meta.bands), meta.tile_size, meta.tile_size))
    example = example.astype(np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.log_dict(meta.to_dict(), "model_meta.json")
    folder, name = WEIGHTS.rsplit("/", 1)  # what predict loads: the very file training wrote
    mlflow.log_artifact(str(model_dir / name), artifact_path=folder)
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
        "tracking_uri": redact(tracking_uri()),  # where the run is, not how to log in (docs/team-setup.md)
    }
    write_json(model_dir / "run.json", record)
    return record


def log_evaluation(run_id: str, metrics: dict[str, Any], out_dir: Path) -> None:
    """Log test metrics and evaluation artifacts to the training's run."""
    mlflow = connected_mlflow()
    flat = {f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    flat.update(_interval_metrics(metrics, "test_"))
    for scene, acc in metrics.get("per_scene_accuracy", {}).items():
        flat[f"test_scene_accuracy_{scene}"] = float(acc)
    for prefix in ("", "map_"):
        for name, scores in metrics.get(f"{prefix}per_class", {}).items():
            key = f"test_{prefix}f1_{name}"
            flat[key] = float(scores["f1"])
            if scores.get("f1_ci"):
                flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = map(float, scores["f1_ci"])
    # the run's own experiment: one this process set earlier (another store, another params file)
    # would make MLflow refuse to reopen the run
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(flat)
        for name in ("metrics.json", "test_confusion.png", "report.txt", "scene_confusion.json"):
            if (out_dir / name).is_file():
                mlflow.log_artifact(str(out_dir / name), artifact_path="evaluation")
        scenes = out_dir / "scenes"  # full-scene map scores and prediction-vs-label previews
        for path in sorted(scenes.glob("*.png")) + sorted(scenes.glob("*.json")) if scenes.is_dir() else []:
            mlflow.log_artifact(str(path), artifact_path="evaluation/scenes")


def _interval_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``<key>_ci: [lo, hi]`` as the MLflow metrics ``<prefix><key>_ci_low`` and ``..._ci_high``."""
    flat = {}
    for key, value in metrics.items():
        if key.endswith("_ci") and isinstance(value, list) and len(value) == 2:
            flat[f"{prefix}{key}_low"], flat[f"{prefix}{key}_high"] = float(value[0]), float(value[1])
    return flat


def log_study(run_id: str, summary: dict[str, Any], out: Path) -> None:
    """The study's per-size held-out scores (step = training scenes) and its files, on its parent run."""
    client = connected_mlflow().MlflowClient(tracking_uri())
    metric = summary["metric"]
    for size, stats in summary["by_size"].items():
        low, high = stats.get("ci") or (None, None)
        values = {"mean": stats["mean"], "min": stats["min"], "max": stats["max"], "std": stats.get("std"),
                  "ci_low": low, "ci_high": high}  # fmt: skip
        for name, value in values.items():
            key = f"heldout_{metric}" + ("" if name == "mean" else f"_{name}")
            if value is not None:  # one training of that size: no spread, no interval
                client.log_metric(run_id, key, float(value), step=int(size))
    if "trap" in summary:
        client.log_metric(run_id, f"trap_self_{metric}", summary["trap"]["self"]["mean"])
        client.log_metric(run_id, f"trap_heldout_{metric}", summary["trap"]["heldout"]["mean"])
    for name in ("study.csv", "study.json", "study.png"):
        client.log_artifact(run_id, str(out / name), artifact_path="study")


def log_cv(run_id: str, doc: dict[str, Any], path: Path) -> None:
    """Cross-validation on its parent run: ``cv_<metric>`` per fold (step = fold), the summary, cv.json."""
    client = connected_mlflow().MlflowClient(tracking_uri())
    for fold in doc["per_fold"]:
        for key in ("accuracy", "macro_f1", "miou"):
            client.log_metric(run_id, f"cv_{key}", float(fold[key]), step=int(fold["fold"]))
    for key, stats in doc["summary"].items():
        flat = {f"cv_{key}_mean": stats["mean"], f"cv_{key}_std": stats["std"]}
        flat.update(zip((f"cv_{key}_ci_low", f"cv_{key}_ci_high"), stats["ci"] or (None, None), strict=True))
        for name, value in flat.items():
            if value is not None:
                client.log_metric(run_id, name, float(value))
    client.log_artifact(run_id, str(path), artifact_path="cv")
