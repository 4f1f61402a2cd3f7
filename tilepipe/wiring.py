"""The stage wiring, defined once: stage names and the default paths between stages.

The CLI's defaults, the Prefect flows and dvc.yaml's commands all use these paths (a test checks
dvc.yaml against them), so the three ways to run the pipeline read and write the same files.
"""

from __future__ import annotations

from pathlib import Path

# dvc.yaml's order
STAGES = ("synthesize", "ingest", "tile", "split", "analyze", "train", "predict", "evaluate")
SYNTHETIC = Path("data/synthetic")
SCENES = Path("data/ingest/scenes.json")
TILES = Path("data/tiles")
SPLIT = Path("data/split/split.json")
STATS = Path("data/stats/stats.json")
MODELS = Path("models")
PREDICTIONS = Path("predictions")
METRICS = Path("metrics")
STUDY = Path("reports/study")
CV = Path("reports/cv")  # tilepipe cv: each fold's split, model and evaluation (runs/), folds.json
CV_METRICS = METRICS / "cv.json"
