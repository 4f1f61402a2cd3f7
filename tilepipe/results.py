"""The headline results table, made from the run's files (never typed): metrics.json, seeds.json, cv.json.

``tilepipe report --markdown`` prints it; ``tilepipe report --readme README.md`` writes it between
the README's ``results`` markers, and a test fails when the README and the files disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilepipe.errors import TilepipeError, bad_file

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COLUMNS = (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("mIoU", "miou"))
SEED_KEYS = ("accuracy", "macro_f1", "miou", "map_accuracy", "map_macro_f1", "map_miou")


def read_json(path: Path) -> dict[str, Any]:
    """A metrics file, or a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise bad_file(path, "not found; run `dvc repro` (or `make run`) first") from None
    except json.JSONDecodeError as exc:
        raise bad_file(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _row(name: str, values: list[str]) -> str:
    return f"| {name} | " + " | ".join(values) + " |"


def seed_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, min and max of each headline metric over runs with different seeds."""
    summary = {}
    for key in SEED_KEYS:
        values = [float(r[key]) for r in runs if key in r]
        if values:
            mean = sum(values) / len(values)
            summary[key] = {"mean": round(mean, 4), "min": min(values), "max": max(values)}
    return summary


def _figure(metrics: dict[str, Any], key: str) -> str:
    """``0.8619 [0.781, 0.921]``: the figure and its 95 % scene-bootstrap interval, where it has one."""
    interval = metrics.get(f"{key}_ci")
    figure = f"{metrics[key]:.4f}"
    return figure if not interval else f"{figure} [{interval[0]:.3f}, {interval[1]:.3f}]"


def results_markdown(
    metrics: dict[str, Any], seeds: dict[str, Any] | None = None, cv: dict[str, Any] | None = None
) -> str:
    """Test scores of tiles and full-scene maps (with intervals) beside the baseline, seeds and folds."""

    def scores(prefix: str) -> list[str]:
        return [_figure(metrics, prefix + k) for _, k in COLUMNS]

    tiles, scenes = metrics["test_tiles"], metrics["test_scenes"]
    lines = [
        _row("held-out test scenes [95 % interval]", [name for name, _ in COLUMNS]),
        "|---|---:|---:|---:|",
        _row(f"tiles: all {tiles} labelled tiles of {scenes} scenes", scores("")),
    ]
    if "map_accuracy" in metrics:
        unit = metrics.get("map_unit", "cell")
        lines.append(_row(f"full-scene maps of {metrics['map_scenes']} scenes (per {unit})", scores("map_")))
    baseline = [f"{metrics['baseline_' + k]:.4f}" for _, k in COLUMNS]
    lines.append(_row("majority-class baseline (tiles)", baseline))
    if cv:
        lines.append(_row(cv_label(cv), [_fold_figure(cv, k) for _, k in COLUMNS]))
    if seeds:
        summary, names = seeds["summary"], ", ".join(str(s) for s in seeds["seeds"])
        lines.append(_row(f"tiles, seeds {names}: mean (min-max)", [_spread(summary[k]) for _, k in COLUMNS]))
        if "map_accuracy" in summary:
            lines.append(_row("maps, the same seeds", [_spread(summary[f"map_{k}"]) for _, k in COLUMNS]))
    return "\n".join(lines) + "\n"


def cv_label(cv: dict[str, Any]) -> str:
    """The cross-validation row's label: folds and scenes (``tilepipe cv`` wrote ``metrics/cv.json``)."""
    epochs = f", {cv['epochs']} epochs" if cv.get("epochs") else ""
    return f"tiles, {cv['folds']}-fold scene cross-validation ({cv['scenes']} scenes{epochs}): mean [95 % CI]"


def _fold_figure(cv: dict[str, Any], key: str) -> str:
    stats = cv["summary"].get(key)
    if not stats:
        return "-"
    interval = stats.get("ci")
    figure = f"{stats['mean']:.4f}"
    return figure if not interval else f"{figure} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _spread(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"


def readme_block(text: str, source: Path | str = "README.md") -> str:
    """What stands between the README's results markers."""
    if BEGIN not in text or END not in text:
        raise bad_file(source, f"has no results block ({BEGIN} ... {END})")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def with_results(text: str, table: str, source: Path | str = "README.md") -> str:
    """The README text with its results block replaced by ``table``."""
    readme_block(text, source)
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}"


def check_readme(text: str, table: str, source: Path | str = "README.md") -> None:
    """Fail, naming the README, when its results block is not ``table``."""
    if readme_block(text, source) != table:
        raise TilepipeError(
            f"{source}: the results block differs from metrics/metrics.json (and seeds.json, cv.json); "
            "run `tilepipe report --readme README.md`"
        )
