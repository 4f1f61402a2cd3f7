"""`make bench`: run the benchmarks, print a table, write benchmarks/results/<machine id>.json.

`python -m benchmarks` runs all of them; `python -m benchmarks tiling datapath` runs a subset and
updates only those entries of this machine's file. Each machine writes its own file (the id names
its CPU, cores and memory; `BENCH_MACHINE_ID` overrides it), beside the committed ones.
`python -m benchmarks report` writes the docs' figure tables from the committed files
(benchmarks/report.py). `python -m benchmarks seeds` (named only) reruns the default pipeline
under three seeds and writes metrics/seeds.json; `python -m benchmarks normalization`
(named only) compares bands.normalize and train.augment options on held-out scenes.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from benchmarks import (
    dask_maps,
    dask_tiling,
    datapath,
    ddp,
    engines,
    mapping,
    maps,
    memory,
    normalization,
    orchestration,
    pretrain,
    remote,
    report,
    seeds,
    startup,
    tiling,
    torchgeo_compare,
    training,
)
from benchmarks.common import commit, load, machine, save
from benchmarks.report import results_path, verdict

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
    "engines": engines.run,
    "mapping": mapping.run,
    "maps": maps.run,
    "dask_maps": dask_maps.run,
}
# run only when named (`python -m benchmarks seeds`): 3 full trainings, about 12 minutes here;
# `pretrain`: a pretraining and two small studies (docs/pretrained.md); `normalization`: 18 full
# trainings, ~1.5 h (docs/tracking.md)
ON_REQUEST = {"seeds": seeds.run, "pretrain": pretrain.run, "normalization": normalization.run}
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
            mark = f"{target} ({verdict(value, target) or '-'})" if target else ""
            lines.append(f"{name:<14} {key:<44} {value!s:>12}  {mark}")
    return "\n".join(lines)


def main(names: list[str]) -> int:
    """Run the chosen benchmarks (all by default), each in its own child processes, then save."""
    if names[:1] == ["report"]:
        return report.main(names[1:])
    known = {**BENCHMARKS, **ON_REQUEST}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(known)} or report", file=sys.stderr)
        return 2
    chosen = names or list(BENCHMARKS)
    described = machine()
    path = results_path(described["id"])
    results: dict = json.loads(path.read_text()) if names and path.is_file() else {}
    results.update(machine=described, started=time.strftime("%Y-%m-%dT%H:%M:%S"), load_at_start=load())
    print(f"machine {described['id']}: results go to {path}", flush=True)
    total = time.perf_counter()
    for name in chosen:
        print(f"== {name}", flush=True)
        started, before = time.perf_counter(), load()
        stamp = {"ran_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit(), "load_before": before}
        try:
            results[name] = {**stamp, **known[name]()}
        except Exception as exc:  # noqa: BLE001 - one failed benchmark must not lose the others
            traceback.print_exc()
            results[name] = {**stamp, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["benchmark_seconds"] = round(time.perf_counter() - started, 1)
        for key, value in results[name].items():
            print(f"  {key:<44} {value}", flush=True)
        save(results, path)
    results["total_seconds"] = round(time.perf_counter() - total, 1)
    results["load_at_end"] = load()
    save(results, path)
    print("\n" + table(results))
    print(f"\ntotal {results['total_seconds']} s; written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
