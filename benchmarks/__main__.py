"""`make bench`: run the benchmarks, print a table, write benchmarks/results.json."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import tiling
from benchmarks.common import machine, save

BENCHMARKS = {"tiling": tiling.run}


def main() -> None:
    """Run every benchmark in one process tree and record figures beside the machine facts."""
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for name, run in BENCHMARKS.items():
        print(f"== {name}", flush=True)
        results[name] = run()
        for key, value in results[name].items():
            print(f"  {key:<34} {value}")
    save(results, Path(__file__).resolve().parent / "results.json")


if __name__ == "__main__":
    main()
