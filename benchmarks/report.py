"""The docs' benchmark figures, made from the committed results files (never typed).

Every machine that runs ``make bench`` writes ``benchmarks/results/<machine id>.json`` (the id
names the CPU model, family/model numbers, cores and memory: another machine writes beside the
committed files, never over them). A doc shows a file's figures between markers::

    <!-- figures MACHINE ENTRY [KEY ...] -->
    ...generated table...
    <!-- /figures -->

``ENTRY`` is a benchmark's name (``dask``, ``engines``, ...) or ``machine`` for the machine's
description; optional ``KEY``s pick and order the figures. ``python -m benchmarks report`` writes
every block of :data:`DOCS`; ``python -m benchmarks report --check`` (and tests/test_bench_figures.py)
fails when a doc and the files disagree. A target's verdict (holds / misses) is computed from the
value, never written by hand.
"""

from __future__ import annotations

import json
import operator
import re
import sys
from pathlib import Path
from typing import Any

from tilepipe.fsutil import write_text

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DOC_NAMES = ("benchmarks.md", "scale-out.md", "tracking.md", "pretrained.md")
DOCS = tuple(HERE.parent / "docs" / doc for doc in DOC_NAMES)
BLOCK = re.compile(r"<!-- figures ([^>]*?) -->\n(.*?)<!-- /figures -->", re.S)
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
NOT_FIGURES = {"targets", "load_before", "notes", "ran_at", "commit", "error"}
SCORES = {"pretrain", "normalization", "seeds"}  # entries of held-out scores, not speeds
BUSY_LOAD = 0.5  # load average per core above which other work shared the cores
MACHINE_ROWS = (
    ("id", "id"), ("CPU model", "cpu_model"), ("CPU family / model", "cpu_family_model"),
    ("vector extensions", "cpu_extensions"), ("virtualisation", "hypervisor"), ("cores", "cores"),
    ("memory (GiB)", "memory_gib"), ("Python", "python"), ("torch", "torch"), ("GDAL", "gdal"),
    ("rasterio", "rasterio"), ("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("dask", "dask"),
    ("mlflow", "mlflow"), ("prefect", "prefect"),
)  # fmt: skip


class FiguresError(Exception):
    """A doc or a results file that does not fit: one line naming the file."""


def machine_id(machine: dict[str, Any]) -> str:
    """``amd-epyc-f25m17-2c-24g``: CPU model, family/model numbers, cores and memory, as a file name."""
    model = re.sub(r"[^a-z0-9]+", "-", str(machine.get("cpu_model", "cpu")).lower()).strip("-")
    family = str(machine.get("cpu_family_model", "")).replace("/", "m")
    cores, memory = f"{machine.get('cores')}c", f"{round(machine.get('memory_gib', 0))}g"
    parts = [model, f"f{family}" if family else "", cores, memory]
    return "-".join(p for p in parts if p)


def results_path(machine: str | dict[str, Any], folder: Path = RESULTS_DIR) -> Path:
    """Where a machine's results live: ``folder/<machine id>.json``."""
    return folder / f"{machine if isinstance(machine, str) else machine_id(machine)}.json"


def read_results(machine: str, folder: Path = RESULTS_DIR) -> dict[str, Any]:
    """A machine's committed results, or a one-line error naming the file."""
    path = results_path(machine, folder)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FiguresError(f"{path}: no results for machine {machine!r}") from None
    except json.JSONDecodeError as exc:
        raise FiguresError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def verdict(value: object, target: str) -> str:
    """'holds' or 'misses' for a target such as '>= 0.7'; '' when there is no number to judge."""
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*(-?[0-9.]+)\s*", target)
    if not match or not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    return "holds" if OPS[match.group(1)](value, float(match.group(2))) else "misses"


def figures(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """The entry's scalar figures in file order (nested runs and bookkeeping stay in the file)."""
    return [(k, v) for k, v in entry.items() if k not in NOT_FIGURES and not isinstance(v, dict | list)]


def _value(value: Any) -> str:
    return "n/a" if value is None else str(value).replace("|", "\\|")


def caption(results: dict[str, Any], name: str) -> str:
    """Which machine, when, at which commit, and how loaded the machine was."""
    entry = results[name]
    load = (entry.get("load_before") or {}).get("load_1m")
    cores = results.get("machine", {}).get("cores") or 1
    busy = load is not None and load > BUSY_LOAD * cores
    state = (
        f"load average {load} before it: **other work was running**, figures are low"
        if busy
        else f"load average {load} before it: quiet"
    ) if load is not None else "load not recorded"  # fmt: skip
    if name in SCORES:
        state = "model scores: the machine's load does not change them"
    return (
        f"*`python -m benchmarks {name}` on `{results['machine']['id']}`, {entry.get('ran_at', '?')}, "
        f"commit {entry.get('commit', '?')}; {state}.*"
    )


def entry_table(results: dict[str, Any], name: str, keys: list[str] | None = None) -> str:
    """Markdown of one benchmark entry: figure, value, target and verdict; its caption and notes."""
    if name == "machine":
        machine = results["machine"]
        rows = [f"| {label} | {_value(machine[key])} |" for label, key in MACHINE_ROWS if key in machine]
        return "\n".join(["| machine | |", "|---|---|", *rows]) + "\n"
    if name not in results:
        raise FiguresError(f"{results_path(results['machine']['id'])}: no entry {name!r}")
    entry = results[name]
    if "error" in entry:
        return f"{caption(results, name)}\n\nThe benchmark failed: `{entry['error']}`\n"
    chosen = figures(entry)
    if keys:
        have = dict(chosen)
        missing = [k for k in keys if k not in have]
        if missing:
            raise FiguresError(f"{results_path(results['machine']['id'])}: entry {name!r} has no {missing}")
        chosen = [(k, have[k]) for k in keys]
    targets = entry.get("targets", {})
    rows = []
    for key, value in chosen:
        target = targets.get(key, "")
        judged = verdict(value, target)
        rows.append(f"| `{key}` | {_value(value)} | {target}{f': **{judged}**' if judged else ''} |")
    notes = [f"- {note}" for note in entry.get("notes", [])]
    parts = [caption(results, name), "", "| figure | value | target |", "|---|---:|---|", *rows]
    return "\n".join(parts + ([""] + notes if notes else [])) + "\n"


def render(text: str, folder: Path = RESULTS_DIR) -> str:
    """``text`` with every figures block made from the results files."""
    cache: dict[str, dict[str, Any]] = {}

    def block(match: re.Match) -> str:
        machine, name, *keys = match.group(1).split()
        if machine not in cache:
            cache[machine] = read_results(machine, folder)
        table = entry_table(cache[machine], name, keys)
        return f"<!-- figures {match.group(1)} -->\n{table}<!-- /figures -->"

    return BLOCK.sub(block, text)


def check(path: Path, folder: Path = RESULTS_DIR) -> None:
    """Fail, naming the doc, when a figures block of it is not what the results files give."""
    text = path.read_text()
    if render(text, folder) != text:
        raise FiguresError(
            f"{path}: the figures differ from benchmarks/results/*.json; "
            "run `python -m benchmarks report`"
        )


def main(args: list[str]) -> int:
    """``report`` writes every doc's figures blocks; ``report --check`` only compares."""
    try:
        for doc in DOCS:
            if "--check" in args:
                check(doc)
            else:
                text = doc.read_text()
                if (new := render(text)) != text:
                    write_text(doc, new)
                    print(f"wrote the figures of {doc}")
    except FiguresError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0
