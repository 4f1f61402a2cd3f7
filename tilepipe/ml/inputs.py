"""What training feeds the model: the normalisation, its statistics, each scene's own figures, the GSDs.

The training tiles' statistics come from the ``analyze`` stage (``data/stats/stats.json``); without
that file (the study, the benchmarks, a direct ``train`` call) they are computed here the same way.
Val and test scenes' own figures (for ``bands.normalize: scene``) come from their own tiles, never
from the statistics file, which holds the training scenes only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import TilepipeError
from tilepipe.ml.normalize import Normalization, scene_scale
from tilepipe.params import Params
from tilepipe.tiles.analysis import analyze_tiles, scene_statistics
from tilepipe.tiles.store import SceneTiles


@dataclass
class ModelInputs:
    """The normalisation a training uses, the statistics record, GSD range and per-split scene figures."""

    norm: Normalization
    stats: dict[str, Any] | None  # the training tiles' record (stats.json), None if never needed
    gsd_range: list[float] | None  # [lowest, highest] metres of the training tiles, None if unknown
    scenes: dict[str, np.ndarray | None]  # split -> (scenes, 2, bands) mean and std (``scene`` only)


def read_stats(stats_json: Path, bands: list[str]) -> dict[str, Any]:
    """The analyze stage's record, checked against the model's bands; a problem is one line naming it."""
    path = Path(stats_json)
    if not path.is_file():
        raise TilepipeError(f"{path}: band statistics not found (run `tilepipe analyze`)")
    try:
        stats = json.loads(path.read_text())
        recorded = list(stats["bands"])
        if missing := [k for k in ("mean", "std", "p2", "p98") if k not in stats]:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as exc:
        raise TilepipeError(f"{path}: not a band statistics file ({type(exc).__name__}: {exc})") from None
    if recorded != list(bands):
        raise TilepipeError(
            f"{path}: made for bands {recorded}, the model takes {list(bands)} (run `tilepipe analyze` again)"
        )
    return stats


def scene_scales(
    stores: dict[str, SceneTiles], members: dict[str, list[int] | None], known: dict[str, Any] | None = None
) -> np.ndarray:
    """(scenes, 2, bands) mean and std of each member scene, in sorted order (a ``TileRef``'s numbering).

    ``known``: figures already computed per scene (stats.json's training scenes); the rest from their tiles.
    A scene without a valid pixel (so without a tile to feed) gets mean 0 and std 1.
    """
    known = known or {}
    todo = {s: t for s, t in members.items() if s not in known}
    figures = {**{s: known[s] for s in members if s in known}, **scene_statistics(stores, todo)}
    bands = len(next(iter(stores.values())).index["bands"])
    neutral = {"mean": [0.0] * bands, "std": [1.0] * bands}
    return np.stack([scene_scale(figures.get(s, neutral)) for s in sorted(members)])


def training_inputs(
    params: Params,
    tiles_dir: Path,
    stores: dict[str, SceneTiles],
    members: dict[str, dict[str, list[int] | None]],
    stats_json: Path | None,
) -> ModelInputs:
    """The inputs of a training on the ``members`` of the train and val splits."""
    mode = params.bands.normalize
    stats = None
    if stats_json is not None:
        stats = read_stats(stats_json, params.bands.input)
    elif mode != "range":
        try:
            stats = analyze_tiles(Path(tiles_dir), members["train"], params.data.class_names)
        except ValueError as exc:
            raise TilepipeError(f"{tiles_dir}: {exc}") from None
    norm = Normalization.from_stats(mode, stats)
    scenes: dict[str, np.ndarray | None] = {"train": None, "val": None}
    if norm.per_scene:
        known = stats["scenes"] if stats else None
        scenes = {name: scene_scales(stores, members[name], known if name == "train" else None)
                  for name in scenes}  # fmt: skip
    gsd = stats.get("gsd_m") if stats else None
    return ModelInputs(norm, stats, gsd, scenes)
