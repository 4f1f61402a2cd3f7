"""Mapping an archive: `tilepipe map` of 4 scenes of 2048 px, then a rerun with nothing changed.

The model is the built-in pipeline's architecture at its size (small_cnn, width 24, 64 px tiles;
seeded, untrained: the speed does not depend on the weights). Figures: megapixels per second of the
first run (the command end to end, start-up included), its peak RSS, and the seconds of the rerun,
which maps nothing (start-up, hashing the 4 scenes, reading the items).
"""

from __future__ import annotations

import json
import os
import shutil

from benchmarks.common import ROOT, WORK, make_scene, run_measured

SCENES, SIZE = 4, 2048
MAKE_MODEL = """
import torch
from tilepipe.ml.checkpoint import ModelMeta, model_from_meta, save_model
torch.manual_seed(0)
meta = ModelMeta(task="classification", model="small_cnn", width=24, bands=["red", "green", "blue"],
                 scale={{"uint8": [0, 255]}}, classes=["water", "forest", "cropland", "urban", "bare"],
                 tile_size=64, mean=[0.5] * 3, std=[0.25] * 3)
save_model({path!r}, model_from_meta(meta).eval(), meta)
"""
MAP = """
import sys
from tilepipe.cli import main
code = main(["map", {catalog!r}, "--model", {model!r}, "--out", {out!r}, "--params", {params!r}])
sys.exit(code)
"""


def run() -> dict:
    """Megapixels per second and peak RSS of a first run, seconds of a rerun that maps nothing."""
    folder = WORK / "maps"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["scene_id,image"]
    for i in range(SCENES):
        make_scene(folder / f"m{i}.tif", SIZE, seed=i)
        rows.append(f"m{i},m{i}.tif")
    (folder / "catalog.csv").write_text("\n".join(rows) + "\n")
    model, out = folder / "model.pt", folder / "out"
    run_measured(MAKE_MODEL.format(path=str(model)))
    shutil.rmtree(out, ignore_errors=True)
    code = MAP.format(catalog=str(folder / "catalog.csv"), model=str(model), out=str(out),
                      params=str(ROOT / "params.yaml"))  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": ""}  # and in its own folder: no tracking store, the figure is the mapping's
    first = run_measured(code, env=env, cwd=folder)
    again = run_measured(code, env=env, cwd=folder)
    assert "nothing changed, nothing mapped" in again.stdout, again.stdout
    megapixels = SCENES * SIZE * SIZE / 1e6
    return {
        "scenes": SCENES,
        "megapixels": megapixels,
        "first_run_s": round(first.seconds, 1),
        "megapixels_per_s": round(megapixels / first.seconds, 3),
        "first_run_cpu_s": round(first.cpu_seconds, 1),
        "peak_rss_mb": round(first.rss_mb, 1),
        "rerun_nothing_changed_s": round(again.seconds, 1),
        "targets": {"rerun_nothing_changed_s": "< 15"},
        "notes": "one run each; all cores to torch (train.threads 0)",
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    print(json.dumps(run(), indent=1))
