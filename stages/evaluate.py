"""Evaluate stage: score the model on the held-out test scenes (tiles and maps), log and register it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError
from tilepipe.mapping.scoring import score_maps
from tilepipe.ml.checkpoint import ModelMeta
from tilepipe.ml.evaluation import evaluate as evaluate_tiles
from tilepipe.params import Params
from tilepipe.tracking.registry import register as register_version
from tilepipe.tracking.runs import log_evaluation


def evaluate(
    params: Params,
    model_dir: Path,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    maps_dir: Path | None = None,
    scenes_json: Path | None = None,
) -> dict[str, Any]:
    """Evaluate on the test scenes (tiles, and full-scene maps if given) and log to the training's run."""
    more = None
    if maps_dir is not None:
        if scenes_json is None:
            raise TilepipeError(
                "evaluate: scoring maps needs the ingest record (--scenes data/ingest/scenes.json)"
            )

        def more(meta: ModelMeta) -> dict[str, Any]:
            return score_maps(params, meta, split_json, Path(maps_dir), Path(scenes_json), out_dir / "scenes")

    metrics = evaluate_tiles(params, model_dir, tiles_dir, split_json, out_dir, more)
    run_file = Path(model_dir) / "run.json"
    if run_file.is_file():
        log_evaluation(json.loads(run_file.read_text())["run_id"], metrics, out_dir)
    else:
        print(f"evaluate: {run_file} not found, so nothing is logged to MLflow")
    return metrics


def register(params: Params, model_dir: Path, metrics_dir: Path, split_json: Path) -> dict[str, Any]:
    """Register the model of ``model_dir/run.json`` with its test metrics; maybe crown it.

    The per-scene matrices (``scene_confusion.json``) let the champion rule compare scene by scene.
    """
    run = json.loads((Path(model_dir) / "run.json").read_text())
    metrics = json.loads((Path(metrics_dir) / "metrics.json").read_text())
    scenes_file = Path(metrics_dir) / "scene_confusion.json"
    scenes = json.loads(scenes_file.read_text()) if scenes_file.is_file() else None
    return register_version(run, metrics, params, split_json, scenes)
