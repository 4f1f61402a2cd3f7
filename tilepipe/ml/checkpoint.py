"""Saved models and training checkpoints: what is written, and how it is read back safely."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import atomic_path
from tilepipe.ml.models import Normalized, build_model
from tilepipe.ml.normalize import Normalization
from tilepipe.params import Params

CHECKPOINT_KEYS = ("key", "model", "optimizer", "scheduler", "torch_rng", "state")


@dataclass(frozen=True)
class ModelMeta:
    """Everything evaluate and predict need to use a saved model the way it was trained.

    Saved inside ``model.pt`` and logged as ``model_meta.json`` (as a plain dict: ``to_dict``).
    """

    task: str  # classification | segmentation
    model: str  # architecture name (tilepipe.ml.models.build_model)
    width: int
    bands: list[str]  # input band names, in input order
    scale: dict[str, list[float]]  # dtype -> [low, high] mapped onto [0, 1]
    classes: list[str]
    tile_size: int
    gsd: float | None = None  # metres; None: each scene's own resolution
    mean: list[float] = field(default_factory=list)  # per input band, of the training tiles as fed
    std: list[float] = field(default_factory=list)  # (the built-in layer's figures: models.Normalized)
    epoch: int = 0  # the best epoch, whose weights these are
    val: dict[str, float] = field(default_factory=dict)  # its validation metrics
    # lineage of pretrained weights (train.init): the file's name and SHA-256, None from random weights
    init: str | None = None
    init_sha256: str | None = None
    temperature: float = 1.0  # logits / temperature before softmax (fitted on val; 1.0: uncalibrated)
    # bands.normalize and the training tiles' statistics (Normalization.to_dict); {}: range, none kept
    normalization: dict[str, Any] = field(default_factory=dict)
    gsd_range: list[float] | None = None  # [lowest, highest] metres of the training tiles; None: unknown

    @property
    def norm(self) -> Normalization:
        """How pixels in [0, 1] are normalised before the model (``tilepipe.ml.normalize``)."""
        return Normalization(**self.normalization) if self.normalization else Normalization()

    @property
    def segmentation(self) -> bool:
        """True for a per-pixel model (maps on the pixel grid), False for a tile classifier."""
        return self.task == "segmentation"

    def to_dict(self) -> dict[str, Any]:
        """The plain, JSON-able form stored in ``model.pt`` and logged to MLflow."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelMeta:
        """Read a stored meta; models saved before the task was recorded are classifiers."""
        known = {f.name for f in fields(cls)}
        return cls(**{"task": "classification", **{k: v for k, v in raw.items() if k in known}})


def model_meta(
    params: Params,
    stats: dict,
    tile_size: int,
    epoch: int,
    metrics: dict,
    init: dict | None = None,
    norm: Normalization | None = None,
    gsd_range: list[float] | None = None,
) -> ModelMeta:
    """The meta of a model trained with ``params`` on tiles of ``tile_size`` px.

    ``init``: its lineage (pretrained weights); ``norm``: how its input is normalised; ``gsd_range``:
    the ground resolutions it was trained on.
    """
    return ModelMeta(
        task=params.train.task,
        model=params.train.model,
        width=params.train.width,
        bands=params.bands.input,
        scale={k: list(v) for k, v in params.bands.scale.items()},
        classes=params.data.class_names,
        tile_size=tile_size,
        gsd=params.tile.gsd,
        mean=stats["mean"],
        std=stats["std"],
        epoch=epoch,
        val={k: v for k, v in metrics.items() if k.startswith("val_")},
        **(init or {}),
        normalization=(norm or Normalization()).to_dict(),
        gsd_range=None if gsd_range is None else [float(g) for g in gsd_range],
    )


def save_model(path: Path, model: Normalized, meta: ModelMeta) -> None:
    """Write a model (state dict + JSON-able meta) atomically."""
    # Through a file handle: torch names the archive's inner folder after a path, which would
    # make the bytes depend on the random temp name.
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": model.state_dict(), "meta": meta.to_dict()}, fh)


def save_meta(path: Path, meta: ModelMeta) -> None:
    """Replace the meta of a saved model, its weights kept byte for byte, atomically."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": blob["state_dict"], "meta": meta.to_dict()}, fh)


def model_from_meta(meta: ModelMeta) -> Normalized:
    """A fresh model (random weights) of the architecture, bands and classes ``meta`` describes."""
    net = build_model(meta.model, len(meta.bands), len(meta.classes), meta.width)
    return Normalized(net, meta.mean, meta.std)


def load_model(path: Path) -> tuple[Normalized, ModelMeta]:
    """Load a saved model safely (``weights_only=True``) in eval mode."""
    if not Path(path).is_file():
        raise TilepipeError(f"{path}: model not found (run `tilepipe train`)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = ModelMeta.from_dict(blob["meta"])
    model = model_from_meta(meta)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta


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


def save_checkpoint(
    path: Path, key: str, model: nn.Module, optimizer: Any, scheduler: Any, state: dict
) -> None:
    """Write everything an exact resume needs: weights, optimiser, schedule, RNG and loop state."""
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
