"""`make bench`: run the benchmarks, print a table, write benchmarks/results.json.

`python -m benchmarks` runs all of them; `python -m benchmarks tiling datapath` runs a subset and
updates only those entries of an existing results.json. `python -m benchmarks seeds` (named only)
reruns the default pipeline under three seeds and writes metrics/seeds.json; `python -m benchmarks
normalization` (named only) compares bands.normalize and train.augment options on held-out scenes.
"""

from __future__ import annotations

import json
import operator
import re
import sys
import time
import traceback
from pathlib import Path

from benchmarks import (
    dask_tiling,
    datapath,
    ddp,
    maps,
    memory,
    normalization,
    orchestration,
    pretrain,
    remote,
    seeds,
    startup,
    tiling,
    torchgeo_compare,
    training,
)
from benchmarks.common import load, machine, save

BENCHMARKS = {
    "tiling": tiling.run,
    "memory": memory.run,
    "datapath": datapath.run,
    "torchgeo": torchgeo_compare.run,
    "training": training.run,
    "ddp": ddp.run,
    "orchestration": orchestration.run,
    "startup": startup.run,
    "remote": remote.run,
    "dask": dask_tiling.run,
    "maps": maps.run,
}
# run only when named (`python -m benchmarks seeds`): 3 full trainings, about 12 minutes here;
# `pretrain`: a pretraining and two small studies (docs/pretrained.md); `normalization`: 18 full
# trainings, ~1.5 h (docs/tracking.md)
ON_REQUEST = {"seeds": seeds.run, "pretrain": pretrain.run, "normalization": normalization.run}
RESULTS = Path(__file__).resolve().parent / "results.json"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def verdict(value: object, target: str) -> str:
    """'holds' or 'MISSES' for a target such as '>= 0.7'; '-' when there is no number to judge."""
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*(-?[0-9.]+)\s*", target)
    if not match or not isinstance(value, int | float):
        return "-"
    return "holds" if OPS[match.group(1)](value, float(match.group(2))) else "MISSES"


def table(results: dict) -> str:
    """One line per figure: benchmark, figure, value, target and whether it holds."""
    lines = [f"{'benchmark':<14} {'figure':<44} {'value':>12}  target"]
    for name in BENCHMARKS:
        figures = results.get(name)
        if not isinstance(figures, dict):
            continue
        targets = figures.get("targets", {})
        for key, value in figures.items():
            if key in ("targets", "load_before", "notes") or isinstance(value, dict | list):
                continue
            target = targets.get(key, "")
            mark = f"{target} ({verdict(value, target)})" if target else ""
            lines.append(f"{name:<14} {key:<44} {value!s:>12}  {mark}")
    return "\n".join(lines)


def main(names: list[str]) -> int:
    """Run the chosen benchmarks (all by default), each in its own child processes, then save."""
    known = {**BENCHMARKS, **ON_REQUEST}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(known)}", file=sys.stderr)
        return 2
    chosen = names or list(BENCHMARKS)
    results: dict = json.loads(RESULTS.read_text()) if names and RESULTS.is_file() else {}
    results.update(machine=machine(), started=time.strftime("%Y-%m-%dT%H:%M:%S"), load_at_start=load())
    total = time.perf_counter()
    for name in chosen:
        print(f"== {name}", flush=True)
        started, before = time.perf_counter(), load()
        try:
            results[name] = {"load_before": before, **known[name]()}
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the others
            traceback.print_exc()
            results[name] = {"load_before": before, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["benchmark_seconds"] = round(time.perf_counter() - started, 1)
        for key, value in results[name].items():
            print(f"  {key:<44} {value}", flush=True)
        save(results, RESULTS)
    results["total_seconds"] = round(time.perf_counter() - total, 1)
    results["load_at_end"] = load()
    save(results, RESULTS)
    print("\n" + table(results))
    print(f"\ntotal {results['total_seconds']} s; written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
