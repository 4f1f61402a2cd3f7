"""Assigning whole scenes (or opted-in spatial blocks) to train / val / test, and counting them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import TilepipeError
from tilepipe.geo.scenes import SceneRecord
from tilepipe.params import Params

SPLITS = ("train", "val", "test")
ONE_SCENE = (
    "the catalog holds a single scene: one scene is one sample of the world, so a model judged "
    "on it learns one place and one sensor. Add scenes (evaluation needs held-out scenes), or "
    "opt in to spatial blocks of this scene with split.spatial_blocks=true"
)


def assign_scenes(
    scene_ids: list[str], ratios: dict[str, float], seed: int, pinned: dict[str, str] | None = None
) -> dict[str, str]:
    """scene_id -> split: ``pinned`` (the catalog's ``split`` column) where given, else seeded ratios."""
    fixed = {s: pinned[s] for s in scene_ids if pinned and pinned.get(s)}
    free = sorted(s for s in scene_ids if s not in fixed)
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    want = {k: ratios[k] * len(scene_ids) for k in SPLITS}
    have = {k: sum(1 for v in fixed.values() if v == k) for k in SPLITS}
    assignment = dict(fixed)
    # Fill the emptiest split relative to its target first, so small catalogs still get each split.
    for scene_id in order:
        open_splits = [k for k in SPLITS if ratios[k] > 0]
        name = min(open_splits, key=lambda k: (have[k] - want[k]) / max(want[k], 1e-9))
        assignment[scene_id] = name
        have[name] += 1
    return assignment


def assign_blocks(index: dict[str, Any], params: Params, seed: int) -> dict[str, list[int]]:
    """Spatial blocks of one scene's tiles -> split, dropping tiles within the buffer of another split."""
    sp = params.split
    rows = np.asarray(index["tiles"]["row"], dtype=np.int64)
    cols = np.asarray(index["tiles"]["col"], dtype=np.int64)
    if rows.size == 0:
        return {k: [] for k in SPLITS}
    # Overlapping tiles (stride < size) share pixels with neighbours up to this many tiles away.
    buffer = max(sp.buffer_tiles, math.ceil(index["tile_size"] / index["stride"]) - 1)
    brow, bcol = rows // sp.block_tiles, cols // sp.block_tiles
    blocks = sorted(set(zip(brow.tolist(), bcol.tolist(), strict=True)))
    names = assign_scenes([f"{r}_{c}" for r, c in blocks], sp.ratios, seed)
    block_split = np.zeros((brow.max() + 1, bcol.max() + 1), dtype=np.int8)  # empty blocks: train
    for r, c in blocks:
        block_split[r, c] = SPLITS.index(names[f"{r}_{c}"])
    # Split code of every tile position, padded by the buffer (edges repeat their block).
    pad_rows = np.clip(np.arange(-buffer, rows.max() + buffer + 1), 0, None) // sp.block_tiles
    pad_cols = np.clip(np.arange(-buffer, cols.max() + buffer + 1), 0, None) // sp.block_tiles
    grid = block_split[pad_rows.clip(max=brow.max())[:, None], pad_cols.clip(max=bcol.max())[None, :]]
    members: dict[str, list[int]] = {k: [] for k in SPLITS}
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        around = grid[r : r + 2 * buffer + 1, c : c + 2 * buffer + 1]
        own = grid[r + buffer, c + buffer]
        if np.all(around == own):
            members[SPLITS[own]].append(i)
    return members


def assign_members(
    scenes: list[SceneRecord], indexes: dict[str, dict[str, Any]], params: Params, scenes_json: Path
) -> dict[str, dict[str, list[int] | None]]:
    """Members of each split (scene_id -> tile numbers, None for all): whole scenes, or spatial blocks."""
    members: dict[str, dict[str, list[int] | None]] = {k: {} for k in SPLITS}
    if params.split.spatial_blocks:
        for s in scenes:
            for name, tiles in assign_blocks(indexes[s.scene_id], params, params.seed).items():
                if tiles:
                    members[name][s.scene_id] = tiles
        return members
    if len(scenes) == 1:
        raise TilepipeError(f"{scenes_json}: {ONE_SCENE}")
    pinned = {s.scene_id: s.split for s in scenes if s.split}
    ids = [s.scene_id for s in scenes]
    for scene_id, name in assign_scenes(ids, params.split.ratios, params.seed, pinned).items():
        members[name][scene_id] = None  # None: every tile of the scene
    return members


def count_split(
    members: dict[str, list[int] | None], indexes: dict[str, dict[str, Any]], class_names: list[str]
) -> dict[str, Any]:
    """Scenes, tiles and the labelled-pixel share of each class in one split."""
    n_classes = len(class_names)
    hist = np.zeros(n_classes + 1, dtype=np.int64)
    tiles = 0
    for scene_id, chosen in members.items():
        h = np.asarray(indexes[scene_id]["tiles"]["hist"], dtype=np.int64).reshape(-1, n_classes + 1)
        h = h if chosen is None else h[chosen]
        hist += h.sum(axis=0)
        tiles += len(h)
    labelled = max(int(hist[:n_classes].sum()), 1)
    return {
        "scenes": len(members),
        "tiles": tiles,
        "class_fraction": {c: round(int(hist[i]) / labelled, 4) for i, c in enumerate(class_names)},
    }


def print_summary(result: dict[str, Any], class_names: list[str]) -> None:
    """Print scenes, tiles and class balance per split (class names in full)."""
    widths = [max(8, len(c)) for c in class_names]
    print(f"split ({result['mode']}):")
    header = " ".join(f"{c:>{w}}" for c, w in zip(class_names, widths, strict=True))
    print(f"  {'split':<6} {'scenes':>6} {'tiles':>8}  {header}")
    for name, c in result["counts"].items():
        fractions = zip((c["class_fraction"][k] for k in class_names), widths, strict=True)
        shares = " ".join(f"{share:>{w}.1%}" for share, w in fractions)
        print(f"  {name:<6} {c['scenes']:>6} {c['tiles']:>8}  {shares}")


def class_warnings(counts: dict[str, Any], class_names: list[str]) -> list[str]:
    """Classes the model cannot learn (none in training) or that only the test split holds."""
    absent = [c for c in class_names if counts["train"]["class_fraction"][c] == 0]
    warnings = []
    if absent:
        warnings.append(
            f"class(es) {', '.join(absent)} have no labelled pixel in the training split: the model "
            "cannot learn them (add scenes that hold them, or pin a scene to train with the catalog's "
            "split column)"
        )
    test_only = [c for c in absent if counts["test"]["class_fraction"][c] > 0]
    if test_only:
        names = ", ".join(test_only)
        warnings.append(f"class(es) {names} are in the test split only: their test scores will be 0")
    return warnings
