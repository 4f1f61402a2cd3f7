"""Flat memory: peak RSS of `tile` and `predict` on scenes of 4096, 16384 and 32768 px a side.

Scenes are cheap, highly compressible uint8 RGB GeoTIFFs (64 px squares) whose only valid pixels
are a 128 px band along the diagonal; the rest is nodata. Tiling still reads, scales, masks and
labels every 1024 px chunk of the scene (default params: 64 px tiles, one worker), and prediction
reads and writes every strip at full width, but tiles are only kept, and the model (default
architecture, random weights: memory does not depend on them) only runs, where there is data.
That keeps the 32768 px case to about a minute, and the kept tiles (and so the tile index,
which tile holds in memory until it writes index.json) grow only linearly with the side.
"""

from __future__ import annotations

import json
import shutil

from benchmarks.common import WORK, make_flat_scene, make_labels, run_measured
from benchmarks.tiling import _catalog

SIZES = (4096, 16384, 32768)
DIAGONAL = 128  # px of valid data along the diagonal; the rest is nodata

TILE = """
import time
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
t = time.perf_counter()
tile(load_params("params.yaml", ["tile.workers=1"]), Path({scenes!r}), Path({out!r}))
print(time.perf_counter() - t)
"""

MODEL = """
from pathlib import Path
import torch
from tilepipe.ml.models import Normalized, build_model
from tilepipe.params import load_params
from tilepipe.ml.checkpoint import model_meta, save_model
p = load_params("params.yaml")
torch.manual_seed(0)
net = build_model(p.train.model, len(p.bands.input), len(p.data.classes), p.train.width)
stats = {{"mean": [0.5] * len(p.bands.input), "std": [0.25] * len(p.bands.input)}}
meta = model_meta(p, stats, p.tile.size, 0, {{}})
save_model(Path({path!r}), Normalized(net, stats["mean"], stats["std"]), meta)
"""

PREDICT = """
import time
from pathlib import Path
import torch
from tilepipe.params import load_params
from tilepipe.mapping.predict import predict_scene
from tilepipe.tracking.models import resolve_model
p = load_params("params.yaml")
model, meta = resolve_model({model!r})
t = time.perf_counter()
predict_scene(p, model, meta, Path({scene!r}), Path({out!r}))
print(time.perf_counter() - t)
"""


def _growth(values: dict[int, float]) -> float:
    return round(100 * (values[SIZES[-1]] / values[SIZES[0]] - 1), 1)


def run() -> dict:
    """Peak RSS (MB) of one tile process and one predict process per scene size; growth in %."""
    folder = WORK / "memory"
    model = folder / "model.pt"
    if not model.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        run_measured(MODEL.format(path=str(model)))
    tile_rss, tile_s, predict_rss, predict_s = {}, {}, {}, {}
    for size in SIZES:
        name = f"diag{size}"
        scene = make_flat_scene(folder / f"{name}.tif", size, diagonal=DIAGONAL)
        make_labels(folder / f"{name}_labels.tif", size)
        scenes = _catalog(folder, [name])
        out = folder / "tiles"
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured(TILE.format(scenes=str(scenes), out=str(out)))
        tile_rss[size], tile_s[size] = measured.rss_mb, float(measured.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        target = folder / f"map{size}.tif"
        code = PREDICT.format(model=str(model), scene=str(scene), out=str(target))
        measured = run_measured(code)
        predict_rss[size], predict_s[size] = measured.rss_mb, float(measured.stdout.strip().splitlines()[-1])
        target.unlink(missing_ok=True)
    result: dict = {}
    for size in SIZES:
        result[f"tile_{size}px_peak_rss_mb"] = round(tile_rss[size], 1)
    result["tile_rss_growth_pct"] = _growth(tile_rss)
    for size in SIZES:
        result[f"predict_{size}px_peak_rss_mb"] = round(predict_rss[size], 1)
    result["predict_rss_growth_pct"] = _growth(predict_rss)
    result["tile_seconds"] = {str(k): round(v, 1) for k, v in tile_s.items()}
    result["predict_seconds"] = {str(k): round(v, 1) for k, v in predict_s.items()}
    result["targets"] = {"tile_rss_growth_pct": "< 20", "predict_rss_growth_pct": "< 20"}
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
