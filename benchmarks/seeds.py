"""How much the headline numbers move with the seed: the default pipeline under seeds 42, 43, 44.

`python -m benchmarks seeds` (not part of the default `make bench`: about 4 minutes a seed on
2 cores). The seed picks the scene split, the initial weights, the batch order and the flips,
exactly as `dvc exp run -S seed=N` would; the data and tiles do not depend on it. Each seed
runs split, train (no MLflow run), predict and evaluate with the default params; the results go
to metrics/seeds.json (committed: `tilepipe report --markdown` shows their spread beside the
reference run, and `dvc metrics show` lists them). Seed 42 is the reference run itself: its
numbers must equal metrics/metrics.json's on the machine that made them.
"""

from __future__ import annotations

import json
import os

from benchmarks.common import ROOT, WORK, run_measured
from benchmarks.datapath import default_data

SEEDS = [int(s) for s in os.environ.get("BENCH_SEEDS", "42,43,44").split(",")]
OUT = ROOT / "metrics" / "seeds.json"

CHILD = """
import json
from pathlib import Path
from tilepipe.ml.training import train
from tilepipe.params import load_params
from tilepipe.stages.evaluate import evaluate
from tilepipe.stages.predict import predict_held_out
from tilepipe.stages.split import split
work, tiles, scenes = Path({work!r}), Path({tiles!r}), Path({scenes!r})
p = load_params("params.yaml", ["seed={seed}"])
split(p, scenes, tiles, work / "split.json")
train(p, tiles, work / "split.json", work / "models")
predict_held_out(p, work / "models" / "model.pt", scenes, work / "split.json", work / "predictions")
maps = work / "predictions"
metrics = evaluate(p, work / "models", tiles, work / "split.json", work / "metrics", maps, scenes)
print(json.dumps(metrics))
"""


def run() -> dict:
    """Every seed's test metrics (tiles and maps), their mean and range; written to metrics/seeds.json."""
    from tilepipe.fsutil import write_json
    from tilepipe.results import SEED_KEYS, seed_summary

    tiles, split_json = default_data()
    scenes = split_json.parent / "scenes.json"
    runs = []
    for seed in SEEDS:
        work = WORK / "seeds" / str(seed)
        child = CHILD.format(work=str(work), tiles=str(tiles), scenes=str(scenes), seed=seed)
        metrics = json.loads(run_measured(child).stdout.strip().splitlines()[-1])
        test = json.loads((work / "split.json").read_text())["members"]["test"]
        runs.append({"seed": seed, "test_scenes": sorted(test), **{k: metrics[k] for k in SEED_KEYS}})
        print(f"  seed {seed}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in SEED_KEYS), flush=True)
    result = {"seeds": SEEDS, "summary": seed_summary(runs), "runs": runs}
    write_json(OUT, result)
    return {**result, "written": str(OUT.relative_to(ROOT))}


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
