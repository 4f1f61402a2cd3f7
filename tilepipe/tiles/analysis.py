"""Band statistics over the tile store: per scene and all together, in one streaming pass.

The ``analyze`` stage runs it on the training tiles only; training and evaluation run it on a val or
test scene's own tiles when ``bands.normalize: scene`` needs that scene's statistics.

Which pixels count: the store keeps an invalid pixel (nodata, masked, off the raster) as a value
that scales to 0 in every band, labelled 255 (ignored). A pixel counts unless it is exactly that:
0 in every band *and* unlabelled. (A valid pixel that is black in every band and unlabelled is left
out too; a labelled one, or one with any band above 0, always counts.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.geo.band_stats import BandAccumulator, method_note
from tilepipe.geo.labels import IGNORE
from tilepipe.tiles.store import SceneTiles

BATCH_PIXELS = 1 << 20  # pixels per band read at once: memory stays flat in scene size and count


def valid_mask(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, size, size) True where a tile pixel holds data (images: (n, bands, size, size) in [0, 1])."""
    return (labels != IGNORE) | (images != 0).any(axis=1)


def tile_numbers(store: SceneTiles, tiles: list[int] | None) -> np.ndarray:
    """The tile numbers a split member names (None: every tile of the scene)."""
    return np.arange(len(store)) if tiles is None else np.asarray(tiles, dtype=np.int64)


def scene_accumulator(store: SceneTiles, tiles: np.ndarray) -> BandAccumulator:
    """Band statistics of ``tiles`` of one scene, read a bounded batch at a time."""
    size = int(store.index["tile_size"])
    acc = BandAccumulator(len(store.index["bands"]))
    step = max(1, BATCH_PIXELS // (size * size))
    for start in range(0, len(tiles), step):
        images, labels = store.gather(tiles[start : start + step])
        valid = valid_mask(images, labels)
        acc.add(images.transpose(1, 0, 2, 3)[:, valid])
    return acc


def scene_statistics(stores: dict[str, SceneTiles], members: dict[str, list[int] | None]) -> dict[str, dict]:
    """scene_id -> its ``mean``, ``std``, ``p2``, ``p98`` and ``pixels`` over the member tiles.

    A scene whose member tiles hold no valid pixel (or no tile) is left out.
    """
    out = {}
    for scene_id in sorted(members):
        store = stores[scene_id]
        acc = scene_accumulator(store, tile_numbers(store, members[scene_id]))
        if acc.count:
            out[scene_id] = acc.result()
    return out


def analyze_tiles(
    tiles_dir: Path, members: dict[str, list[int] | None], classes: list[str]
) -> dict[str, Any]:
    """Statistics of the member tiles (the training split's): all together, per scene, class pixels."""
    total: BandAccumulator | None = None
    scenes: dict[str, Any] = {}
    counts = np.zeros(len(classes) + 1, dtype=np.int64)
    bands: list[str] = []
    tiles = 0
    for scene_id in sorted(members):
        store = SceneTiles(Path(tiles_dir) / scene_id)
        numbers = tile_numbers(store, members[scene_id])
        acc = scene_accumulator(store, numbers)
        if acc.count:
            scenes[scene_id] = acc.result()
        total = total or BandAccumulator(acc.bands)
        total.merge(acc)
        counts += store.histograms()[numbers].sum(axis=0) if len(numbers) else 0
        bands, tiles = list(store.index["bands"]), tiles + len(numbers)
    if total is None or total.count == 0:
        raise ValueError("the training tiles hold no valid pixel")
    return {
        "split": "train",
        "bands": bands,
        "scenes_count": len(scenes),
        "tiles": tiles,
        **total.result(),
        "class_pixels": {name: int(counts[i]) for i, name in enumerate(classes)},
        "ignored_pixels": int(counts[-1]),  # labelled 255 in the tiles: unlabelled, or nodata
        "scenes": scenes,
        "method": method_note(),
    }
