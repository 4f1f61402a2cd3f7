"""Train stage: many epochs over every training tile of every training scene, resumable."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.dataset import (
    TileBatches,
    band_statistics,
    make_loader,
    open_stores,
    select_tiles,
    split_members,
)
from stages.errors import TilepipeError
from stages.fsutil import atomic_path, file_sha256, remove_leftovers, write_json, write_text
from stages.loops import keep_freed_memory, pick_device, prepare, score, train_epoch
from stages.metrics import summarize
from stages.models import Normalized, build_model
from stages.params import Params
from stages.plots import plot_confusion, plot_curves

EpochHook = Callable[[int, dict[str, float]], None]
MAXIMISE = {"val_macro_f1": True, "val_accuracy": True, "val_miou": True, "val_loss": False}


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


def _run_key(params: Params, split_json: Path, tiles_dir: Path) -> str:
    """What a checkpoint must match to be resumed: train params, split and tile set."""
    train = params.train.model_dump(mode="json", exclude={"resume", "workers", "threads"})
    key = {
        "train": train,
        "seed": params.seed,
        "split": file_sha256(split_json),
        "tiles": file_sha256(Path(tiles_dir) / "summary.json"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _build(params: Params, stats: dict, n_classes: int) -> tuple[nn.Module, Any, Any]:
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


def model_meta(params: Params, stats: dict, tile_size: int, epoch: int, metrics: dict) -> dict:
    """Everything evaluate and predict need to use a saved model the way it was trained."""
    return {
        "task": params.train.task,
        "model": params.train.model,
        "width": params.train.width,
        "bands": params.bands.input,
        "scale": {k: list(v) for k, v in params.bands.scale.items()},
        "classes": params.data.class_names,
        "tile_size": tile_size,
        "gsd": params.tile.gsd,
        "mean": stats["mean"],
        "std": stats["std"],
        "epoch": epoch,
        "val": {k: v for k, v in metrics.items() if k.startswith("val_")},
    }


def save_model(path: Path, model: Normalized, meta: dict) -> None:
    """Write a model (state dict + JSON-able meta) atomically."""
    # Through a file handle: torch names the archive's inner folder after a path, which would
    # make the bytes depend on the random temp name.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": model.state_dict(), "meta": meta}, fh)


def load_model(path: Path) -> tuple[Normalized, dict]:
    """Load a saved model safely (``weights_only=True``) in eval mode."""
    if not Path(path).is_file():
        raise TilepipeError(f"{path}: model not found (run `tilepipe train`)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    net = build_model(meta["model"], len(meta["bands"]), len(meta["classes"]), meta["width"])
    model = Normalized(net, meta["mean"], meta["std"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


def train(
    params: Params, tiles_dir: Path, split_json: Path, out_dir: Path, on_epoch: EpochHook | None = None
) -> dict[str, Any]:
    """Train for ``train.epochs`` epochs (or until early stopping); keep the best epoch's model."""
    tp, n_classes = params.train, len(params.data.classes)
    members = {name: split_members(split_json, name) for name in ("train", "val")}
    stores = open_stores(tiles_dir, sorted({*members["train"], *members["val"]}))
    refs = {name: select_tiles(stores, members[name], tp.task, tp.min_purity) for name in members}
    for name, ref in refs.items():
        if len(ref.tile) == 0:
            raise TilepipeError(f"{split_json}: the {name} split has no usable tile (train.min_purity?)")
    tile_size = int(next(iter(stores.values())).index["tile_size"])
    stats = band_statistics(stores, refs["train"])
    counts = class_counts(stores, refs["train"], tp.task, n_classes)
    device = pick_device(tp.precision)
    keep_freed_memory()
    model, optimizer, scheduler = _build(params, stats, n_classes)
    model = prepare(model, device, tp.precision)
    weight = class_weights(counts, tp.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device), ignore_index=-100)
    val_loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    train_data = TileBatches(stores, refs["train"], tp.task, augment=tp.augment)
    loader = make_loader(train_data, tp.batch_size, params.seed, True, tp.workers)
    val_loader = make_loader(
        TileBatches(stores, refs["val"], tp.task), params.evaluate.batch_size, 0, False, 0
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "checkpoints" / "last.pt"
    key = _run_key(params, split_json, tiles_dir)
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "history": []}
    for folder in (out_dir, last.parent):
        remove_leftovers(folder)  # temp files of a run that was killed mid-write
    if tp.resume and last.is_file():
        ckpt = load_checkpoint(last)
        if ckpt["key"] != key:
            raise TilepipeError(
                f"{last}: checkpoint was made with other params, split or tiles; "
                "set train.resume=false to start over"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = json.loads(ckpt["state"])
        print(f"train: resuming after epoch {state['epoch']} from {last}")
    elif last.parent.exists():
        shutil.rmtree(last.parent)

    metric, maximise = tp.early_stopping.metric, MAXIMISE[tp.early_stopping.metric]
    stopped_early = False
    for epoch in range(state["epoch"] + 1, tp.epochs + 1):
        started = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        result = train_epoch(
            model, loader, loss_fn, optimizer, device, tp.precision, f"epoch {epoch}/{tp.epochs}", scaler
        )
        cm, val_loss = score(model, val_loader, val_loss_fn, n_classes, device, tp.precision)
        scheduler.step()
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
        value = metrics[metric]
        improved = state["best"] is None or (value > state["best"] if maximise else value < state["best"])
        if improved:
            state.update(best=value, best_epoch=epoch, bad_epochs=0)
            save_model(out_dir / "model.pt", model, model_meta(params, stats, tile_size, epoch, metrics))
            with atomic_path(out_dir / "val_confusion.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, cm)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, **metrics})
        _checkpoint(last, key, model, optimizer, scheduler, state)
        print(
            f"epoch {epoch}/{tp.epochs}: train_loss {metrics['train_loss']:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val['accuracy']:.3f} val_macro_f1 {val['macro_f1']:.3f} "
            f"{metrics['tiles_per_second']:.0f} tiles/s{' *' if improved else ''}",
            flush=True,
        )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if state["bad_epochs"] >= tp.early_stopping.patience:
            stopped_early = True
            print(f"train: early stop, no {metric} gain in {state['bad_epochs']} epochs")
            break
    return _finish(params, out_dir, state, refs, counts, stopped_early)


CHECKPOINT_KEYS = ("key", "model", "optimizer", "scheduler", "torch_rng", "state")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint (``weights_only=True``); an unreadable one is an error, never used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError...
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TilepipeError(
            f"{path}: checkpoint is truncated or corrupt ({problem}); delete it, "
            "or set train.resume=false to start over"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise TilepipeError(f"{path}: not a tilepipe checkpoint; delete it, or set train.resume=false")
    return ckpt


def _checkpoint(path: Path, key: str, model, optimizer, scheduler, state: dict) -> None:
    blob = {
        "key": key,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": json.dumps(state),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(blob, fh)


def _finish(params: Params, out_dir: Path, state: dict, refs, counts, stopped_early: bool) -> dict:
    history = state["history"]
    summary = {
        "epochs_run": len(history),
        "best_epoch": state["best_epoch"],
        "best": {params.train.early_stopping.metric: state["best"]},
        "stopped_early": stopped_early,
        "train_tiles": len(refs["train"].tile),
        "val_tiles": len(refs["val"].tile),
        "train_scenes": len(refs["train"].scene_ids),
        "val_scenes": len(refs["val"].scene_ids),
        "tiles_seen_per_epoch": [int(h["tiles_seen"]) for h in history],
        "train_class_counts": counts.tolist(),
    }
    write_json(out_dir / "train.json", summary)
    columns = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_miou", "lr"]
    lines = [",".join(columns)] + [",".join(f"{h[c]:.6g}" for c in columns) for h in history]
    write_text(out_dir / "history.csv", "\n".join(lines) + "\n")
    plot_curves(history, out_dir / "learning_curves.png")
    cm = np.load(out_dir / "val_confusion.npy")
    plot_confusion(cm, params.data.class_names, out_dir / "val_confusion.png", "Validation (best epoch)")
    return summary
