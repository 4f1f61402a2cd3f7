"""Against TorchGeo's way: tiles/s delivered by reading random windows of the GeoTIFF on the fly.

TorchGeo (0.8.1, with torch 2.14.1 / torchvision 0.29.1) lives in its own environment,
$XDG_CACHE_HOME/tilepipe/torchgeo-0.8.1-venv (~/.cache by default), created on first use (about
6 GB, 4 min here) and reused by later runs and by other clones of the project;
benchmarks/torchgeo_side.py runs inside it. tilepipe's side is its training loader
(tilepipe.ml.dataset.TileBatches + make_loader, no workers) over the tiles of the same scene, cut at
the same tile size. Both sides deliver float32 tensors in batches of BATCH, one thread each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import WORK, make_labels, make_scene, run_measured
from benchmarks.tiling import SIZE, _catalog

VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilepipe" / "torchgeo-0.8.1-venv"
PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "torchgeo==0.8.1", "requests"]
TILE, BATCH, SAMPLES = 256, 64, 1280

TILEPIPE = """
import json, time
import numpy as np, torch
from pathlib import Path
from tilepipe.ml.dataset import TileBatches, TileRef, make_loader
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
from tilepipe.tiles.store import SceneTiles
torch.set_num_threads(1)
p = load_params("params.yaml", ["tile.size={tile}", "tile.stride={tile}", "tile.workers=1"])
out = Path({out!r})
tile(p, Path({scenes!r}), out)
store = SceneTiles(out / "a")
n = len(store)
ref = TileRef(["a"], np.zeros(n, np.int64), np.arange(n), np.full(n, -1))
data = TileBatches({{"a": store}}, ref, "segmentation")
result = {{}}
for name, shuffle in (("random", True), ("grid", False)):
    batches = iter(make_loader(data, {batch}, 0, shuffle, 0))
    next(batches)
    seen, t = 0, time.perf_counter()
    for x, y in batches:
        seen += len(x)
        if seen >= {samples}:
            break
    result[name + "_tiles_s"] = seen / (time.perf_counter() - t)
result["dtype"] = str(x.dtype)
print(json.dumps(result))
"""


def ensure_venv() -> Path | None:
    """The TorchGeo environment's python, created on first use; None if it cannot be made."""
    python = VENV / "bin" / "python"
    if python.is_file():
        return python
    print(f"  creating {VENV} (torchgeo 0.8.1; torch and torchvision come from local disk)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--no-compile", *PACKAGES]  # no .pyc pass over 6 GB
        subprocess.run(pip, check=True, timeout=1800)
        subprocess.run([str(python), "-c", "import torchgeo.datasets, torchgeo.samplers"], check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"  could not create the TorchGeo environment: {exc}", flush=True)
        shutil.rmtree(VENV, ignore_errors=True)
        return None
    return python


def run() -> dict:
    """TorchGeo random / grid patches per second vs tilepipe's loader on the 16k tiling scene."""
    folder = WORK / "tiling"
    scene = make_scene(folder / "a.tif", SIZE)
    make_labels(folder / "a_labels.tif", SIZE)
    python = ensure_venv()
    if python is None:
        return {"skipped": f"TorchGeo environment could not be created in {VENV}; see the log above"}
    args = [str(scene), str(TILE), str(BATCH), str(SAMPLES)]
    side = Path(__file__).resolve().parent / "torchgeo_side.py"
    code = f"import runpy, sys\nsys.argv = {[str(side), *args]!r}\n"
    code += f"runpy.run_path({str(side)!r}, run_name='__main__')"
    geo_run = run_measured(code, python=python, cwd=folder)
    geo = json.loads(geo_run.stdout.strip().splitlines()[-1])
    out = WORK / "torchgeo" / "tiles"
    shutil.rmtree(out, ignore_errors=True)
    code = TILEPIPE.format(
        tile=TILE, out=str(out), scenes=str(_catalog(folder, ["a"])), batch=BATCH, samples=SAMPLES
    )
    ours_run = run_measured(code)
    ours = json.loads(ours_run.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "tile_px": TILE,
        "scene_px": SIZE,
        "torchgeo_random_tiles_s": round(geo["random_tiles_s"], 1),
        "torchgeo_grid_tiles_s": round(geo["grid_tiles_s"], 1),
        "tilepipe_random_tiles_s": round(ours["random_tiles_s"], 1),
        "tilepipe_grid_tiles_s": round(ours["grid_tiles_s"], 1),
        "random_speedup": round(ours["random_tiles_s"] / geo["random_tiles_s"], 2),
        "grid_speedup": round(ours["grid_tiles_s"] / geo["grid_tiles_s"], 2),
        "torchgeo_cpu_s": round(geo_run.cpu_seconds, 1),
        "dtype": f"torchgeo {geo['dtype']}, tilepipe {ours['dtype']}",
        "versions": f"torchgeo {geo['torchgeo']}, torch {geo['torch']}",
        "targets": {"random_speedup": ">= 5", "grid_speedup": ">= 5"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
