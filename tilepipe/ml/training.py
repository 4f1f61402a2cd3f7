"""Training: many epochs over every training tile of every training scene, resumable.

The pieces (data, the model and its optimiser, one epoch, the checkpoint) are separate so the
benchmarks build exactly what ``train`` builds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import file_sha256, remove_leftovers
from tilepipe.ml.checkpoint import load_checkpoint
from tilepipe.ml.dataset import (
    TileBatches,
    TileRef,
    band_statistics,
    make_loader,
    open_stores,
    select_tiles,
    split_members,
)
from tilepipe.ml.distributed import (
    RankBatchSampler,
    Ranks,
    broadcast,
    ddp_train_epoch,
    gather_seen,
    hold_if_asked,
    start_ranks,
    stop_ranks,
    wrap,
)
from tilepipe.ml.epochs import end_epoch, finish
from tilepipe.ml.finetune import frozen_body
from tilepipe.ml.inputs import ModelInputs, training_inputs
from tilepipe.ml.loops import keep_freed_memory, pick_device, prepare, score, train_epoch
from tilepipe.ml.metrics import summarize
from tilepipe.ml.models import Normalized, build_model
from tilepipe.ml.pretrained import initialise
from tilepipe.params import Params
from tilepipe.tiles.store import SceneTiles

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainingData:
    """The train and val tiles of a split, their stores, band statistics and class counts."""

    stores: dict[str, SceneTiles]
    refs: dict[str, TileRef]
    tile_size: int
    stats: dict[str, list]
    counts: np.ndarray
    inputs: ModelInputs  # normalisation, its statistics, scene figures, GSD range (tilepipe.ml.inputs)


@dataclass
class Trainer:
    """What one training step and one validation pass need."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    val_loss_fn: nn.Module
    device: torch.device
    scaler: torch.amp.GradScaler | None
    loader: Any
    val_loader: Any
    ddp: nn.Module | None = None  # the model under DistributedDataParallel, on several processes
    loss_sum: nn.Module | None = None  # loss_fn summed, not averaged (each rank's share of a batch)
    ranks_record: dict | None = None  # the last epoch's tiles per rank (rank 0, several processes)
    init: dict | None = None  # the pretrained weights' file and SHA-256 (train.init), for the meta


def class_counts(stores, ref, task: str, n_classes: int) -> np.ndarray:
    """Training examples per class: tiles (classification) or labelled pixels (segmentation)."""
    if task == "classification":
        return np.bincount(ref.target, minlength=n_classes)
    counts = np.zeros(n_classes, dtype=np.int64)
    for number, scene_id in enumerate(ref.scene_ids):
        hist = stores[scene_id].histograms()[ref.tile[ref.scene == number], :n_classes]
        counts += hist.sum(axis=0)
    return counts


def class_weights(counts: np.ndarray, mode: str) -> torch.Tensor | None:
    """Loss weights against class imbalance: inverse or square-root inverse frequency."""
    if mode == "none":
        return None
    freq = counts / max(counts.sum(), 1)
    weights = np.where(counts > 0, 1.0 / np.maximum(freq, 1e-12), 0.0)
    weights = np.sqrt(weights) if mode == "sqrt_inverse" else weights
    weights = weights / weights[counts > 0].mean()
    return torch.tensor(weights, dtype=torch.float32)


def run_key(params: Params, split_json: Path, tiles_dir: Path, ranks: Ranks | None = None) -> str:
    """What a checkpoint must match to be resumed: train params, normalisation, split, tiles (and ranks)."""
    exclude = {"resume", "workers", "threads", "nproc_per_node"}
    train = params.train.model_dump(mode="json", exclude=exclude)
    world = {"world_size": ranks.world} if ranks else {}
    key = {
        **world,
        "train": train,
        "seed": params.seed,
        "normalize": params.bands.normalize,
        "split": file_sha256(split_json),
        "tiles": file_sha256(Path(tiles_dir) / "summary.json"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_training_data(
    params: Params, tiles_dir: Path, split_json: Path, stats_json: Path | None = None
) -> TrainingData:
    """Open the stores of the train and val scenes and pick their usable tiles.

    ``stats_json``: the analyze stage's statistics (computed here when ``bands.normalize`` needs them).
    """
    tp = params.train
    members = {name: split_members(split_json, name) for name in ("train", "val")}
    stores = open_stores(tiles_dir, sorted({*members["train"], *members["val"]}))
    refs = {name: select_tiles(stores, members[name], tp.task, tp.min_purity) for name in members}
    for name, ref in refs.items():
        if len(ref.tile) == 0:
            raise TilepipeError(f"{split_json}: the {name} split has no usable tile (train.min_purity?)")
    refs["calibration"] = select_tiles(stores, members["val"], tp.task, 0.0)  # every labelled val tile
    tile_size = int(next(iter(stores.values())).index["tile_size"])
    inputs = training_inputs(params, tiles_dir, stores, members, stats_json)
    stats = band_statistics(stores, refs["train"], norm=inputs.norm, scenes=inputs.scenes["train"])
    counts = class_counts(stores, refs["train"], tp.task, len(params.data.classes))
    return TrainingData(stores, refs, tile_size, stats, counts, inputs)


def build_optimisation(params: Params, stats: dict, n_classes: int) -> tuple[nn.Module, Any, Any]:
    """The seeded model, its optimiser and its learning-rate schedule."""
    tp = params.train
    torch.manual_seed(params.seed)
    net = build_model(tp.model, len(params.bands.input), n_classes, tp.width)
    model = Normalized(net, stats["mean"], stats["std"])
    if tp.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=tp.lr, momentum=0.9, weight_decay=tp.weight_decay)
    if tp.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tp.epochs)
    elif tp.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, tp.epochs // 3), gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return model, optimizer, scheduler


def make_trainer(
    params: Params, data: TrainingData, ranks: Ranks | None = None, device: torch.device | None = None
) -> Trainer:
    """Model, optimiser, losses and loaders exactly as ``train`` runs them (after ``keep_freed_memory``).

    With ``ranks``, the loader yields this rank's share of each global batch (``RankBatchSampler``).
    """
    tp = params.train
    device = device or pick_device(tp.precision)
    model, optimizer, scheduler = build_optimisation(params, data.stats, len(params.data.classes))
    init = initialise(params, model.net, show=ranks is None or ranks.main)
    model = prepare(model, device, tp.precision)
    weight = class_weights(data.counts, tp.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device), ignore_index=-100)
    norm, scenes = data.inputs.norm, data.inputs.scenes
    train_data = TileBatches(data.stores, data.refs["train"], tp.task, tp.augment, norm, scenes["train"])
    val_data = TileBatches(data.stores, data.refs["val"], tp.task, norm=norm, scenes=scenes["val"])
    share = None
    if ranks is not None:
        share = RankBatchSampler(len(train_data), tp.batch_size, params.seed, ranks.rank, ranks.world)
    return Trainer(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=loss_fn,
        val_loss_fn=nn.CrossEntropyLoss(ignore_index=-100),
        device=device,
        scaler=torch.amp.GradScaler("cuda") if device.type == "cuda" else None,
        loader=make_loader(train_data, tp.batch_size, params.seed, True, tp.workers, sampler=share),
        val_loader=make_loader(val_data, params.evaluate.batch_size, 0, False, 0),
        loss_sum=None if ranks is None else nn.CrossEntropyLoss(weight=loss_fn.weight, reduction="sum"),
        init=init,
    )


def resumable(last: Path, key: str) -> dict[str, Any]:
    """The checkpoint at ``last`` if it was made by a run of ``key`` (see ``run_key``), else an error."""
    ckpt = load_checkpoint(last)
    if ckpt["key"] != key:
        raise TilepipeError(
            f"{last}: checkpoint was made with other params, split or tiles (or process count); "
            "set train.resume=false to start over"
        )
    return ckpt


def start_or_resume(
    params: Params, trainer: Trainer, last: Path, key: str, ranks: Ranks | None = None
) -> dict[str, Any]:
    """The loop state to start from: a matching checkpoint's (``train.resume``) or a fresh one.

    On several processes every rank loads the checkpoint; only rank 0 clears old files.
    """
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if ranks is not None:
        state.update(tiles_seen_per_rank=[], ranks_cover_training_set=[])
    main = ranks is None or ranks.main
    for folder in (last.parent.parent, last.parent) if main else ():
        remove_leftovers(folder)  # temp files of a run that was killed mid-write
    if params.train.resume and last.is_file():
        ckpt = resumable(last, key)
        trainer.model.load_state_dict(ckpt["model"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        trainer.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = json.loads(ckpt["state"])
        if main:
            print(f"train: resuming after epoch {state['epoch']} from {last}")
    elif last.parent.exists() and main:
        shutil.rmtree(last.parent)
    return state


def run_epoch(params: Params, trainer: Trainer, epoch: int, ranks: Ranks | None = None) -> tuple:
    """Train one epoch, score the val split; the epoch's metrics and val confusion matrix.

    On several processes, also who saw how many tiles; rank 0 alone validates (the others get None).
    """
    tp, t = params.train, trainer
    started = time.perf_counter()
    t.loader.sampler.set_epoch(epoch)
    lr = t.optimizer.param_groups[0]["lr"]
    desc = f"epoch {epoch}/{tp.epochs}"
    model, loss_fn, step = (
        (t.model, t.loss_fn, train_epoch) if ranks is None else (t.ddp, t.loss_sum, ddp_train_epoch)
    )
    with frozen_body(t.model.net, tp.model, t.optimizer, active=epoch <= tp.freeze_epochs):
        result = step(model, t.loader, loss_fn, t.optimizer, t.device, tp.precision, desc, t.scaler)
    if ranks is not None:
        per_rank, covered = gather_seen(t.loader.sampler.seen, t.loader.sampler.size)
        if not ranks.main:
            t.scheduler.step()
            return None, None
        t.ranks_record = {"tiles_seen_per_rank": per_rank, "ranks_cover_training_set": covered}
    n_classes = len(params.data.classes)
    cm, val_loss = score(t.model, t.val_loader, t.val_loss_fn, n_classes, t.device, tp.precision)
    t.scheduler.step()
    val = summarize(cm, params.data.class_names)
    metrics = {
        "train_loss": result["train_loss"],
        "val_loss": val_loss,
        "val_accuracy": val["accuracy"],
        "val_macro_f1": val["macro_f1"],
        "val_miou": val["miou"],
        "lr": lr,
        "epoch_seconds": time.perf_counter() - started,
        "tiles_per_second": result["tiles_per_second"],
        "tiles_seen": float(result["tiles_seen"]),
    }
    return metrics, cm


def train(
    params: Params,
    tiles_dir: Path,
    split_json: Path,
    out_dir: Path,
    on_epoch: EpochHook | None = None,
    ranks: Ranks | None = None,
    stats_json: Path | None = None,
) -> dict[str, Any]:
    """Train for ``train.epochs`` epochs (or until early stopping); keep the best epoch's model.

    With ``ranks`` (a torch.distributed job), this process is one rank: all train, rank 0 alone
    validates, writes files and calls ``on_epoch``; the others return an empty dict.
    """
    tp = params.train
    device = start_ranks(ranks, tp.batch_size, tp.threads, tp.precision) if ranks else None
    data = load_training_data(params, tiles_dir, split_json, stats_json)
    keep_freed_memory()
    trainer = make_trainer(params, data, ranks, device)
    main = ranks is None or ranks.main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "checkpoints" / "last.pt"
    key = run_key(params, split_json, tiles_dir, ranks)
    state = start_or_resume(params, trainer, last, key, ranks)
    if ranks is not None:
        trainer.ddp = wrap(trainer.model, trainer.device)  # after a resume: every rank holds its weights
    stopped_early = False
    for epoch in range(state["epoch"] + 1, tp.epochs + 1):
        metrics, cm = run_epoch(params, trainer, epoch, ranks)
        stop = end_epoch(params, trainer, data, out_dir, key, state, epoch, metrics, cm) if main else False
        if ranks is not None:
            stop = broadcast(stop)
            hold_if_asked(epoch, ranks, out_dir)
        if on_epoch is not None and main:
            on_epoch(epoch, metrics)
        if stop:
            stopped_early = True
            if main:
                metric, bad = tp.early_stopping.metric, state["bad_epochs"]
                print(f"train: early stop, no {metric} gain in {bad} epochs")
            break
    summary = finish(params, out_dir, state, data, stopped_early, ranks) if main else {}
    if ranks is not None:
        stop_ranks()
    return summary
