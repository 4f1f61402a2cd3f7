"""Tiling throughput against a bare read of every block, and its parallel speed-up.

Each side runs ``BENCH_TILING_REPEATS`` times (default 3), interleaved with its reference so that
drift in the machine's speed hits both alike; ratios are of the best (least disturbed) times, and
every run's time is kept in results.json beside them.
"""

from __future__ import annotations

import json
import operator
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
    t = time.perf_counter()
    for _, w in src.block_windows(1):
        src.read(window=w)
    print(time.perf_counter() - t)
"""

TILE = """
import time
from pathlib import Path
from stages.params import load_params
from stages.tile import tile
params = load_params("params.yaml", {sets!r})
t = time.perf_counter()
tile(params, Path({scenes!r}), Path({out!r}))
print(time.perf_counter() - t)
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


def _tile(scenes: Path, out: Path, workers: int) -> tuple[float, float]:
    """Seconds of `tile` (timed inside the child) and the child's peak RSS in MB."""
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"tile.workers={workers}"]
    measured = run_measured(TILE.format(sets=sets, scenes=str(scenes), out=str(out)))
    shutil.rmtree(out, ignore_errors=True)
    return float(measured.stdout.strip().splitlines()[-1]), measured.rss_mb


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
        raw.append(float(run_measured(RAW.format(path=str(folder / "a.tif"))).stdout.strip()))
        seconds, rss = _tile(one, folder / "tiles", 1)
        tiled.append(seconds)
        tile_rss = max(tile_rss, rss)
    for _ in range(repeats):
        serial.append(_tile(two, folder / "tiles", 1)[0])
        seconds, rss = _tile(two, folder / "tiles", 2)
        parallel.append(seconds)
        parallel_rss = max(parallel_rss, rss)
    raw_s, tile_s = min(raw), min(tiled)
    return {
        "scene_px": SIZE,
        "tile_px": 64,
        "repeats": repeats,
        "tile_1_worker_tiles_s": round((SIZE // 64) ** 2 / tile_s, 1),
        "raw_read_mb_s": round(megabytes / raw_s, 1),
        "tile_1_worker_mb_s": round(megabytes / tile_s, 1),
        "tile_vs_raw_ratio": round(raw_s / tile_s, 3),
        "tile_vs_raw_ratio_median_of_pairs": round(statistics.median(map(operator.truediv, raw, tiled)), 3),
        "tile_1_worker_peak_rss_mb": round(tile_rss, 1),
        "two_scenes_1_worker_s": round(min(serial), 2),
        "two_scenes_2_workers_s": round(min(parallel), 2),
        "two_workers_speedup": round(min(serial) / min(parallel), 3),
        "two_workers_parent_peak_rss_mb": round(parallel_rss, 1),
        "runs_s": {
            "raw": [round(t, 2) for t in raw],
            "tile": [round(t, 2) for t in tiled],
            "two_scenes_1_worker": [round(t, 2) for t in serial],
            "two_scenes_2_workers": [round(t, 2) for t in parallel],
        },
        "targets": {"tile_vs_raw_ratio": ">= 0.7", "two_workers_speedup": ">= 1.7"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
