"""The ``map-archive`` flow's map tasks on 2 Dask workers vs its thread pool, same scenes, and the bound.

``BENCH_DASK_MAP_SCENES`` (default 12) scenes of the built-in sizes (those of the ``maps`` entry,
1024-2560 px, with its model: small_cnn, untrained, the default engine ``map.engine``) are mapped
by the flow itself (``flows/maps.py``'s ``map_archive_flow``, a temporary Prefect server started
before the clock runs) into an empty folder each time, interleaved, ``BENCH_DASK_REPEATS`` times
(default 2) after one warm-up round of 2 scenes per side (imports in the workers, the model's
export into each process's ``.tilepipe/onnx/``):

* ``threads_1``: the thread pool with ``tile.workers=1`` (one scene after the other);
* ``threads_2``: the thread pool with ``tile.workers=2`` (the default: two scenes at once in one
  process, sharing one ONNX Runtime session);
* ``dask_2``: ``orchestrate.runner: dask`` on a `dask scheduler` and two `dask worker --nthreads 1`
  processes on 127.0.0.1 (under their nannies), started before the clock runs, prepared by the runner.

The bound, in the same run and without Prefect: the scenes split in two halves, each mapped by one
``tilepipe map`` process, the two processes at once (``two_processes``): what two independent
processes, which is what two Dask workers are, get from these cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, WORK, make_scene
from benchmarks.dask_tiling import _cluster, _stop, run_rounds
from benchmarks.maps import MAP, SIZES, model_file

ROUNDS = """
import json, os, shutil, time
from prefect import flow
from tilepipe.flows.maps import map_archive_flow
from tilepipe.flows.settings import prefect_settings

os.chdir({work!r})
SIDES = {{
    "threads_1": ["tile.workers=1"],
    "threads_2": ["tile.workers=2"],
    "dask_2": ["tile.workers=2", "orchestrate.runner=dask", "orchestrate.dask_address={address}"],
}}

def timed(sets, catalog, out):
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    map_archive_flow({params!r}, sets, catalog, {model!r}, out)
    return time.perf_counter() - started

def main():
    times = {{side: [] for side in SIDES}}
    with prefect_settings():
        for side, sets in SIDES.items():  # warm-up: imports, the API's first runs, each export
            timed(sets, {warm!r}, "warm-" + side)
        for number in range({rounds}):
            for side, sets in SIDES.items():
                times[side].append(timed(sets, {catalog!r}, "out-" + side))
    print(json.dumps({{"times": times}}))

if __name__ == "__main__":
    main()
"""


def _catalog(path: Path, scenes: list[Path]) -> Path:
    rows = ["scene_id,image", *(f"{s.stem},{s}" for s in scenes)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _rounds(work: Path, catalogs: dict[str, Path], model: Path, rounds: int) -> dict:
    """Every side of the flow, in one process with a temporary Prefect server."""
    address, procs = _cluster(work, "maps")
    try:
        code = ROUNDS.format(
            work=str(work), address=address, params=str(ROOT / "params.yaml"), model=str(model),
            warm=str(catalogs["warm"]), catalog=str(catalogs["all"]), rounds=rounds,
        )  # fmt: skip
        return run_rounds(work, code, MLFLOW_TRACKING_URI="", TQDM_DISABLE="1")
    finally:
        _stop(procs)


def _two_processes(work: Path, halves: list[Path], model: Path, rounds: int) -> list[float]:
    """Two ``tilepipe map`` processes at once, one half of the scenes each (no Prefect, no Dask)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "TQDM_DISABLE": "1"}
    times = []
    for number in range(1 + rounds):  # round 0 warms up (its export is kept in work/.tilepipe/onnx)
        outs = [work / f"pair-{n}" for n in range(2)]
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", MAP.format(catalog=str(half), model=str(model), out=str(out),
                                                  params=str(ROOT / "params.yaml"))],
                cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            for half, out in zip(halves, outs, strict=True)
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"tilepipe map failed: {err[-2000:]}")
        if number:
            times.append(time.perf_counter() - started)
    return times


def run() -> dict:
    """Megapixels/s of the flow's map tasks: thread pool (1 and 2) vs 2 Dask workers; the bound."""
    count = int(os.environ.get("BENCH_DASK_MAP_SCENES", "12"))
    repeats = max(1, int(os.environ.get("BENCH_DASK_REPEATS", "2")))
    folder = WORK / "maps" / "archive"
    scenes = [make_scene(folder / f"m{i:03d}.tif", SIZES[i % len(SIZES)], seed=i) for i in range(count)]
    megapixels = sum(SIZES[i % len(SIZES)] ** 2 for i in range(count)) / 1e6
    model = model_file()
    work = WORK / "dask-maps"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        catalogs = {"all": _catalog(work / "all.csv", scenes)}
        catalogs["warm"] = _catalog(work / "warm.csv", scenes[:2])
        halves = [_catalog(work / f"half{n}.csv", scenes[n::2]) for n in range(2)]
        measured = _rounds(work, catalogs, model, repeats)
        pair = _two_processes(work, halves, model, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {side: min(times) for side, times in measured["times"].items()}
    best["two_processes"] = min(pair)
    rate = {side: megapixels / seconds for side, seconds in best.items()}
    return {
        "scenes": count,
        "megapixels": round(megapixels, 1),
        "rounds_timed": repeats,
        **{f"{side}_mpx_s": round(r, 3) for side, r in rate.items()},
        "threads_2_speedup": round(rate["threads_2"] / rate["threads_1"], 3),
        "dask_2_vs_threads_2": round(rate["dask_2"] / rate["threads_2"], 3),
        "dask_2_vs_two_processes": round(rate["dask_2"] / rate["two_processes"], 3),
        "two_processes_vs_threads_2": round(rate["two_processes"] / rate["threads_2"], 3),
        "targets": {"dask_2_vs_threads_2": ">= 0.9"},
        "runs_s": {
            **{side: [round(t, 2) for t in times] for side, times in measured["times"].items()},
            "two_processes": [round(t, 2) for t in pair],
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
