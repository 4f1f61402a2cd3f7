"""Pretrained on some scenes and fine-tuned on others, against random weights, in the study's terms.

`python -m benchmarks pretrain` (named only: one training and two small studies, about
trainings x a minute or two on 2 quiet cores). On the built-in data with default params
(``datapath.default_data``), the split's training scenes are cut in two, seeded: a pretraining pool
(half, rounded down) and a fine-tuning pool (the rest). A model trained on the pretraining pool
(the split's own val and test scenes) is the init file. Then the scene-scaling study runs twice on
the fine-tuning pool alone at 1 and 2 training scenes (``study.*`` as configured: the same tile
budget, repeats and epochs): from random weights, and with ``train.init`` = that ``model.pt`` and
``train.freeze_epochs`` = 1. Both are scored on the split's test scenes, which no training sees;
no pretraining scene is a fine-tuning scene. Writes ``benchmarks/.work/pretrain/pretrain.json``
and ``pretrain.png`` (docs/pretrained.md shows them).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.common import WORK, run_measured
from benchmarks.datapath import default_data

OUT = WORK / "pretrain"
SIZES = [1, 2]
FREEZE = int(os.environ.get("BENCH_FREEZE_EPOCHS", "1"))

PRETRAIN = """
from pathlib import Path
from tilepipe.ml.training import train
from tilepipe.params import load_params
train(load_params("params.yaml"), Path({tiles!r}), Path({split!r}), Path({out!r}))
"""

STUDY = """
import json
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.study import study
p = load_params("params.yaml", {overrides!r})
summary = study(p, Path({tiles!r}), Path({split!r}), Path({out!r}))
print(json.dumps(summary["by_size"]))
"""


def pools(split_json, seed: int = 0) -> tuple[list[str], list[str], dict]:
    """(pretraining scenes, fine-tuning scenes, the split's members), the training scenes cut in two."""
    members = json.loads(split_json.read_text())["members"]
    scenes = sorted(members["train"])
    order = [scenes[i] for i in np.random.default_rng(seed).permutation(len(scenes))]
    half = len(order) // 2
    if half < 1 or len(order) - half < max(SIZES):
        raise SystemExit(f"{split_json}: {len(scenes)} training scenes are too few to cut in two")
    return sorted(order[:half]), sorted(order[half:]), members


def _split(path, members: dict, train: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"mode": "scenes", "members": {**members, "train": dict.fromkeys(train)}}
    path.write_text(json.dumps(doc, indent=1))


def plot(result: dict, path) -> None:
    """Held-out score against training scenes: each training a dot, the means joined, per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    for (name, runs), colour in zip(result["runs"].items(), ("tab:grey", "tab:blue"), strict=True):
        sizes = [int(s) for s in runs]
        means = [runs[str(s)]["mean"] for s in sizes]
        ax.plot(sizes, means, "-o", color=colour, label=name)
        for s in sizes:
            ax.scatter(
                [s] * len(runs[str(s)]["values"]), runs[str(s)]["values"], color=colour, alpha=0.4, s=12
            )
    ax.set_xticks(SIZES)
    ax.set_xlabel("fine-tuning (training) scenes")
    ax.set_ylabel(f"held-out {result['metric']}")
    ax.set_title("pretrained on other scenes vs random weights", fontsize=10)
    ax.legend(frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run() -> dict:
    """Pretrain, run both studies, write pretrain.json and pretrain.png; per-size held-out figures.

    ``BENCH_FINISHED_ONLY=1``: no training, the figures of the pretrain.json already written.
    """
    if os.environ.get("BENCH_FINISHED_ONLY") == "1":
        written = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((OUT / "pretrain.json").stat().st_mtime))
        note = f"the trainings of pretrain.json, written {written}; this entry only summarises them"
        return {**figures(json.loads((OUT / "pretrain.json").read_text())), "notes": [note]}
    tiles, split_json = default_data()
    pretrain, finetune, members = pools(split_json)
    _split(OUT / "pretrain_split.json", members, pretrain)
    _split(OUT / "finetune_split.json", members, finetune)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{OUT / 'mlflow.db'}"}
    model = OUT / "pretrained"
    run_measured(
        PRETRAIN.format(tiles=str(tiles), split=str(OUT / "pretrain_split.json"), out=str(model)), env
    )
    sizes = "[" + ",".join(map(str, SIZES)) + "]"
    variants = {
        "random": [f"study.sizes={sizes}"],
        "pretrained": [
            f"study.sizes={sizes}",
            f"train.init={model / 'model.pt'}",
            f"train.freeze_epochs={FREEZE}",
        ],
    }
    runs, metric = {}, None
    for name, overrides in variants.items():
        code = STUDY.format(
            overrides=overrides, tiles=str(tiles), split=str(OUT / "finetune_split.json"), out=str(OUT / name)
        )
        run_measured(code, env)
        study = json.loads((OUT / name / "study.json").read_text())
        metric = study["plan"]["metric"]
        rows = [r for r in study["trainings"] if r["kind"] == "scenes"]
        runs[name] = {
            str(s): {
                "values": [r["heldout"] for r in rows if r["size"] == s],
                "mean": float(np.mean([r["heldout"] for r in rows if r["size"] == s])),
            }
            for s in SIZES
        }
    result = {
        "pretrain_scenes": pretrain,
        "finetune_scenes": finetune,
        "test_scenes": sorted(members["test"]),
        "freeze_epochs": FREEZE,
        "metric": metric,
        "runs": runs,
    }
    (OUT / "pretrain.json").write_text(json.dumps(result, indent=1))
    plot(result, OUT / "pretrain.png")
    return figures(result)


def figures(result: dict) -> dict:
    """Per size: each variant's held-out mean with a t interval over the repeats, and the gain.

    The gain is the paired difference pretrained - random (the repeats share their seeded scene
    orders), with its t interval.
    """
    from tilepipe.ml.uncertainty import across_values

    runs, flat = result["runs"], {}
    for size in map(str, SIZES):
        for name in ("random", "pretrained"):
            summary = across_values(runs[name][size]["values"])
            flat[f"{name}_n{size}_heldout_mean"] = summary["mean"]
            flat[f"{name}_n{size}_ci_low"], flat[f"{name}_n{size}_ci_high"] = summary["ci"] or (None, None)
        pairs = zip(runs["pretrained"][size]["values"], runs["random"][size]["values"], strict=True)
        gain = across_values([p - r for p, r in pairs])
        flat[f"gain_n{size}"] = gain["mean"]
        flat[f"gain_n{size}_ci_low"], flat[f"gain_n{size}_ci_high"] = gain["ci"] or (None, None)
    repeats = len(runs["random"][str(SIZES[0])]["values"])
    return {**flat, "repeats": repeats, "written": str(OUT / "pretrain.json")}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
