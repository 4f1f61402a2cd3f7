"""Scene-grouped cross-validation (``tilepipe cv``): one training per fold, as the study runs them.

Each fold is a whole-scene split (tilepipe/study/folds.py) trained with ``train.*`` as
``tilepipe train`` would, in its own process with ``study.threads`` threads and ``study.parallel``
at once (tilepipe/study/runner.py), as a child MLflow run of one ``cv`` parent run. The result,
``metrics/cv.json``, holds each fold's held-out scores, their mean, standard deviation and 95 %
t interval across folds, and the pooled figure of every scene scored by the fold that held it out.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.geo.scenes import read_scene_records
from tilepipe.ml.dataset import open_stores
from tilepipe.ml.uncertainty import METRICS, across_values, batch_scores, interval_note, scene_intervals
from tilepipe.params import Params
from tilepipe.study.folds import assign_folds, fold_members, labelled_scenes
from tilepipe.study.plan import METRIC, usable
from tilepipe.tracking.runs import log_cv, params_hash, training_run

ACROSS = "mean, sample standard deviation and 95 % Student t interval of the fold scores"


def require_inputs(scenes_json: Path, tiles_dir: Path) -> None:
    """Fail in one line, before anything is written, when ingest or tile has not run."""
    for path, stage in ((Path(scenes_json), "ingest"), (Path(tiles_dir), "tile")):
        if not path.exists():
            raise TilepipeError(f"{path}: not found; run `dvc repro {stage}` (or `tilepipe {stage}`) first")


def plan_cv(params: Params, scenes_json: Path, tiles_dir: Path, out: Path) -> dict[str, Any]:
    """Assign the folds, write each fold's split under ``out/runs`` and ``out/folds.json``; the plan."""
    scenes = labelled_scenes(read_scene_records(scenes_json), tiles_dir, len(params.data.classes))
    ids = [s.scene_id for s in scenes]
    pinned = {s.scene_id: s.split for s in scenes if s.split}
    folds = assign_folds(ids, pinned, params.cv.folds, params.seed, params.split.ratios, Path(scenes_json))
    work = Path(out) / "runs"
    if work.exists():  # only now: folds that cannot be made leave the last run's files alone
        shutil.rmtree(work)
    stores = open_stores(tiles_dir, ids)
    trainings = [_fold_training(params, work, i + 1, fold, stores) for i, fold in enumerate(folds)]
    folds_json = Path(out) / "folds.json"
    members = {f"fold{i + 1}": dict.fromkeys(fold["test"]) for i, fold in enumerate(folds)}
    write_json(folds_json, {"mode": "cv", "members": members, "folds": folds})
    return {
        "folds": len(folds),
        "scenes": ids,
        "tested": sorted(s for fold in folds for s in fold["test"]),
        "metric": METRIC[params.train.task],
        "epochs": params.train.epochs,
        "seed": params.seed,
        "folds_json": str(folds_json),
        "trainings": trainings,
    }


def _fold_training(params: Params, work: Path, number: int, fold: dict[str, list[str]], stores) -> dict:
    """One fold as the study's runner takes a training: its split file, seed, epochs and run tags."""
    folder = work / f"fold{number}"
    write_json(folder / "split.json", {"mode": "cv-fold", "members": fold_members(fold)})
    tiles = sum(len(usable(stores, s, params)) for s in fold["train"])
    return {
        "name": f"fold{number}",
        "kind": "fold",
        "size": len(fold["train"]),
        "repeat": 0,
        "seed": params.seed,
        "scenes": tuple(fold["train"]),
        "train_tiles": tiles,
        "dir": str(folder.resolve()),
        "epochs": params.train.epochs,
        "heldout_split": str((folder / "split.json").resolve()),
        "run_name": f"cv-fold{number}",
        "fold": {"number": number, **fold},
        "tags": {
            "cv.fold": str(number),
            "cv.folds": str(params.cv.folds),
            **{f"cv.{name}_scenes": " ".join(fold[name]) for name in ("train", "val", "test")},
        },
    }


@contextmanager
def cv_parent_run(params: Params, plan: dict[str, Any]) -> Iterator[str]:
    """The cross-validation's MLflow run; yields its id for the folds' child runs."""
    tags = {"cv": "scene-grouped", "cv.folds": str(plan["folds"]), "cv.scenes": " ".join(plan["scenes"])}
    name = f"cv{plan['folds']}-{params.train.model}-w{params.train.width}-{params_hash(params)}"
    with training_run(params, Path(plan["folds_json"]), name=name, tags=tags) as run:
        yield run.info.run_id


def summarise_cv(plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """cv.json: per-fold held-out scores, mean / std / 95 % interval across folds, the pooled figure."""
    per_fold, matrices, classes = [], [], None
    for training, row in zip(plan["trainings"], rows, strict=True):
        heldout = Path(training["dir"]) / "heldout"
        metrics = json.loads((heldout / "metrics.json").read_text())
        confusion = json.loads((heldout / "scene_confusion.json").read_text())
        classes = confusion["classes"]
        matrices += list(confusion["scenes"].values())
        fold = training["fold"]
        per_fold.append({
            "fold": fold["number"],
            **{name: fold[name] for name in ("test", "val", "train")},
            "train_tiles": training["train_tiles"],
            "test_tiles": metrics["test_tiles"],
            **{key: metrics[key] for key in METRICS},
            **{f"{key}_ci": metrics.get(f"{key}_ci") for key in METRICS},
            "best_epoch": row["best_epoch"],
            "run_id": row.get("run_id"),
        })  # fmt: skip
    return {
        "folds": plan["folds"],
        "scenes": len(plan["tested"]),
        "tested": plan["tested"],
        "not_tested": sorted(set(plan["scenes"]) - set(plan["tested"])),
        "metric": plan["metric"],
        "epochs": plan["epochs"],
        "seed": plan["seed"],
        "summary": {key: across_values([f[key] for f in per_fold]) for key in METRICS},
        "across": ACROSS,
        "pooled": pooled(np.asarray(matrices), classes or []),
        "per_fold": per_fold,
    }


def pooled(per_scene: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Every tested scene scored by the fold model that never saw it, summed; a scene-bootstrap interval."""
    scores = batch_scores(per_scene.sum(axis=0))
    intervals = scene_intervals(per_scene, classes)
    out: dict[str, Any] = {key: round(float(scores[key]), 4) for key in METRICS}
    for key in METRICS:
        out[f"{key}_ci"] = None if intervals is None else intervals[key]
    out["ci"] = interval_note(intervals is not None)
    return out


def finish_cv(
    plan: dict[str, Any], rows: list[dict[str, Any]], cv_json: Path, parent_run_id: str
) -> dict[str, Any]:
    """Write cv.json, log it and the fold scores to the parent run, print the table."""
    doc = {**summarise_cv(plan, rows), "run_id": parent_run_id}
    write_json(cv_json, doc)
    log_cv(parent_run_id, doc, Path(cv_json))
    print(cv_table(doc))
    print(f"cv: wrote {cv_json}; MLflow parent run {parent_run_id}")
    return doc


def cv_table(doc: dict[str, Any]) -> str:
    """The folds and their summary as a terminal table."""
    lines = [
        f"cv: {doc['folds']} folds over {doc['scenes']} scenes, {doc['epochs']} epoch(s) per training",
        f"  {'fold':>4} {'test scenes':<30} {'tiles':>6} {'accuracy':>9} {'macro_f1':>9} {'miou':>9}",
    ]
    for f in doc["per_fold"]:
        scenes = " ".join(f["test"])
        lines.append(
            f"  {f['fold']:>4} {scenes:<30} {f['test_tiles']:>6} {f['accuracy']:>9.4f} {f['macro_f1']:>9.4f} "
            f"{f['miou']:>9.4f}"
        )
    for label, key in (("mean", "mean"), ("std", "std")):
        values = [doc["summary"][k][key] for k in METRICS]
        lines.append(f"  {label:>4} {'':<30} {'':>6} " + " ".join(_number(v) for v in values))
    bands = {k: doc["summary"][k]["ci"] for k in METRICS}
    shown = [f"{k} {'-' if b is None else f'[{b[0]:.4f}, {b[1]:.4f}]'}" for k, b in bands.items()]
    lines.append("  95 % interval of the mean: " + ", ".join(shown))
    if doc["not_tested"]:
        lines.append(f"  never tested (pinned to train or val): {' '.join(doc['not_tested'])}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.4f}"


def progress(total: int) -> Callable[[dict[str, Any]], None]:
    """A ``done`` callback printing one line per finished fold."""
    started, count = time.perf_counter(), [0]

    def report(row: dict[str, Any]) -> None:
        count[0] += 1
        print(
            f"cv: {row['name']} held-out {row['heldout']:.3f} (accuracy {row['heldout_accuracy']:.3f}) "
            f"[{count[0]}/{total}, {time.perf_counter() - started:.0f} s]",
            flush=True,
        )

    return report
