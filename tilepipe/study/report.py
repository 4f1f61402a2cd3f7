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
from tilepipe.ml.uncertainty import across_values  # noqa: E402

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


def _stats(values: list[float]) -> dict[str, Any]:
    """n, mean, sample std and 95 % t interval of the mean (``across_values``; None for one run), min, max."""
    arr = np.asarray(values, dtype=np.float64)
    return {
        **across_values(list(arr)),
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
    """Held-out score against training scenes, and below it the spread across repeats per size.

    Above: the mean, its 95 % interval, the min-max band and each training; the trap's self-score
    as its own marker. Below: the standard deviation across repeats, which settles as places add up.
    """
    sizes = [int(k) for k in summary["by_size"]]
    stats = [summary["by_size"][str(s)] for s in sizes]
    fig, (ax, low) = plt.subplots(2, 1, figsize=(7.5, 6.6), sharex=True, height_ratios=(3, 1.2))
    ax.fill_between(sizes, [s["min"] for s in stats], [s["max"] for s in stats], color="tab:blue",
                    alpha=0.12, label="spread across repeats (min-max)")  # fmt: skip
    banded = [(size, s["mean"], *s["ci"]) for size, s in zip(sizes, stats, strict=True) if s.get("ci")]
    if banded:  # a band between sizes, and bars that show even where only one size has an interval
        x, mid, lo, hi = (np.asarray(column) for column in zip(*banded, strict=True))
        ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.3, linewidth=0)
        ax.errorbar(x, mid, yerr=[mid - lo, hi - mid], fmt="none", ecolor="tab:blue", elinewidth=2.5,
                    capsize=5, alpha=0.7, label="95 % interval of the mean (t, across repeats)")  # fmt: skip
    points = [r for r in rows if r["kind"] == "scenes"]
    ax.scatter([r["size"] for r in points], [r["heldout"] for r in points], s=18, color="tab:blue", alpha=0.6)
    means = [s["mean"] for s in stats]
    ax.plot(sizes, means, marker="o", color="tab:blue", label="held-out test scenes (mean)")
    _plot_traps(ax, rows, sizes)
    ax.set_ylabel(f"{summary['metric']} on held-out test scenes")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        f"Scene-scaling study: {summary['train_tiles']} training tiles x {summary['epochs']} epochs "
        "per model",
        fontsize=10,
    )
    spread = [(size, s["std"]) for size, s in zip(sizes, stats, strict=True) if s.get("std") is not None]
    low.plot([p[0] for p in spread], [p[1] for p in spread], marker="o", color="tab:purple")
    low.set_ylabel("std across\nrepeats", fontsize=9)
    low.set_ylim(bottom=0)
    low.grid(alpha=0.3)
    low.set_xticks(sizes)
    low.set_xlabel("training scenes")
    save_png(fig, path)


def _plot_traps(ax: Any, rows: list[dict[str, Any]], sizes: list[int]) -> None:
    """The single-scene trap's self-scores and held-out scores, beside the 1-scene points."""
    traps = [r for r in rows if r["kind"] == "trap"]
    if not traps:
        return
    x = np.full(len(traps), 1.0 + 0.03 * (sizes[-1] - sizes[0] or 1))
    ax.scatter(x, [r["self"] for r in traps], marker="*", s=160, color="tab:red", zorder=3,
               label="single-scene trap: other blocks of the same scene")  # fmt: skip
    ax.scatter(x, [r["heldout"] for r in traps], marker="x", s=60, color="tab:red", zorder=3,
               label="same trap models on the held-out scenes")  # fmt: skip


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
        f"  {'scenes':>6} {'runs':>5} {'mean':>7} {'std':>7} {'95 % interval':>16} {'min':>7} {'max':>7}",
    ]
    for size, s in summary["by_size"].items():
        std = "-" if s["std"] is None else f"{s['std']:.3f}"
        band = "-" if s["ci"] is None else f"[{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"
        lines.append(
            f"  {size:>6} {s['n']:>5} {s['mean']:>7.3f} {std:>7} {band:>16} {s['min']:>7.3f} {s['max']:>7.3f}"
        )
    if "trap" in summary:
        trap = summary["trap"]
        lines.append(
            f"  single-scene trap ({', '.join(trap['scenes'])}): self-score {trap['self']['mean']:.3f} "
            f"(other blocks of the same scene) vs {trap['heldout']['mean']:.3f} on the held-out scenes"
        )
    return "\n".join(lines)
