"""Predict start-up: `tilepipe predict` of a small scene, end to end, from a fresh process.

A tiny model is trained and registered as champion once (in benchmarks/.work/startup, tiny
params, its own SQLite MLflow store); then a 300 x 300 px scene is mapped by the command a user
types, with the model given as a `model.pt` path and as `models:/NAME@champion` (the default).
Each figure is the best of REPEATS runs, each a new process. Beside them: the interpreter alone
and the imports of the predict command, measured the same way, to say where the time goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, WORK

REPEATS = 3
SIDE = 300
TINY = [
    "synthesize.scenes=5",
    "synthesize.min_size=160",
    "synthesize.max_size=260",
    "synthesize.seed=3",
    "tile.size=32",
    "tile.stride=32",
    "train.epochs=2",
    "train.width=8",
    "train.batch_size=32",
    "evaluate.min_test_tiles=1",
]
STAGES = [
    ["synthesize", "--out", "synthetic"],
    ["ingest", "--catalog", "synthetic/catalog.csv", "--out", "scenes.json"],
    ["tile", "--scenes", "scenes.json", "--out", "tiles"],
    ["split", "--scenes", "scenes.json", "--tiles", "tiles", "--out", "split.json"],
    ["train", "--tiles", "tiles", "--split", "split.json", "--out", "models"],
    ["evaluate", "--model-dir", "models", "--tiles", "tiles", "--split", "split.json", "--out", "metrics"],
]
BIN = Path(sys.executable).parent


def _env(work: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONHASHSEED": "0"}


def _prepare(work: Path) -> Path:
    """Train and register a tiny champion once; write the 300 px scene; return the scene."""
    import rasterio
    from rasterio.transform import from_origin

    sets = [x for o in TINY for x in ("--set", o)]
    if not (work / "models" / "run.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        for stage in STAGES:
            cmd = [str(BIN / "tilepipe"), stage[0], "--params", str(ROOT / "params.yaml"), *sets, *stage[1:]]
            subprocess.run(cmd, cwd=work, env=_env(work), check=True, capture_output=True, text=True)
    scene = work / "small.tif"
    data = np.random.default_rng(0).integers(0, 256, (3, SIDE, SIDE), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": SIDE, "height": SIDE, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 4000000, 1.0, 1.0)}  # fmt: skip
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(data)
        for band, name in enumerate(("red", "green", "blue"), start=1):
            dst.set_band_description(band, name)
    return scene


def _best(cmd: list[str], work: Path) -> float:
    """Best wall time of REPEATS runs of ``cmd``, each a new process."""
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run(cmd, cwd=work, env=_env(work), check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
    return round(min(times), 2)


def run() -> dict:
    """Seconds to a map of a 300 px scene: from a model.pt, from the registry's champion."""
    work = WORK / "startup"
    scene = _prepare(work)
    predict = [str(BIN / "tilepipe"), "predict", str(scene), str(work / "map.tif")]
    predict += ["--params", str(ROOT / "params.yaml"), *[x for o in TINY for x in ("--set", o)]]
    py = [sys.executable, "-c"]
    return {
        "scene_px": SIDE,
        "predict_model_pt_s": _best([*predict, "--model", str(work / "models" / "model.pt")], work),
        "predict_champion_s": _best(predict, work),
        "python_alone_s": _best([*py, "pass"], work),
        "import_cli_s": _best([*py, "import tilepipe.cli"], work),
        "import_predict_stage_s": _best([*py, "import tilepipe.stages.predict"], work),
        "import_mlflow_s": _best([*py, "import mlflow"], work),
        "repeats": REPEATS,
        "targets": {"predict_model_pt_s": "< 1.5", "predict_champion_s": "< 3"},
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
