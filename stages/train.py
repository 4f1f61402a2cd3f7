"""Train stage: train over every training tile of every training scene inside an MLflow run.

With ``train.nproc_per_node`` > 1 it starts that many ranks through torch.distributed's launcher, each
running this stage again; rank 0 alone opens the MLflow run and logs, the others only train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tilepipe.ml.checkpoint import load_checkpoint
from tilepipe.ml.distributed import Ranks, ranks_from_env
from tilepipe.ml.launch import launch_training
from tilepipe.ml.training import EpochHook, resumable, run_key
from tilepipe.ml.training import train as train_model
from tilepipe.params import Params
from tilepipe.tracking.runs import log_band_stats, log_epoch, log_trained_model, training_run


def existing_stats(stats_json: Path | None) -> Path | None:
    """The analyze stage's statistics file if it exists; else None (training computes what it needs)."""
    if stats_json is None or Path(stats_json).is_file():
        return stats_json
    print(f"train: {stats_json} not found: band statistics come from the training tiles (`tilepipe analyze`)")
    return None


def train(
    params: Params,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    on_epoch: EpochHook | None = None,
    stats_json: Path | None = None,
) -> dict[str, Any]:
    """Train inside an MLflow run: params, tags, one point per epoch, artifacts and the model.

    ``stats_json``: the analyze stage's band statistics, logged to the run (absent: see ``existing_stats``).
    """
    stats_json = existing_stats(stats_json)
    last = Path(out_dir) / "checkpoints" / "last.pt"
    if params.train.resume and last.is_file():
        load_checkpoint(last)  # a truncated or foreign checkpoint fails here, before any MLflow run
    ranks = ranks_from_env()
    if ranks is None and params.train.nproc_per_node > 1:
        if params.train.resume and last.is_file():  # refused here, not by every rank
            n = params.train.nproc_per_node
            resumable(last, run_key(params, split_json, tiles_dir, Ranks(0, n, 0, n)))
        launch_training(params, tiles_dir, split_json, out_dir, stats_json)
        return _launched(Path(out_dir), on_epoch)
    if ranks is not None and not ranks.main:
        return train_model(params, tiles_dir, split_json, out_dir, ranks=ranks, stats_json=stats_json)

    def log_and_forward(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    with training_run(params, split_json, model_dir=Path(out_dir)):
        if stats_json is not None:
            log_band_stats(stats_json)
        summary = train_model(
            params, tiles_dir, split_json, out_dir, log_and_forward, ranks, stats_json=stats_json
        )
        run = log_trained_model(out_dir)
    return {**summary, **run}


def _launched(out_dir: Path, on_epoch: EpochHook | None) -> dict[str, Any]:
    """What rank 0 wrote; ``on_epoch`` called for each epoch afterwards (the ranks ran elsewhere)."""
    if on_epoch is not None:
        state = json.loads(load_checkpoint(out_dir / "checkpoints" / "last.pt")["state"])
        for row in state["history"]:
            on_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
    summary = json.loads((out_dir / "train.json").read_text())
    return {**summary, **json.loads((out_dir / "run.json").read_text())}
