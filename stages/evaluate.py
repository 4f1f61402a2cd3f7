"""Evaluate stage: score the trained model on the held-out test scenes only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from stages.dataset import TileBatches, make_loader, open_stores, select_tiles, split_members
from stages.errors import TilepipeError
from stages.fsutil import write_json, write_text
from stages.loops import pick_device, predict_batches, prepare
from stages.metrics import confusion, majority_baseline, summarize
from stages.params import Params
from stages.plots import plot_confusion
from stages.train import load_model

PIXEL_SAMPLE_STEP = 8  # segmentation plot data keeps every 8th pixel per axis of each tile


def evaluate(
    params: Params,
    model_dir: Path,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    maps_dir: Path | None = None,
    scenes_json: Path | None = None,
) -> dict[str, Any]:
    """Score the best model on the test split; write ``metrics.json``, plot data and a PNG.

    With ``maps_dir`` (the predict stage's maps of the held-out scenes) and ``scenes_json`` it
    also scores the full-scene maps (``map_*`` metrics, ``scenes/`` with a preview PNG each).
    """
    model, meta = load_model(Path(model_dir) / "model.pt")
    classes, task = meta["classes"], meta["task"]
    n_classes = len(classes)
    members = split_members(split_json, "test")
    if not members:
        raise TilepipeError(f"{split_json}: the test split is empty")
    stores = open_stores(tiles_dir, sorted(members))
    ref = select_tiles(stores, members, task, params.train.min_purity)
    if len(ref.tile) == 0:
        raise TilepipeError(f"{split_json}: the test split has no usable tile")
    device = pick_device(params.train.precision)
    model = prepare(model, device, params.train.precision)
    loader = make_loader(TileBatches(stores, ref, task), params.evaluate.batch_size, 0, False, 0)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    per_scene = np.zeros((len(ref.scene_ids), n_classes, n_classes), dtype=np.int64)
    rows: list[str] = ["scene,actual,predicted"]
    total_loss, position = 0.0, 0
    for logits, y in predict_batches(model, loader, device, params.train.precision):
        predicted = logits.argmax(dim=1).numpy()
        actual = y.numpy()
        scenes = ref.scene[position : position + len(y)]
        position += len(y)
        total_loss += float(loss_fn(logits, y)) * len(y)
        for s in np.unique(scenes):
            pick = scenes == s
            per_scene[s] += confusion(actual[pick], predicted[pick], n_classes)
            a, p = actual[pick], predicted[pick]
            if task == "segmentation":
                a = a[:, ::PIXEL_SAMPLE_STEP, ::PIXEL_SAMPLE_STEP]
                p = p[:, ::PIXEL_SAMPLE_STEP, ::PIXEL_SAMPLE_STEP]
            keep = (a >= 0) & (a < n_classes)
            scene_id = ref.scene_ids[s]
            rows += [f"{scene_id},{classes[i]},{classes[j]}" for i, j in zip(a[keep], p[keep], strict=True)]
    cm = per_scene.sum(axis=0)
    scores = summarize(cm, classes)
    train_counts = np.asarray(json.loads((Path(model_dir) / "train.json").read_text())["train_class_counts"])
    baseline = majority_baseline(train_counts, cm, classes)
    metrics = {
        "accuracy": round(scores["accuracy"], 4),
        "macro_f1": round(scores["macro_f1"], 4),
        "miou": round(scores["miou"], 4),
        "loss": round(total_loss / max(len(ref.tile), 1), 4),
        "baseline_accuracy": round(baseline["accuracy"], 4),
        "baseline_macro_f1": round(baseline["macro_f1"], 4),
        "baseline_miou": round(baseline["miou"], 4),
        "test_scenes": len(ref.scene_ids),
        "test_tiles": len(ref.tile),
        "per_scene_accuracy": {
            scene_id: round(summarize(per_scene[i], classes)["accuracy"], 4)
            for i, scene_id in enumerate(ref.scene_ids)
        },
        "per_class": scores["per_class"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if maps_dir is not None:
        metrics.update(score_maps(params, meta, split_json, Path(maps_dir), scenes_json, out_dir / "scenes"))
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "test_predictions.csv", "\n".join(rows) + "\n")
    write_json(out_dir / "test_confusion.json", {"classes": classes, "matrix": cm.tolist()})
    plot_confusion(cm, classes, out_dir / "test_confusion.png", f"Test scenes ({task})")
    write_text(out_dir / "report.txt", class_report(metrics, classes))
    for warning in small_test_warnings(metrics, params):
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"evaluate: {metrics['test_scenes']} test scene(s), {metrics['test_tiles']} tiles: "
        f"accuracy {metrics['accuracy']:.3f} (baseline {metrics['baseline_accuracy']:.3f}), "
        f"macro-F1 {metrics['macro_f1']:.3f} (baseline {metrics['baseline_macro_f1']:.3f}), "
        f"mIoU {metrics['miou']:.3f} (baseline {metrics['baseline_miou']:.3f})"
    )
    return metrics


def score_maps(
    params: Params,
    meta: dict[str, Any],
    split_json: Path,
    maps_dir: Path,
    scenes_json: Path | None,
    out_dir: Path,
) -> dict[str, Any]:
    """``map_*`` metrics of the held-out scenes' full-scene maps (stages/scene_eval.py)."""
    from stages.scene_eval import evaluate_scenes, held_out_scenes

    if scenes_json is None:
        raise TilepipeError(
            "evaluate: scoring maps needs the ingest record (--scenes data/ingest/scenes.json)"
        )
    records = held_out_scenes(Path(scenes_json), split_json)
    if not records:
        print("evaluate: no test scene is held out whole (split.spatial_blocks), so no map is scored")
        return {"map_scenes": 0}
    result = evaluate_scenes(params, meta, records, maps_dir, out_dir)
    overall = result["overall"]
    print(
        f"evaluate: full-scene maps of {len(records)} held-out scene(s), per {result['unit']}: "
        f"accuracy {overall['accuracy']:.3f}, macro-F1 {overall['macro_f1']:.3f}, mIoU {overall['miou']:.3f}"
    )
    return {
        "map_accuracy": overall["accuracy"],
        "map_macro_f1": overall["macro_f1"],
        "map_miou": overall["miou"],
        "map_scenes": len(records),
        "map_unit": result["unit"],
    }


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
    """A plain-text per-class report."""
    lines = [f"{'class':<12} {'precision':>9} {'recall':>9} {'f1':>9} {'iou':>9} {'support':>9}"]
    for name in classes:
        c = metrics["per_class"][name]
        lines.append(
            f"{name:<12} {c['precision']:>9.3f} {c['recall']:>9.3f} {c['f1']:>9.3f} {c['iou']:>9.3f} "
            f"{c['support']:>9}"
        )
    lines.append(
        f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  mIoU {metrics['miou']:.4f}"
    )
    lines.append(
        f"majority baseline: accuracy {metrics['baseline_accuracy']:.4f}  "
        f"macro-F1 {metrics['baseline_macro_f1']:.4f}"
    )
    return "\n".join(lines) + "\n"
