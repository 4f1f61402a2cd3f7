"""Tiling throughput against a bare read of every block, and its parallel speed-up.

Each side runs ``BENCH_TILING_REPEATS`` times (default 3), interleaved with its reference so that
drift in the machine's speed hits both alike; ratios are of the best (least disturbed) times, and
every run's time is kept in results.json beside them.

A worker runs three threads (read-ahead decoding, cutting, shard writing), so one worker already
keeps more than one core busy; ``two_workers_speedup_bound`` (cores / cores one worker keeps busy)
is the most a second worker can add here, measured in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

from benchmarks.common import WORK, make_labels, make_scene, run_measured

SIZE = 16384

RAW = """
import time, rasterio
from stages.raster_io import gdal_env
with gdal_env(64), rasterio.open({path!r}) as src:
    t, c = time.perf_counter(), time.process_time()
    for _, w in src.block_windows(1):
        src.read(window=w)
    print(time.perf_counter() - t, time.process_time() - c)
"""

TILE = """
import resource, time
from pathlib import Path
from stages.params import load_params
from stages.tile import tile
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
            "from pathlib import Path\nfrom stages.params import load_params\n"
            "from stages.ingest import ingest\n"
            f"ingest(load_params('params.yaml'), Path({catalog!r}), Path({str(scenes)!r}))"
        )
    return scenes


def _tile(scenes: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """Wall and CPU seconds of `tile` (its workers' included, timed inside the child), its peak RSS in MB."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"tile.workers={workers}"]
    measured = run_measured(TILE.format(sets=sets, scenes=str(scenes), out=str(out)))
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = map(float, measured.stdout.strip().splitlines()[-1].split())
    return wall, cpu, measured.rss_mb


def run() -> dict:
    """MB/s of raw block reads vs `tilepipe tile` on one 16k scene; 1 vs 2 workers on 2 scenes."""
    folder = WORK / "tiling"
    for name, seed in (("a", 0), ("b", 1)):
        make_scene(folder / f"{name}.tif", SIZE, seed=seed)
        make_labels(folder / f"{name}_labels.tif", SIZE)
    megabytes = SIZE * SIZE * 3 / 1e6
    repeats = max(1, int(os.environ.get("BENCH_TILING_REPEATS", "3")))
    one, two = _catalog(folder, ["a"]), _catalog(folder, ["a", "b"])
    raw, tiled, serial, parallel = [], [], [], []
    tile_rss = parallel_rss = 0.0
    for _ in range(repeats):
        raw.append(tuple(map(float, run_measured(RAW.format(path=str(folder / "a.tif"))).stdout.split())))
        *timed, rss = _tile(one, folder / "tiles", 1)
        tiled.append(timed)
        tile_rss = max(tile_rss, rss)
    for _ in range(repeats):
        serial.append(_tile(two, folder / "tiles", 1)[:2])
        *timed, rss = _tile(two, folder / "tiles", 2)
        parallel.append(timed)
        parallel_rss = max(parallel_rss, rss)
    (tile_s, tile_cpu), (raw_s, raw_cpu) = min(tiled), min(raw)
    (serial_s, serial_cpu), (parallel_s, parallel_cpu) = min(serial), min(parallel)
    # how many cores one worker keeps busy bounds what a second worker can add on this machine
    serial_cores, cores = serial_cpu / serial_s, os.cpu_count() or 1
    return {
        "scene_px": SIZE,
        "tile_px": 64,
        "repeats": repeats,
        "tile_1_worker_tiles_s": round((SIZE // 64) ** 2 / tile_s, 1),
        "raw_read_mb_s": round(megabytes / raw_s, 1),
        "tile_1_worker_mb_s": round(megabytes / tile_s, 1),
        "tile_vs_raw_ratio": round(raw_s / tile_s, 3),
        "tile_vs_raw_ratio_median_of_pairs": round(
            statistics.median(r / t for (r, _), (t, _) in zip(raw, tiled, strict=True)), 3
        ),
        "raw_read_cpu_s": round(raw_cpu, 2),
        "tile_1_worker_cpu_s": round(tile_cpu, 2),
        "tile_1_worker_peak_rss_mb": round(tile_rss, 1),
        "two_scenes_1_worker_s": round(serial_s, 2),
        "two_scenes_2_workers_s": round(parallel_s, 2),
        "two_workers_speedup": round(serial_s / parallel_s, 3),
        "two_scenes_1_worker_cores_busy": round(serial_cores, 2),
        "two_scenes_2_workers_cores_busy": round(parallel_cpu / parallel_s, 2),
        "two_workers_speedup_bound": round(cores / serial_cores, 2),
        "two_workers_parent_peak_rss_mb": round(parallel_rss, 1),
        "runs_s": {
            "raw": [round(t, 2) for t, _ in raw],
            "tile": [round(t, 2) for t, _ in tiled],
            "two_scenes_1_worker": [round(t, 2) for t, _ in serial],
            "two_scenes_2_workers": [round(t, 2) for t, _ in parallel],
        },
        "targets": {"tile_vs_raw_ratio": ">= 0.7", "two_workers_speedup": ">= 1.7"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
