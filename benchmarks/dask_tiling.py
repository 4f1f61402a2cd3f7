"""The flow's tile tasks on 2 Dask workers vs its thread pool, same scenes, and what the cores allow.

The two scenes of the tiling benchmark (16384 px, 65536 tiles of 64 px each; ``BENCH_DASK_PX``
sets another size) are tiled by the flow's own ``tile_all`` inside a Prefect flow (a temporary
server, started before the clock runs), interleaved, ``BENCH_DASK_REPEATS`` times (default 2)
after one warm-up round of each side:

* ``threads_1``: the thread pool with ``tile.workers=1`` (one scene after the other);
* ``threads_2``: the thread pool with ``tile.workers=2`` (the default: both scenes at once, in one
  process, so the tasks' Python threads share one interpreter lock);
* ``dask_2``: ``orchestrate.runner: dask`` on a `dask scheduler` and two `dask worker --nthreads 1`
  processes on 127.0.0.1 (each under its nanny, as `dask worker` starts them by default), started
  and warmed up before the clock runs, prepared by the flow's runner (``flows/dask_workers.py``);
* ``dask_2_unprepared``: the same on a second such cluster, which the runner leaves unprepared
  (``WORKER_PLUGINS`` emptied): the nanny's ``MALLOC_TRIM_THRESHOLD_`` in force, as before the fix;
* ``dask_local_2``: ``orchestrate.runner: dask`` with no address: the flow starts a LocalCluster of
  2 worker processes for the run and stops it after, its start-up inside the clock.

The bound is measured in the same run without Prefect: one `tile` process on one scene, then two
such processes at once, one scene each: what two independent tilings get from these cores
(``pair_capacity``), beside the CPU bound (cores / cores one tiling keeps busy). Ratios are of the
best times. The profile of the nanny's environment (``plain_*``, ``nanny_env_*``): one `tile`
process on scene a, plain, with Dask's ``distributed.nanny.pre-spawn-environ`` variables, and with
them plus what the runner's worker plugin does (mallopt); CPU seconds and minor page faults, best
of ``BENCH_DASK_REPEATS`` interleaved runs.
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

# distributed.nanny.pre-spawn-environ of distributed 2026.8 (its distributed.yaml)
NANNY_ENV = {
    "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}  # fmt: skip

ROUNDS = """
import json, os, shutil, time
from dataclasses import replace
from pathlib import Path
from prefect import flow
from tilepipe.flows import dask_workers
from tilepipe.flows.pipeline import tile_all
from tilepipe.flows.settings import prefect_settings
from tilepipe.geo.scenes import read_scene_records
from tilepipe.params import load_params

PARAMS = os.path.abspath("params.yaml")
todo = [replace(s, image=os.path.abspath(s.image), labels=os.path.abspath(s.labels))
        for s in read_scene_records(Path({scenes!r}))]
os.chdir({work!r})
DASK = ["tile.workers=2", "orchestrate.runner=dask"]
SIDES = {{
    "threads_1": ["tile.workers=1"],
    "threads_2": ["tile.workers=2"],
    "dask_2": DASK + ["orchestrate.dask_address={address}"],
    "dask_2_unprepared": DASK + ["orchestrate.dask_address={other}"],
    "dask_local_2": DASK,
}}
PLUGINS = dask_workers.WORKER_PLUGINS

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
                dask_workers.WORKER_PLUGINS = () if side == "dask_2_unprepared" else PLUGINS
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
import os, resource, sys, time
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
if os.environ.get("BENCH_KEEP_FREED"):  # what flows/dask_workers.py's plugin does in a worker
    from tilepipe.ml.loops import keep_freed_memory
    keep_freed_memory()
def cpu():
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime
t, c, f = time.perf_counter(), cpu(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
tile(load_params("params.yaml", ["tile.workers=1"]), Path(sys.argv[1]), Path(sys.argv[2]))
print(time.perf_counter() - t, cpu() - c, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster(folder: Path, tag: str) -> tuple[str, list[subprocess.Popen]]:
    """A `dask scheduler` and two single-threaded `dask worker` processes (with nannies) on 127.0.0.1."""
    dask, port = str(Path(sys.executable).parent / "dask"), _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [folder / f"{tag}-w{n}.log" for n in range(2)]
    procs = [subprocess.Popen(
        [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=open(folder / f"{tag}-scheduler.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )]  # fmt: skip
    for n, log in enumerate(logs):
        procs.append(subprocess.Popen(
            [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
             "--no-dashboard", "--name", f"{tag}-w{n}"], cwd=folder,
            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
    deadline = time.monotonic() + 120
    while sum("Registered to" in log.read_text() for log in logs) < 2:
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


def _rounds(scenes: Path, rounds: int) -> dict:
    """Every side of the flow's ``tile_all``, in one process with a temporary Prefect server."""
    work = WORK / "dask"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    address, procs = _cluster(work, "a")
    other, more = _cluster(work, "b")
    try:
        code = ROUNDS.format(scenes=str(scenes), work=str(work), address=address, other=other, rounds=rounds)
        return run_rounds(work, code)
    finally:
        _stop(procs + more)
        shutil.rmtree(work, ignore_errors=True)


def run_rounds(work: Path, code: str, **env: str) -> dict:
    """Run a rounds script in a fresh process with its own temporary Prefect server; its JSON line."""
    (work / "rounds.py").write_text(code)  # a file, so the flow's module is importable by name
    environ = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environ.update(PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **env)
    done = subprocess.run(
        [sys.executable, str(work / "rounds.py")], cwd=ROOT, env=environ, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"the flow rounds failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bound(folder: Path) -> dict[str, float]:
    """One tiling process on scene a alone, then one on a and one on b at once (no Prefect)."""
    a, b = _catalog(folder, ["a"]), _catalog(folder, ["b"])
    out = WORK / "dask-bound"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    solo = subprocess.run(_alone(a, out / "alone"), cwd=ROOT, capture_output=True, text=True, check=True)
    solo_s = time.perf_counter() - started
    solo_wall, solo_cpu, _ = map(float, solo.stdout.split()[-3:])
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


def _nanny_env(folder: Path, repeats: int) -> dict[str, float]:
    """CPU seconds and minor faults of one tiling of scene a: plain, nanny env, nanny env + the fix."""
    scenes, out = _catalog(folder, ["a"]), WORK / "dask-profile"
    sides = {"plain": {}, "nanny_env": NANNY_ENV, "nanny_env_kept": {**NANNY_ENV, "BENCH_KEEP_FREED": "1"}}
    runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, extra in sides.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            done = subprocess.run(
                _alone(scenes, out), cwd=ROOT, env={**os.environ, **extra}, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            _, cpu, faults = map(float, done.stdout.split()[-3:])
            runs[side].append((cpu, faults))
    shutil.rmtree(out, ignore_errors=True)
    figures: dict[str, float] = {}
    for side, measured in runs.items():
        figures[f"{side}_cpu_s"] = round(min(c for c, _ in measured), 2)
        figures[f"{side}_minor_faults"] = int(min(f for _, f in measured))
    for side in ("nanny_env", "nanny_env_kept"):
        figures[f"{side}_cpu_cost"] = round(figures[f"{side}_cpu_s"] / figures["plain_cpu_s"] - 1, 3)
    return figures


def run() -> dict:
    """Tiles/s of the flow's tile tasks: thread pool (1 and 2) vs Dask workers; the cores' bound."""
    size = int(os.environ.get("BENCH_DASK_PX", SIZE))
    folder = WORK / ("tiling" if size == SIZE else f"tiling-{size}")
    for name, seed in (("a", 0), ("b", 1)):
        make_scene(folder / f"{name}.tif", size, seed=seed)
        make_labels(folder / f"{name}_labels.tif", size)
    scenes = _catalog(folder, ["a", "b"])
    repeats = max(1, int(os.environ.get("BENCH_DASK_REPEATS", "2")))
    measured = _rounds(scenes, 1 + repeats)
    bound = _bound(folder)
    profile = _nanny_env(folder, repeats)
    best = {side: min(times) for side, times in measured["times"].items()}
    tiles = measured["tiles"]
    rate = {side: tiles / seconds for side, seconds in best.items()}
    cores = os.cpu_count() or 1
    pair_capacity = 2 * bound["solo_tile_s"] / bound["pair_s"]  # two scenes at once vs one alone
    return {
        "scene_px": size,
        "scenes": 2,
        "tiles": tiles,
        "rounds_timed": repeats,
        **{f"{side}_tiles_s": round(r, 1) for side, r in rate.items()},
        "threads_2_speedup": round(rate["threads_2"] / rate["threads_1"], 3),
        "dask_2_speedup": round(rate["dask_2"] / rate["threads_1"], 3),
        "dask_2_vs_threads_2": round(rate["dask_2"] / rate["threads_2"], 3),
        "dask_2_unprepared_vs_threads_2": round(rate["dask_2_unprepared"] / rate["threads_2"], 3),
        "dask_local_2_vs_threads_2": round(rate["dask_local_2"] / rate["threads_2"], 3),
        "one_tiling_alone_s": round(bound["solo_tile_s"], 2),
        "two_tilings_at_once_s": round(bound["pair_s"], 2),
        "bound_pair_capacity": round(pair_capacity, 3),
        "one_tiling_cores_busy": round(bound["solo_cores"], 2),
        "bound_cores": round(cores / bound["solo_cores"], 3),
        **profile,
        "targets": {"dask_2_vs_threads_2": ">= 0.9", "nanny_env_kept_cpu_cost": "<= 0.05"},
        "runs_s": {side: [round(t, 2) for t in times] for side, times in measured["times"].items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
