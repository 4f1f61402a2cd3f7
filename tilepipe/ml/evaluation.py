"""Evaluation on the held-out test scenes: tile scores, the majority baseline, report files."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json, write_text
from tilepipe.ml.calibration import CalibrationBins
from tilepipe.ml.checkpoint import ModelMeta, load_model
from tilepipe.ml.dataset import TileBatches, TileRef, make_loader, open_stores, select_tiles, split_members
from tilepipe.ml.inputs import scene_scales
from tilepipe.ml.loops import pick_device, predict_batches, prepare
from tilepipe.ml.metrics import confusion, majority_baseline, summarize
from tilepipe.ml.plots import plot_confusion
from tilepipe.ml.uncertainty import scene_intervals, shown, with_intervals
from tilepipe.params import Params
from tilepipe.tiles.store import SceneTiles

PIXEL_SAMPLE_STEP = 8  # segmentation plot data keeps every 8th pixel per axis of each tile


@dataclass
class TileScores:
    """Confusion matrices per test scene, the plot rows, the summed loss and ECE bins of one model's pass."""

    ref: TileRef
    per_scene: np.ndarray
    rows: list[str]
    total_loss: float
    temperature: float = 1.0  # the model's (meta.temperature)
    uncalibrated: CalibrationBins = field(default_factory=CalibrationBins)  # softmax(logits)
    calibrated: CalibrationBins = field(default_factory=CalibrationBins)  # softmax(logits / temperature)


def held_out_batches(
    stores: dict[str, SceneTiles], ref: TileRef, members: dict[str, list[int] | None], meta: ModelMeta
) -> TileBatches:
    """The test tiles as the model takes them: its normalisation with its statistics.

    ``scene`` normalisation uses each test scene's own figures, from that scene's tiles.
    """
    norm = meta.norm
    scenes = scene_scales(stores, members) if norm.per_scene else None
    return TileBatches(stores, ref, meta.task, norm=norm, scenes=scenes)


def score_test_tiles(
    params: Params, model: nn.Module, meta: ModelMeta, tiles_dir: Path, split_json: Path
) -> TileScores:
    """Run the model over every labelled tile of the test split, scene by scene.

    Every tile with a labelled pixel is scored (a classification tile against its majority class),
    not only the tiles pure enough for training (``train.min_purity``): the headline figure covers
    the whole of the test scenes' labelled tiles.
    """
    classes, task = meta.classes, meta.task
    n_classes = len(classes)
    members = split_members(split_json, "test")
    if not members:
        raise TilepipeError(f"{split_json}: the test split is empty")
    stores = open_stores(tiles_dir, sorted(members))
    ref = select_tiles(stores, members, task, 0.0)
    if len(ref.tile) == 0:
        raise TilepipeError(f"{split_json}: the test split has no usable tile")
    device = pick_device(params.train.precision)
    model = prepare(model, device, params.train.precision)
    batches = held_out_batches(stores, ref, members, meta)
    loader = make_loader(batches, params.evaluate.batch_size, 0, False, 0)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    cms = np.zeros((len(ref.scene_ids), n_classes, n_classes), np.int64)
    scores = TileScores(ref, cms, [], 0.0, meta.temperature)
    scores.rows.append("scene,actual,predicted")
    position = 0
    for logits, y in predict_batches(model, loader, device, params.train.precision):
        scenes = ref.scene[position : position + len(y)]
        position += len(y)
        scores.total_loss += float(loss_fn(logits, y)) * len(y)  # of the raw logits (T = 1)
        scores.uncalibrated.add_logits(logits, y)
        scores.calibrated.add_logits(logits, y, meta.temperature)
        _add_batch(scores, scenes, y.numpy(), logits.argmax(dim=1).numpy(), classes, task)
    return scores


def _add_batch(
    scores: TileScores, scenes: np.ndarray, actual: np.ndarray, predicted: np.ndarray, classes, task: str
) -> None:
    """Add one batch to its scenes' confusion matrices and (decimated for pixels) to the plot rows."""
    n_classes = len(classes)
    for s in np.unique(scenes):
        pick = scenes == s
        a, p = actual[pick], predicted[pick]
        scores.per_scene[s] += confusion(a, p, n_classes)
        if task == "segmentation":
            a = a[:, ::PIXEL_SAMPLE_STEP, ::PIXEL_SAMPLE_STEP]
            p = p[:, ::PIXEL_SAMPLE_STEP, ::PIXEL_SAMPLE_STEP]
        keep = (a >= 0) & (a < n_classes)
        scene_id = scores.ref.scene_ids[s]
        pairs = zip(a[keep], p[keep], strict=True)
        scores.rows += [f"{scene_id},{classes[i]},{classes[j]}" for i, j in pairs]


def tile_metrics(scores: TileScores, classes: list[str], train_counts: np.ndarray) -> dict[str, Any]:
    """Test metrics of the tiles, the majority baseline (from the training counts) and per scene."""
    cm = scores.per_scene.sum(axis=0)
    summary = summarize(cm, classes)
    baseline = majority_baseline(train_counts, cm, classes)
    intervals = scene_intervals(scores.per_scene, classes)
    metrics = {
        "accuracy": round(summary["accuracy"], 4),
        "macro_f1": round(summary["macro_f1"], 4),
        "miou": round(summary["miou"], 4),
        "loss": round(scores.total_loss / max(len(scores.ref.tile), 1), 4),
        "ece": round(scores.calibrated.ece(), 4),  # 15 bins, softmax(logits / temperature)
        "ece_uncalibrated": round(scores.uncalibrated.ece(), 4),  # the same, T = 1
        "temperature": round(scores.temperature, 4),
        "baseline_accuracy": round(baseline["accuracy"], 4),
        "baseline_macro_f1": round(baseline["macro_f1"], 4),
        "baseline_miou": round(baseline["miou"], 4),
        "test_scenes": len(scores.ref.scene_ids),
        "test_tiles": len(scores.ref.tile),
        "per_scene_accuracy": {
            scene_id: round(summarize(scores.per_scene[i], classes)["accuracy"], 4)
            for i, scene_id in enumerate(scores.ref.scene_ids)
        },
        "per_class": {  # with what training had of each class: tiles, or pixels for segmentation
            name: {**scores, "train_examples": int(train_counts[i])}
            for i, (name, scores) in enumerate(summary["per_class"].items())
        },
    }
    return with_intervals(metrics, intervals)


def write_evaluation(
    out_dir: Path, metrics: dict[str, Any], scores: TileScores, classes: list[str], task: str
) -> None:
    """metrics.json, the plot data, the confusion matrix (JSON and PNG) and the text report."""
    cm = scores.per_scene.sum(axis=0)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "test_predictions.csv", "\n".join(scores.rows) + "\n")
    write_json(out_dir / "test_confusion.json", {"classes": classes, "matrix": cm.tolist()})
    write_json(out_dir / "scene_confusion.json", scene_confusion(scores, classes))
    plot_confusion(cm, classes, out_dir / "test_confusion.png", f"Test scenes ({task})")
    write_text(out_dir / "report.txt", class_report(metrics, classes))


def scene_confusion(scores: TileScores, classes: list[str]) -> dict[str, Any]:
    """Each test scene's tile confusion matrix: what a later comparison resamples (the champion rule)."""
    return {
        "classes": classes,
        "unit": "tile",
        "scenes": {scene_id: scores.per_scene[i].tolist() for i, scene_id in enumerate(scores.ref.scene_ids)},
    }


def evaluate(
    params: Params,
    model_dir: Path,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    more_metrics: Callable[[ModelMeta], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score the best model on the test split; write ``metrics.json``, plot data and a PNG.

    ``more_metrics(meta)`` adds metrics computed beside the tiles' (the full-scene maps' ``map_*``).
    """
    model, meta = load_model(Path(model_dir) / "model.pt")
    classes = meta.classes
    scores = score_test_tiles(params, model, meta, tiles_dir, split_json)
    train_counts = np.asarray(json.loads((Path(model_dir) / "train.json").read_text())["train_class_counts"])
    metrics = tile_metrics(scores, classes, train_counts)
    out_dir.mkdir(parents=True, exist_ok=True)
    if more_metrics is not None:
        metrics.update(more_metrics(meta))
    write_evaluation(out_dir, metrics, scores, classes, meta.task)
    for warning in small_test_warnings(metrics, params):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"evaluate: {metrics['test_scenes']} test scene(s), {metrics['test_tiles']} tiles: "
        f"accuracy {shown(metrics, 'accuracy')} (baseline {metrics['baseline_accuracy']:.3f}), "
        f"macro-F1 {shown(metrics, 'macro_f1')} (baseline {metrics['baseline_macro_f1']:.3f}), "
        f"mIoU {shown(metrics, 'miou')} (baseline {metrics['baseline_miou']:.3f})"
    )
    return metrics


def small_test_warnings(metrics: dict[str, Any], params: Params) -> list[str]:
    """Say when the test set is too small for its numbers to mean much."""
    warnings = []
    if metrics["test_scenes"] < params.evaluate.min_test_scenes:
        warnings.append(
            f"only {metrics['test_scenes']} test scene(s): scores on so few places say little "
            "about unseen ones"
        )
    if metrics["test_tiles"] < params.evaluate.min_test_tiles:
        warnings.append(f"only {metrics['test_tiles']} test tiles: the scores are noisy")
    return warnings


def class_report(metrics: dict[str, Any], classes: list[str]) -> str:
    """A plain-text per-class report, each figure with its scene-bootstrap interval where there is one."""
    width = max(12, *(len(name) for name in classes))
    columns = f"{'precision':>9} {'recall':>9} {'f1':>9} {'f1 95% interval':>16} {'iou':>9} {'support':>9}"
    lines = [
        f"{metrics['test_tiles']} labelled test tiles in {metrics['test_scenes']} scene(s); {metrics['ci']}",
        f"{'class':<{width}} {columns} {'trained on':>10}",
    ]
    for name in classes:
        c = metrics["per_class"][name]
        band = f"[{c['f1_ci'][0]:.3f}, {c['f1_ci'][1]:.3f}]" if c.get("f1_ci") else "-"
        lines.append(
            f"{name:<{width}} {c['precision']:>9.3f} {c['recall']:>9.3f} {c['f1']:>9.3f} {band:>16} "
            f"{c['iou']:>9.3f} {c['support']:>9} {c.get('train_examples', ''):>10}"
        )
    lines.append(
        f"accuracy {shown(metrics, 'accuracy')}  macro-F1 {shown(metrics, 'macro_f1')}  "
        f"mIoU {shown(metrics, 'miou')}"
    )
    if "map_accuracy" in metrics:
        lines.append(
            f"full-scene maps of {metrics['map_scenes']} scene(s), per {metrics.get('map_unit', 'cell')}: "
            f"accuracy {shown(metrics, 'map_accuracy')}  macro-F1 {shown(metrics, 'map_macro_f1')}  "
            f"mIoU {shown(metrics, 'map_miou')}"
        )
    if "ece" in metrics:
        lines.append(
            f"calibration (15-bin ECE): {metrics['ece']:.4f} at temperature {metrics['temperature']:.3f}, "
            f"{metrics['ece_uncalibrated']:.4f} uncalibrated"
        )
    lines.append(
        f"majority baseline: accuracy {metrics['baseline_accuracy']:.4f}  "
        f"macro-F1 {metrics['baseline_macro_f1']:.4f}"
    )
    lines.append("trained on: the training split's tiles of each class (labelled pixels for segmentation)")
    return "\n".join(lines) + "\n"
