"""The headline results table, made from the run's files (never typed): metrics.json and seeds.json.

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


def results_markdown(metrics: dict[str, Any], seeds: dict[str, Any] | None = None) -> str:
    """Test scores of tiles and full-scene maps beside the majority baseline (and across seeds)."""

    def scores(prefix: str) -> list[str]:
        return [f"{metrics[prefix + k]:.4f}" for _, k in COLUMNS]

    lines = [
        _row("held-out test scenes", [name for name, _ in COLUMNS]),
        "|---|---:|---:|---:|",
        _row(f"tiles ({metrics['test_tiles']} in {metrics['test_scenes']} scenes)", scores("")),
    ]
    if "map_accuracy" in metrics:
        lines.append(_row(f"full-scene maps (per {metrics.get('map_unit', 'cell')})", scores("map_")))
    lines.append(_row("majority-class baseline (tiles)", scores("baseline_")))
    if seeds:
        summary, names = seeds["summary"], ", ".join(str(s) for s in seeds["seeds"])
        lines.append(_row(f"tiles, seeds {names}: mean (min-max)", [_spread(summary[k]) for _, k in COLUMNS]))
        if "map_accuracy" in summary:
            lines.append(_row("maps, the same seeds", [_spread(summary[f"map_{k}"]) for _, k in COLUMNS]))
    return "\n".join(lines) + "\n"


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
            f"{source}: the results block differs from metrics/metrics.json; "
            "run `tilepipe report --readme README.md`"
        )
