"""Band normalisation and photometric augmentation against today's default, on held-out scenes.

`python -m benchmarks normalization` (named only, like `seeds`: 6 options x 3 seeds of full trainings,
about 1.5 hours on 2 quiet cores). The seed picks the scene split, so each seed holds out other whole
scenes: the seeds are repeats over scene splits. Per seed: split and analyze once, then per option
train (no MLflow run) and score the test tiles (``metrics/scene_confusion.json``). Per seed and option:
macro-F1, and the paired scene-bootstrap difference to the default on the same test scenes with its
95 % interval (``tilepipe.ml.uncertainty.paired_difference``). Across seeds: the mean difference with
a t interval (``across_values``). An option "wins" only where that interval lies wholly above 0, and
only a winner should become the default; with one seed (one split), that seed's paired interval
decides. Results: benchmarks/.work/normalization/results.json and table.md, and a flat entry of the
machine's results file (per option its score, the difference to the default, its interval and the
verdict), which docs/tracking.md shows (``python -m benchmarks report``).

``BENCH_SEEDS`` (default 42,43,44), ``BENCH_OPTIONS`` (default: all of ``OPTIONS``) and ``BENCH_EPOCHS``
(default: train.epochs) shorten a run. ``BENCH_FINISHED_ONLY=1`` trains nothing: the entry of the
trainings finished so far (whole seeds; a run cut short).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from benchmarks.common import WORK, run_measured
from benchmarks.datapath import default_data

OPTIONS = {
    "default": [],  # bands.normalize range, train.augment geometric
    "photometric": ["train.augment=photometric"],
    "geometric+photometric": ["train.augment=both"],
    "standardize": ["bands.normalize=standardize"],
    "percentile": ["bands.normalize=percentile"],
    "scene": ["bands.normalize=scene"],
}
SEEDS = [int(s) for s in os.environ.get("BENCH_SEEDS", "42,43,44").split(",")]
CHOSEN = [o for o in os.environ.get("BENCH_OPTIONS", ",".join(OPTIONS)).split(",") if o]
EPOCHS = os.environ.get("BENCH_EPOCHS")
OUT = WORK / "normalization"
METRIC = "macro_f1"

PREPARE = """
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.analyze import analyze
from tilepipe.stages.split import split
work, tiles, scenes = Path({work!r}), Path({tiles!r}), Path({scenes!r})
p = load_params("params.yaml", ["seed={seed}"])
split(p, scenes, tiles, work / "split.json")
analyze(p, scenes, tiles, work / "split.json", work / "stats.json")
"""

CHILD = """
import json
from pathlib import Path
from tilepipe.ml.evaluation import evaluate
from tilepipe.ml.training import train
from tilepipe.params import load_params
work, tiles, out = Path({work!r}), Path({tiles!r}), Path({out!r})
p = load_params("params.yaml", {sets!r})
train(p, tiles, work / "split.json", out / "models", stats_json=work / "stats.json")
evaluate(p, out / "models", tiles, work / "split.json", out / "metrics")
print(json.dumps(json.loads((out / "metrics" / "scene_confusion.json").read_text())))
"""


def compare(per_option: dict[str, dict[str, list]], metric: str = METRIC) -> dict[str, Any]:
    """Per option, each seed's score and paired difference to ``default``; the mean difference across seeds.

    ``per_option[option][seed]``: that run's ``scene_confusion.json`` ``scenes`` (scene_id -> K x K).
    """
    from tilepipe.ml.uncertainty import across_values, batch_scores, paired_difference

    rows: dict[str, Any] = {}
    base = per_option["default"]
    for option, seeds in per_option.items():
        row: dict[str, Any] = {"seeds": {}}
        for seed, scenes in seeds.items():
            order = sorted(scenes)
            new = np.asarray([scenes[s] for s in order])
            old = np.asarray([base[seed][s] for s in order])
            diff, interval = paired_difference(new, old, metric)
            score = round(float(batch_scores(new.sum(axis=0))[metric]), 4)
            row["seeds"][seed] = {metric: score, "difference": diff, "difference_ci": interval}
        row["across_seeds"] = across_values([s["difference"] for s in row["seeds"].values()])
        ci = row["across_seeds"]["ci"]
        if len(row["seeds"]) == 1:  # one scene split: its paired scene-bootstrap interval decides
            ci = next(iter(row["seeds"].values()))["difference_ci"]
        row["deciding_ci"] = ci
        wins = "wins" if ci and ci[0] > 0 else ("loses" if ci and ci[1] < 0 else "no difference shown")
        row["verdict"] = "default" if option == "default" else wins
        rows[option] = row
    return rows


def markdown(rows: dict[str, Any], metric: str = METRIC) -> str:
    """The table for docs/tracking.md: per option, score per seed, mean difference and its interval."""
    seeds = list(next(iter(rows.values()))["seeds"])
    head = f"| option | {metric} per seed ({', '.join(map(str, seeds))}) | difference to default, " \
           "per seed [95 % scene bootstrap] | mean difference [95 % t interval] | verdict |"  # fmt: skip
    lines = [head, "|---|---|---|---|---|"]
    for option, row in rows.items():
        scores = ", ".join(f"{row['seeds'][s][metric]:.3f}" for s in seeds)
        diffs = ", ".join(_with_interval(row["seeds"][s]["difference"], row["seeds"][s]["difference_ci"])
                          for s in seeds)  # fmt: skip
        across = row["across_seeds"]
        lines.append(f"| {option} | {scores} | {diffs} | {_with_interval(across['mean'], across['ci'])} | "
                     f"{row['verdict']} |")  # fmt: skip
    return "\n".join(lines)


def _with_interval(value: float, interval: list[float] | None) -> str:
    return f"{value:+.3f}" + (f" [{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "")


def run() -> dict:
    """Train and score every option under every seed (or take the finished ones); the figures entry."""
    if os.environ.get("BENCH_FINISHED_ONLY") == "1":
        result = from_disk()
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        note = f"the trainings finished by {now}; this entry only summarises them"
        return {**entry(result), "notes": [note]}
    tiles, split_json = default_data()
    scenes = split_json.parent / "scenes.json"
    options = ["default", *[c for c in CHOSEN if c != "default"]]
    per_option: dict[str, dict[str, list]] = {o: {} for o in options}
    for seed in SEEDS:
        work = OUT / str(seed)
        run_measured(PREPARE.format(work=str(work), tiles=str(tiles), scenes=str(scenes), seed=seed))
        for option in per_option:
            sets = [f"seed={seed}", *OPTIONS[option], *([f"train.epochs={EPOCHS}"] if EPOCHS else [])]
            out = work / option
            child = CHILD.format(work=str(work), tiles=str(tiles), out=str(out), sets=sets)
            done = run_measured(child)
            per_option[option][str(seed)] = json.loads(done.stdout.strip().splitlines()[-1])["scenes"]
            print(f"  seed {seed} {option}: {done.seconds:.0f} s", flush=True)
    result = _save(compare(per_option), SEEDS)
    print(markdown(result["options"]), flush=True)
    return entry(result)


def _save(rows: dict[str, Any], seeds: list[int], **more: Any) -> dict:
    """The comparison as results.json and table.md under OUT; returned."""
    from tilepipe.fsutil import write_json

    result = {"seeds": seeds, "epochs": EPOCHS or "train.epochs", "metric": METRIC, "options": rows, **more}
    write_json(OUT / "results.json", result)
    (OUT / "table.md").write_text(markdown(rows) + "\n")
    return result


def entry(result: dict) -> dict:
    """The flat figures of a comparison (machine results file): per option score, difference, verdict."""
    figures: dict = {"seeds": ",".join(map(str, result["seeds"])), "epochs": str(result["epochs"])}
    for option, row in result["options"].items():
        name = option.replace("+", "_")
        runs = list(row["seeds"].values())
        figures[f"{name}_{METRIC}"] = round(float(np.mean([r[METRIC] for r in runs])), 4)
        if option == "default":
            continue
        ci = row["deciding_ci"]
        figures[f"{name}_difference"] = round(float(row["across_seeds"]["mean"]), 4)
        figures[f"{name}_difference_ci_low"] = ci[0] if ci else None
        figures[f"{name}_difference_ci_high"] = ci[1] if ci else None
        figures[f"{name}_verdict"] = row["verdict"]
    return figures


def from_disk() -> dict:
    """The comparison over the trainings finished so far (a run cut short), written as ``run`` does.

    From the ``scene_confusion.json`` of every option of every seed whose default has run; an option
    counts only where it ran under every such seed.
    """
    per_option: dict[str, dict[str, list]] = {}
    for seed in SEEDS:
        done = {o: OUT / str(seed) / o / "metrics" / "scene_confusion.json" for o in OPTIONS}
        done = {o: path for o, path in done.items() if path.is_file()}
        if "default" not in done:
            continue
        for option, path in done.items():
            per_option.setdefault(option, {})[str(seed)] = json.loads(path.read_text())["scenes"]
    seeds = sorted(per_option["default"])
    per_option = {o: runs for o, runs in per_option.items() if sorted(runs) == seeds}  # every seed run
    return _save(compare(per_option), [int(s) for s in seeds], finished_only=True)


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
