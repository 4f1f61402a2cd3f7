"""Scene-grouped folds for cross-validation: every testable scene in test exactly once.

The catalog's ``split`` column holds: a scene pinned to ``test`` is tested in one fold and never
trained on or validated with in any other; a scene pinned to ``train`` or ``val`` stays there in
every fold and is never tested. The other scenes are dealt into ``cv.folds`` seeded groups; in each
fold, validation scenes are drawn from the remaining ones in the ``split.ratios`` proportion of
val to train (at least one), and the rest train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import TilepipeError
from tilepipe.geo.scenes import SceneRecord
from tilepipe.tiles.store import read_index

ONE_SCENE = (
    "only one labelled scene: one scene is one sample of the world, and scene cross-validation "
    "tests each scene with a model trained on others. Add scenes"
)


def labelled_scenes(scenes: list[SceneRecord], tiles_dir: Path, n_classes: int) -> list[SceneRecord]:
    """The scenes whose tiles hold at least one labelled pixel."""
    kept = []
    for scene in scenes:
        index = read_index(Path(tiles_dir) / scene.scene_id)
        hist = np.asarray(index["tiles"]["hist"], dtype=np.int64).reshape(-1, n_classes + 1)
        if hist[:, :n_classes].sum() > 0:
            kept.append(scene)
    return kept


def assign_folds(
    scene_ids: list[str],
    pinned: dict[str, str],
    folds: int,
    seed: int,
    ratios: dict[str, float],
    source: Path,
) -> list[dict[str, list[str]]]:
    """``folds`` dicts of ``train``, ``val`` and ``test`` scene lists; each testable scene tested once."""
    if len(scene_ids) < 2:
        raise TilepipeError(f"{source}: {ONE_SCENE}")
    stay = {s: pinned[s] for s in scene_ids if pinned.get(s) in ("train", "val")}
    never_train = {s for s in scene_ids if pinned.get(s) == "test"}
    testable = sorted(s for s in scene_ids if s not in stay)
    if folds > len(testable):
        held = f" ({len(stay)} pinned to train or val by the catalog's split column)" if stay else ""
        raise TilepipeError(
            f"{source}: cv.folds={folds} but only {len(testable)} scene(s) can be tested{held}"
        )
    order = [testable[i] for i in np.random.default_rng([seed, 5]).permutation(len(testable))]
    share = ratios["val"] / max(ratios["train"] + ratios["val"], 1e-9)
    result = []
    for fold in range(folds):
        test = sorted(order[fold::folds])
        free = sorted(s for s in testable if s not in test and s not in never_train)
        pinned_val = [s for s, name in stay.items() if name == "val"]
        want = max(0, max(1, round(share * (len(free) + len(stay)))) - len(pinned_val))
        picks = np.random.default_rng([seed, 6, fold]).permutation(len(free))[:want]
        val = sorted([*pinned_val, *(free[i] for i in picks)])
        pinned_train = [s for s, name in stay.items() if name == "train"]
        train = sorted([*pinned_train, *(s for s in free if s not in val)])
        if not train or not val:
            raise TilepipeError(
                f"{source}: fold {fold + 1} of {folds} tests {len(test)} of {len(scene_ids)} scenes "
                f"and leaves {'no training' if not train else 'no validation'} scene; use fewer folds "
                "or more scenes"
            )
        result.append({"train": train, "val": val, "test": test})
    return result


def fold_members(fold: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """A fold as a split file's ``members``: every tile of each scene (``None``)."""
    return {name: dict.fromkeys(fold[name]) for name in ("train", "val", "test")}
