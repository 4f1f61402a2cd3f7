"""Train stage: train over every training tile of every training scene inside an MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tilepipe.ml.checkpoint import load_checkpoint
from tilepipe.ml.training import EpochHook
from tilepipe.ml.training import train as train_model
from tilepipe.params import Params
from tilepipe.tracking.runs import log_epoch, log_trained_model, training_run


def train(
    params: Params, tiles_dir: Path, split_json: Path, out_dir: Path, on_epoch: EpochHook | None = None
) -> dict[str, Any]:
    """Train inside an MLflow run: params, tags, one point per epoch, artifacts and the model."""
    last = Path(out_dir) / "checkpoints" / "last.pt"
    if params.train.resume and last.is_file():
        load_checkpoint(last)  # a truncated or foreign checkpoint fails here, before any MLflow run

    def log_and_forward(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    with training_run(params, split_json, model_dir=Path(out_dir)):
        summary = train_model(params, tiles_dir, split_json, out_dir, on_epoch=log_and_forward)
        run = log_trained_model(out_dir)
    return {**summary, **run}
