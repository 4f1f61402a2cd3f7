"""The study's result: per-size table, CSV (``dvc plots`` data), JSON, PNG and a terminal summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tilepipe.fsutil import write_json, write_text  # noqa: E402
from tilepipe.ml.plots import save_png  # noqa: E402

COLUMNS = (
    "kind",
    "size",
    "repeat",
    "seed",
    "scenes",
    "train_tiles",
    "epochs",
    "best_epoch",
    "heldout",
    "self",
)


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": len(arr),
        "mean": round(float(arr.mean()), 4),
        "std": round(float(arr.std()), 4),
        "min": round(float(arr.min()), 4),
        "max": round(float(arr.max()), 4),
    }


def summarise(plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Held-out score per number of training scenes (spread over repeats) and the trap's two scores."""
    scenes = [r for r in rows if r["kind"] == "scenes"]
    traps = [r for r in rows if r["kind"] == "trap"]
    by_size = {size: _stats([r["heldout"] for r in scenes if r["size"] == size]) for size in plan["sizes"]}
    summary: dict[str, Any] = {
        "metric": plan["metric"],
        "train_tiles": plan["train_tiles"],
        "epochs": plan["epochs"],
        "test_scenes": plan["test_scenes"],
        "by_size": {str(k): v for k, v in by_size.items()},
    }
    if traps:
        summary["trap"] = {
            "self": _stats([r["self"] for r in traps]),
            "heldout": _stats([r["heldout"] for r in traps]),
            "scenes": [r["scenes"] for r in traps],
        }
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def study_csv(rows: list[dict[str, Any]]) -> str:
    """One line per training: held-out score and, for trap rows, the self-score (``dvc plots`` data)."""
    lines = [",".join(COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["kind"] != "scenes", r["size"], r["repeat"])):
        lines.append(",".join(_cell(row[c]) for c in COLUMNS))
    return "\n".join(lines) + "\n"


def plot_study(summary: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out score against training scenes with the spread; the trap's self-score as its own marker."""
    metric = summary["metric"]
    sizes = [int(k) for k in summary["by_size"]]
    means = [summary["by_size"][str(s)]["mean"] for s in sizes]
    lows = [summary["by_size"][str(s)]["min"] for s in sizes]
    highs = [summary["by_size"][str(s)]["max"] for s in sizes]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.fill_between(sizes, lows, highs, color="tab:blue", alpha=0.15, label="spread across repeats (min-max)")
    points = [r for r in rows if r["kind"] == "scenes"]
    ax.scatter([r["size"] for r in points], [r["heldout"] for r in points], s=18, color="tab:blue", alpha=0.6)
    ax.plot(sizes, means, marker="o", color="tab:blue", label="held-out test scenes (mean)")
    traps = [r for r in rows if r["kind"] == "trap"]
    if traps:
        x = np.full(len(traps), 1.0 + 0.03 * (sizes[-1] - sizes[0] or 1))  # beside the 1-scene points
        ax.scatter(x, [r["self"] for r in traps], marker="*", s=160, color="tab:red", zorder=3,
                   label="single-scene trap: other blocks of the same scene")  # fmt: skip
        ax.scatter(x, [r["heldout"] for r in traps], marker="x", s=60, color="tab:red", zorder=3,
                   label="same trap models on the held-out scenes")  # fmt: skip
    ax.set_xticks(sizes)
    ax.set_xlabel("training scenes")
    ax.set_ylabel(f"{metric} on held-out test scenes")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        f"Scene-scaling study: {summary['train_tiles']} training tiles x {summary['epochs']} epochs "
        "per model",
        fontsize=10,
    )
    save_png(fig, path)


def write_outputs(out: Path, plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write study.json, study.csv and study.png under ``out``; return the summary."""
    summary = summarise(plan, rows)
    slim = [{k: v for k, v in r.items() if not k.endswith("_metrics")} for r in rows]
    plan_doc = {k: v for k, v in plan.items() if k != "trainings"}
    write_json(out / "study.json", {"plan": plan_doc, "summary": summary, "trainings": slim})
    write_text(out / "study.csv", study_csv(rows))
    plot_study(summary, rows, out / "study.png")
    return summary


def terminal_table(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    metric = summary["metric"]
    lines = [
        f"study: held-out {metric} on {len(summary['test_scenes'])} test scene(s) "
        f"({' '.join(summary['test_scenes'])}); {summary['train_tiles']} training tiles x "
        f"{summary['epochs']} epochs per training",
        f"  {'scenes':>6} {'runs':>5} {'mean':>7} {'std':>7} {'min':>7} {'max':>7}",
    ]
    for size, s in summary["by_size"].items():
        lines.append(
            f"  {size:>6} {s['n']:>5} {s['mean']:>7.3f} {s['std']:>7.3f} {s['min']:>7.3f} {s['max']:>7.3f}"
        )
    if "trap" in summary:
        trap = summary["trap"]
        lines.append(
            f"  single-scene trap ({', '.join(trap['scenes'])}): self-score {trap['self']['mean']:.3f} "
            f"(other blocks of the same scene) vs {trap['heldout']['mean']:.3f} on the held-out scenes"
        )
    return "\n".join(lines)
