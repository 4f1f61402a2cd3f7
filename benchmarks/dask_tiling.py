"""The flow's tile tasks on 2 Dask workers vs its thread pool, same scenes, and what the cores allow.

The two 16384 px scenes of the tiling benchmark (65536 tiles of 64 px each) are tiled by the flow's
own ``tile_all`` inside a Prefect flow (a temporary server, started before the clock runs), three
ways, interleaved, ``BENCH_DASK_REPEATS`` times (default 2) after one warm-up round of each:

* ``threads_1``: the thread pool with ``tile.workers=1`` (one scene after the other);
* ``threads_2``: the thread pool with ``tile.workers=2`` (the default: both scenes at once, in one
  process, so the tasks' Python threads share one interpreter lock);
* ``dask_2``: ``orchestrate.runner: dask`` on a `dask scheduler` and two `dask worker --nthreads 1`
  processes on 127.0.0.1, started (and warmed up) before the clock runs.

The bound is measured in the same run without Prefect: one `tile` process on one scene, then two
such processes at once, one scene each: what two independent tilings get from these cores
(``pair_capacity``), beside the CPU bound of the tiling benchmark (cores / cores one tiling keeps
busy). Ratios are of the best times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, WORK, make_labels, make_scene
from benchmarks.tiling import SIZE, _catalog

ROUNDS = """
import json, os, shutil, time
from dataclasses import replace
from pathlib import Path
from prefect import flow
from tilepipe.flows.pipeline import tile_all
from tilepipe.flows.settings import prefect_settings
from tilepipe.geo.scenes import read_scene_records
from tilepipe.params import load_params

PARAMS = os.path.abspath("params.yaml")
todo = [replace(s, image=os.path.abspath(s.image), labels=os.path.abspath(s.labels))
        for s in read_scene_records(Path({scenes!r}))]
os.chdir({work!r})
SIDES = {{
    "threads_1": ["tile.workers=1"],
    "threads_2": ["tile.workers=2"],
    "dask_2": ["tile.workers=2", "orchestrate.runner=dask", "orchestrate.dask_address={address}"],
}}

@flow(name="bench-tile")
def timed(sets: list[str]) -> float:
    params = load_params(PARAMS, sets)
    started = time.perf_counter()
    tile_all(params, todo)
    return time.perf_counter() - started

def main():
    times = {{side: [] for side in SIDES}}
    with prefect_settings():
        for number in range({rounds}):
            for side, sets in SIDES.items():
                shutil.rmtree("data/tiles", ignore_errors=True)
                os.sync()
                seconds = timed(sets)
                if number:  # round 0 warms up: imports in the workers, the API's first task runs
                    times[side].append(seconds)
    tiles = sum(json.loads((Path("data/tiles") / s.scene_id / "index.json").read_bytes())["tile_count"]
                for s in todo)
    print(json.dumps({{"times": times, "tiles": tiles}}))

if __name__ == "__main__":
    main()
"""

ALONE = """
import resource, sys, time
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
def cpu():
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime
t, c = time.perf_counter(), cpu()
tile(load_params("params.yaml", ["tile.workers=1"]), Path(sys.argv[1]), Path(sys.argv[2]))
print(time.perf_counter() - t, cpu() - c)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    """A `dask scheduler` and two single-threaded `dask worker` processes on 127.0.0.1."""
    dask, port = str(Path(sys.executable).parent / "dask"), _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=open(folder / "scheduler.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )]  # fmt: skip
    for n in range(2):
        procs.append(subprocess.Popen(
            [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
             "--no-dashboard", "--name", f"w{n}"], cwd=folder,
            stdout=open(folder / f"w{n}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
    deadline = time.monotonic() + 120
    while sum("Registered to" in (folder / f"w{n}.log").read_text() for n in range(2)) < 2:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"the Dask cluster did not start: see {folder}")
        time.sleep(0.2)
    return address, procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _alone(scenes: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", ALONE, str(scenes), str(out)]


def _bound(folder: Path) -> dict[str, float]:
    """One tiling process on scene a alone, then one on a and one on b at once (no Prefect)."""
    a, b = _catalog(folder, ["a"]), _catalog(folder, ["b"])
    out = WORK / "dask-bound"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    solo = subprocess.run(_alone(a, out / "alone"), cwd=ROOT, capture_output=True, text=True, check=True)
    solo_s = time.perf_counter() - started
    solo_wall, solo_cpu = map(float, solo.stdout.split()[-2:])
    os.sync()
    started = time.perf_counter()
    pair = [
        subprocess.Popen(_alone(s, out / n), cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for s, n in ((a, "a"), (b, "b"))
    ]
    for proc in pair:
        proc.communicate()
    pair_s = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return {"solo_s": solo_s, "solo_tile_s": solo_wall, "solo_cores": solo_cpu / solo_wall, "pair_s": pair_s}


def run() -> dict:
    """Tiles/s of the flow's tile tasks: thread pool (1 and 2) vs 2 Dask workers; the cores' bound."""
    folder = WORK / "tiling"
    for name, seed in (("a", 0), ("b", 1)):
        make_scene(folder / f"{name}.tif", SIZE, seed=seed)
        make_labels(folder / f"{name}_labels.tif", SIZE)
    scenes = _catalog(folder, ["a", "b"])
    rounds = 1 + max(1, int(os.environ.get("BENCH_DASK_REPEATS", "2")))
    work = WORK / "dask"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    address, procs = _cluster(work)
    try:
        code = ROUNDS.format(scenes=str(scenes), work=str(work), address=address, rounds=rounds)
        (work / "rounds.py").write_text(code)  # a file, so the flow's module is importable by name
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
        done = subprocess.run(
            [sys.executable, str(work / "rounds.py")], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"the flow rounds failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        _stop(procs)
    bound = _bound(folder)
    shutil.rmtree(work, ignore_errors=True)
    best = {side: min(times) for side, times in measured["times"].items()}
    tiles = measured["tiles"]
    rate = {side: tiles / seconds for side, seconds in best.items()}
    cores = os.cpu_count() or 1
    pair_capacity = 2 * bound["solo_tile_s"] / bound["pair_s"]  # two scenes at once vs one alone
    return {
        "scene_px": SIZE,
        "scenes": 2,
        "tiles": tiles,
        "rounds_timed": rounds - 1,
        "threads_1_tiles_s": round(rate["threads_1"], 1),
        "threads_2_tiles_s": round(rate["threads_2"], 1),
        "dask_2_tiles_s": round(rate["dask_2"], 1),
        "threads_2_speedup": round(rate["threads_2"] / rate["threads_1"], 3),
        "dask_2_speedup": round(rate["dask_2"] / rate["threads_1"], 3),
        "dask_2_vs_threads_2": round(rate["dask_2"] / rate["threads_2"], 3),
        "one_tiling_alone_s": round(bound["solo_tile_s"], 2),
        "two_tilings_at_once_s": round(bound["pair_s"], 2),
        "bound_pair_capacity": round(pair_capacity, 3),
        "one_tiling_cores_busy": round(bound["solo_cores"], 2),
        "bound_cores": round(cores / bound["solo_cores"], 3),
        "runs_s": {side: [round(t, 2) for t in times] for side, times in measured["times"].items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
