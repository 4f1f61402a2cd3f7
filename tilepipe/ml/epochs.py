"""What each epoch and the whole training leave behind: the best model, the checkpoint, the summary.

Rank 0 alone calls these when training runs on several processes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tilepipe.fsutil import atomic_path, write_json, write_text
from tilepipe.ml.calibration import T_RANGE, at_range_end, fit_temperature, flat_samples, nll
from tilepipe.ml.checkpoint import load_model, model_meta, save_checkpoint, save_meta, save_model
from tilepipe.ml.dataset import TileBatches, TileRef, make_loader
from tilepipe.ml.distributed import Ranks
from tilepipe.ml.loops import Precision, pick_device, predict_batches, prepare
from tilepipe.ml.plots import plot_confusion, plot_curves
from tilepipe.params import Params

MAXIMISE = {"val_macro_f1": True, "val_accuracy": True, "val_miou": True, "val_loss": False}
CALIBRATION_SAMPLES = 200_000  # val tiles, or val pixels (segmentation), kept for the temperature fit


def _keep_if_best(params: Params, state: dict, epoch: int, metrics: dict[str, float]) -> bool:
    """Update the early-stopping state with this epoch's metric; True if it is the best so far."""
    metric = params.train.early_stopping.metric
    value, best = metrics[metric], state["best"]
    improved = best is None or (value > best if MAXIMISE[metric] else value < best)
    if improved:
        state.update(best=value, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return improved


def _print_epoch(params: Params, epoch: int, metrics: dict[str, float], improved: bool) -> None:
    print(
        f"epoch {epoch}/{params.train.epochs}: train_loss {metrics['train_loss']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.3f} "
        f"val_macro_f1 {metrics['val_macro_f1']:.3f} "
        f"{metrics['tiles_per_second']:.0f} tiles/s{' *' if improved else ''}",
        flush=True,
    )


def end_epoch(
    params: Params,
    trainer: Any,
    data: Any,
    out_dir: Path,
    key: str,
    state: dict,
    epoch: int,
    metrics: dict[str, float],
    cm: np.ndarray,
) -> bool:
    """Keep the model if best, checkpoint, print; True when early stopping ends the training."""
    improved = _keep_if_best(params, state, epoch, metrics)
    if improved:
        inputs = data.inputs
        meta = model_meta(
            params, data.stats, data.tile_size, epoch, metrics, trainer.init, inputs.norm, inputs.gsd_range
        )
        save_model(out_dir / "model.pt", trainer.model, meta)
        with atomic_path(out_dir / "val_confusion.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, cm)
    state["epoch"] = epoch
    state["history"].append({"epoch": epoch, **metrics})
    for name, value in (trainer.ranks_record or {}).items():
        state[name].append(value)
    last = out_dir / "checkpoints" / "last.pt"
    save_checkpoint(last, key, trainer.model, trainer.optimizer, trainer.scheduler, state)
    _print_epoch(params, epoch, metrics, improved)
    return state["bad_epochs"] >= params.train.early_stopping.patience


def finish(
    params: Params, out_dir: Path, state: dict, data: Any, stopped_early: bool, ranks: Ranks | None
) -> dict:
    """Write train.json, history.csv and the plots; the summary (tiles per rank on several processes)."""
    history, refs = state["history"], data.refs
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
        "train_class_counts": data.counts.tolist(),
        # the best model's temperature, fitted on every labelled val tile (its meta keeps it too)
        "calibration": calibrate_saved_model(
            params, data.stores, refs["calibration"], out_dir / "model.pt", data.inputs.scenes["val"]
        ),
    }
    if ranks is not None:
        summary["world_size"] = ranks.world
        summary["tiles_seen_per_rank"] = state["tiles_seen_per_rank"]  # per epoch, per rank
        summary["ranks_cover_training_set"] = state["ranks_cover_training_set"]  # per epoch
    write_json(out_dir / "train.json", summary)
    columns = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_miou", "lr"]
    lines = [",".join(columns)] + [",".join(f"{h[c]:.6g}" for c in columns) for h in history]
    write_text(out_dir / "history.csv", "\n".join(lines) + "\n")
    plot_curves(history, out_dir / "learning_curves.png")
    cm = np.load(out_dir / "val_confusion.npy")
    plot_confusion(cm, params.data.class_names, out_dir / "val_confusion.png", "Validation (best epoch)")
    return summary


def collect_logits(
    model: nn.Module, loader: Any, device: torch.device, precision: Precision, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``stride``-th labelled sample (tile or pixel, in loader order), at most CALIBRATION_SAMPLES."""
    kept_logits, kept_targets, seen, kept = [], [], 0, 0
    for logits, y in predict_batches(model, loader, device, precision):
        flat, labels = flat_samples(logits, y)
        pick = (seen + torch.arange(len(labels))) % stride == 0
        seen += len(labels)
        room = CALIBRATION_SAMPLES - kept
        kept_logits.append(flat[pick][:room].float())  # float32 while held: half the memory
        kept_targets.append(labels[pick][:room])
        kept += len(kept_targets[-1])
        if kept >= CALIBRATION_SAMPLES:
            break
    if not kept_logits:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
    return torch.cat(kept_logits), torch.cat(kept_targets)


def calibrate_saved_model(
    params: Params, stores: dict, ref: TileRef, model_path: Path, scenes: np.ndarray | None = None
) -> dict[str, Any]:
    """Fit the temperature of the model at ``model_path`` on ``ref`` (val tiles) and save it in its meta.

    The tiles are fed as in training: the model's normalisation (``scenes``: each val scene's figures).

    The fit always starts from the saved weights' raw logits, so running it again (after a kill)
    gives the same temperature and file. Returns the temperature, the samples used and the val NLL
    before and after.
    """
    model, meta = load_model(model_path)
    precision = params.train.precision
    device = pick_device(precision)
    batches = TileBatches(stores, ref, meta.task, norm=meta.norm, scenes=scenes)
    loader = make_loader(batches, params.evaluate.batch_size, 0, False, 0)
    expected = len(ref.tile) * (meta.tile_size**2 if meta.segmentation else 1)
    stride = max(1, math.ceil(expected / CALIBRATION_SAMPLES))
    logits, targets = collect_logits(prepare(model, device, precision), loader, device, precision, stride)
    temperature = fit_temperature(logits, targets)
    save_meta(model_path, replace(meta, temperature=temperature))
    logits, fitted = logits.double(), len(targets) > 0
    result = {
        "temperature": round(temperature, 6),
        "samples": len(targets),
        "val_nll_uncalibrated": round(nll(logits, targets, 1.0), 6) if fitted else None,
        "val_nll": round(nll(logits, targets, temperature), 6) if fitted else None,
    }
    unit = "pixels" if meta.segmentation else "tiles"
    if fitted:
        print(
            f"train: temperature {temperature:.3f} fitted on {len(targets)} val {unit} "
            f"(val NLL {result['val_nll_uncalibrated']:.4f} -> {result['val_nll']:.4f})"
        )
    if at_range_end(temperature):
        print(
            f"warning: temperature {temperature:.3g} is at an end of {list(T_RANGE)}: the model's val "
            "probabilities are far from calibrated (no better than chance on the val scenes?)",
            file=sys.stderr,
        )
    return result
