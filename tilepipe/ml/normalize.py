"""What a model's input is: tiles scaled to [0, 1] by ``bands.scale``, then ``bands.normalize``.

``normalize`` is the one function every path runs on pixels before the model: training and tile
evaluation (``tilepipe.ml.dataset``), full-scene prediction and mapping (``tilepipe.mapping.scene``).
The model carries its ``Normalization`` (mode and the training tiles' statistics); a new scene's
own figures are used only by ``scene``, which is defined by them.

- ``range``: the [0, 1] values as they are (the model's built-in layer standardises them; the
  behaviour of tilepipe before ``bands.normalize`` existed);
- ``standardize``: ``(x - mean) / std`` with the training tiles' per-band mean and std;
- ``percentile``: ``(x - p2) / (p98 - p2)`` with the training tiles' 2nd and 98th percentiles,
  clipped to [0, 1];
- ``scene``: ``(x - mean) / std`` with the statistics of the scene the pixels come from.

Invalid pixels are 0 before normalisation in every path, so they map to the same value everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from tilepipe.geo.band_stats import MIN_STD

Mode = Literal["range", "standardize", "percentile", "scene"]
MODES: tuple[str, ...] = ("range", "standardize", "percentile", "scene")
STATS_KEYS = ("mean", "std", "p2", "p98")


@dataclass(frozen=True)
class Normalization:
    """A normalisation mode and the training tiles' per-band statistics it may use."""

    mode: str = "range"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    p2: list[float] = field(default_factory=list)
    p98: list[float] = field(default_factory=list)

    @property
    def per_scene(self) -> bool:
        """True when every scene is standardised by its own statistics (``scene``)."""
        return self.mode == "scene"

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and strings (``weights_only``-safe inside ``model.pt``)."""
        return asdict(self)

    @classmethod
    def from_stats(cls, mode: str, stats: dict[str, Any] | None) -> Normalization:
        """The mode with the figures of a statistics record (``data/stats/stats.json``)."""
        if mode not in MODES:
            raise ValueError(f"unknown normalisation {mode!r} (one of {', '.join(MODES)})")
        figures = {k: [float(v) for v in stats[k]] for k in STATS_KEYS} if stats else {}
        if mode in ("standardize", "percentile") and not figures:
            raise ValueError(f"normalisation {mode} needs the training tiles' statistics")
        return cls(mode, **figures)


def scene_scale(stats: dict[str, Any]) -> np.ndarray:
    """A scene's (mean, std) per band as a (2, bands) float32 array, for ``normalize(..., scene=)``."""
    std = np.maximum(np.asarray(stats["std"], dtype=np.float64), MIN_STD)
    return np.stack([np.asarray(stats["mean"], dtype=np.float64), std]).astype(np.float32)


def normalize(image: np.ndarray, norm: Normalization, scene: np.ndarray | None = None) -> np.ndarray:
    """Pixels in [0, 1] (float32, bands on axis -3) as the model takes them, as a new array.

    ``range`` returns ``image`` itself. ``scene`` needs ``scene``: a (2, bands) array of the scene's
    mean and std (``scene_scale``), or (n, 2, bands) for a batch of n tiles from several scenes.
    """
    if norm.mode == "range":
        return image
    if norm.mode == "scene":
        if scene is None:
            raise ValueError("normalisation scene needs the scene's statistics")
        shift, scale = scene[..., 0, :], scene[..., 1, :]
    elif norm.mode == "standardize":
        shift, scale = np.asarray(norm.mean), np.maximum(np.asarray(norm.std), MIN_STD)
    else:
        shift = np.asarray(norm.p2)
        scale = np.maximum(np.asarray(norm.p98) - shift, MIN_STD)
    shift = np.asarray(shift, dtype=np.float32)[..., :, None, None]
    inverse = (1.0 / np.asarray(scale, dtype=np.float64)).astype(np.float32)[..., :, None, None]
    out = np.subtract(image, shift, dtype=np.float32)
    np.multiply(out, inverse, out=out)
    if norm.mode == "percentile":
        np.clip(out, 0.0, 1.0, out=out)
    return out
