"""Tiling throughput against a bare read of every block, and its parallel speed-up.

Each side runs ``BENCH_TILING_REPEATS`` times (default 3), interleaved with its reference so that
drift in the machine's speed hits both alike; ratios are of the best (least disturbed) times, and
every run's time is kept in the results file beside them.

A worker runs three threads (read-ahead decoding, cutting, shard writing), so one worker already
keeps more than one core busy, and every shard byte is written and fsynced: what a second worker
can add is bounded by cores / cores one worker keeps busy, and by the one-worker time over the
time the disk takes to write both scenes' shards (``disk_write_mb_s``, probed in the same run);
``two_workers_cpu_share`` is how the machine's CPU time went during the 2-worker run (``steal``:
taken by the hypervisor; ``iowait``: idle, waiting on the disk).
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.common import WORK, make_labels, make_scene, run_measured

SIZE = 16384

RAW = """
import time, rasterio
from tilepipe.geo.raster_io import gdal_env
with gdal_env(64), rasterio.open({path!r}) as src:
    t, c = time.perf_counter(), time.process_time()
    for _, w in src.block_windows(1):
        src.read(window=w)
    print(time.perf_counter() - t, time.process_time() - c)
"""

TILE = """
import resource, time
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
def cpu():
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + workers.ru_utime + workers.ru_stime
params = load_params("params.yaml", {sets!r})
t, c = time.perf_counter(), cpu()
tile(params, Path({scenes!r}), Path({out!r}))
print(time.perf_counter() - t, cpu() - c)
"""


def _catalog(folder: Path, names: list[str]) -> Path:
    """Ingest the bench scenes (not timed) and return scenes.json."""
    lines = ["scene_id,image,labels"] + [f"{n},{n}.tif,{n}_labels.tif" for n in names]
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    scenes = folder / f"scenes-{'-'.join(names)}.json"
    if not scenes.is_file():
        catalog = str(folder / "catalog.csv")
        run_measured(
            "from pathlib import Path\nfrom tilepipe.params import load_params\n"
            "from tilepipe.stages.ingest import ingest\n"
            f"ingest(load_params('params.yaml'), Path({catalog!r}), Path({str(scenes)!r}))"
        )
    return scenes


def _machine_ticks() -> dict[str, int]:
    """The machine's CPU time by kind so far (the ``cpu`` line of /proc/stat), in clock ticks."""
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1 : 1 + len(kinds)]
    return dict(zip(kinds, map(int, fields), strict=True))


def _shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Each kind's share of the machine's CPU time between two ``_machine_ticks``."""
    spent = {kind: after[kind] - before[kind] for kind in before}
    total = max(sum(spent.values()), 1)
    return {kind: ticks / total for kind, ticks in spent.items()}


class TileRun(NamedTuple):
    """One timed `tile`: wall and CPU seconds (its workers' included, timed inside the child), its
    peak RSS in MB, and how the machine's CPU time went meanwhile (busy, idle, waiting on disk, stolen)."""

    wall: float
    cpu: float
    rss_mb: float
    shares: dict[str, float]


def _tile(scenes: Path, out: Path, workers: int) -> TileRun:
    """Run `tile` on ``scenes`` with ``workers`` into ``out`` (removed before and after)."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"tile.workers={workers}"]
    before = _machine_ticks()
    measured = run_measured(TILE.format(sets=sets, scenes=str(scenes), out=str(out)))
    shares = _shares(before, _machine_ticks())
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = map(float, measured.stdout.strip().splitlines()[-1].split())
    return TileRun(wall, cpu, measured.rss_mb, shares)


def _disk_write_mb_s(folder: Path, total_mb: int = 1024, file_mb: int = 64) -> float:
    """MB/s of writing ``total_mb`` in fsynced files of ``file_mb`` (as tile shards are written)."""
    block = np.random.default_rng(0).integers(0, 255, file_mb << 20, dtype=np.uint8).tobytes()
    os.sync()
    started = time.perf_counter()
    for number in range(total_mb // file_mb):
        with open(folder / f"disk-probe-{number}.bin", "wb") as fh:
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    for number in range(total_mb // file_mb):
        (folder / f"disk-probe-{number}.bin").unlink()
    return total_mb * (1 << 20) / 1e6 / seconds


def run() -> dict:
    """MB/s of raw block reads vs `tilepipe tile` on one 16k scene; 1 vs 2 workers on 2 scenes."""
    folder = WORK / "tiling"
    for name, seed in (("a", 0), ("b", 1)):
        make_scene(folder / f"{name}.tif", SIZE, seed=seed)
        make_labels(folder / f"{name}_labels.tif", SIZE)
    megabytes = SIZE * SIZE * 3 / 1e6
    repeats = max(1, int(os.environ.get("BENCH_TILING_REPEATS", "3")))
    one, two = _catalog(folder, ["a"]), _catalog(folder, ["a", "b"])
    # the disk before and after the tile runs: minutes after a large install (the environment) it
    # writes measurably slower on this VM, which the first tile runs feel too
    disk_first_mb_s = _disk_write_mb_s(folder)
    raw: list[tuple[float, float]] = []  # wall and CPU seconds
    tiled: list[TileRun] = []
    serial: list[TileRun] = []
    parallel: list[TileRun] = []
    for _ in range(repeats):
        raw.append(tuple(map(float, run_measured(RAW.format(path=str(folder / "a.tif"))).stdout.split())))
        tiled.append(_tile(one, folder / "tiles", 1))
    for _ in range(repeats):
        serial.append(_tile(two, folder / "tiles", 1))
        parallel.append(_tile(two, folder / "tiles", 2))
    fastest = operator.attrgetter("wall")
    (raw_s, raw_cpu), best = min(raw), min(tiled, key=fastest)
    tile_s, tile_cpu = best.wall, best.cpu
    one_worker, two_workers = min(serial, key=fastest), min(parallel, key=fastest)
    serial_s, serial_cpu = one_worker.wall, one_worker.cpu
    parallel_s, parallel_cpu, shares = two_workers.wall, two_workers.cpu, two_workers.shares
    disk_mb_s = _disk_write_mb_s(folder)
    # two bounds on what a second worker can add here, both measured in this run: cores (one worker
    # already keeps more than one busy) and the disk (every shard byte is written and fsynced)
    serial_cores, cores = serial_cpu / serial_s, os.cpu_count() or 1
    shard_mb = 2 * SIZE * SIZE * (3 + 1) / 1e6  # two scenes' uint8 images and labels
    cpu_bound, disk_bound = cores / serial_cores, serial_s / (shard_mb / disk_mb_s)
    return {
        "scene_px": SIZE,
        "tile_px": 64,
        "repeats": repeats,
        "tile_1_worker_tiles_s": round((SIZE // 64) ** 2 / tile_s, 1),
        "raw_read_mb_s": round(megabytes / raw_s, 1),
        "tile_1_worker_mb_s": round(megabytes / tile_s, 1),
        "tile_vs_raw_ratio": round(raw_s / tile_s, 3),
        "tile_vs_raw_ratio_median_of_pairs": round(
            statistics.median(r / t.wall for (r, _), t in zip(raw, tiled, strict=True)), 3
        ),
        "raw_read_cpu_s": round(raw_cpu, 2),
        "tile_1_worker_cpu_s": round(tile_cpu, 2),
        "tile_1_worker_peak_rss_mb": round(max(t.rss_mb for t in tiled), 1),
        "two_scenes_1_worker_s": round(serial_s, 2),
        "two_scenes_2_workers_s": round(parallel_s, 2),
        "two_workers_speedup": round(serial_s / parallel_s, 3),
        "two_scenes_1_worker_cores_busy": round(serial_cores, 2),
        "two_scenes_2_workers_cores_busy": round(parallel_cpu / parallel_s, 2),
        "disk_write_mb_s_before": round(disk_first_mb_s, 1),
        "disk_write_mb_s": round(disk_mb_s, 1),
        "two_scenes_shard_mb": round(shard_mb, 1),
        "two_workers_speedup_bound_cores": round(cpu_bound, 2),
        "two_workers_speedup_bound_disk": round(disk_bound, 2),
        "two_workers_speedup_bound": round(min(cpu_bound, disk_bound), 2),
        "two_workers_cpu_share": {kind: round(share, 3) for kind, share in shares.items() if share},
        "two_workers_parent_peak_rss_mb": round(max(t.rss_mb for t in parallel), 1),
        "runs_s": {
            "raw": [round(t, 2) for t, _ in raw],
            "tile": [round(t.wall, 2) for t in tiled],
            "two_scenes_1_worker": [round(t.wall, 2) for t in serial],
            "two_scenes_2_workers": [round(t.wall, 2) for t in parallel],
        },
        "targets": {"tile_vs_raw_ratio": ">= 0.7", "two_workers_speedup": ">= 1.7"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
