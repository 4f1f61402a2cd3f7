"""Scene-scaling study: train on nested seeded subsets of the training scenes, score on the test scenes.

Every training sees the same number of distinct training tiles for the same number of epochs, so
the only thing that changes along the curve is how many places those tiles come from. The
single-scene trap trains on spatial blocks of one scene and scores other blocks of that scene.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import write_json
from tilepipe.ml.dataset import open_stores, select_tiles, split_members
from tilepipe.ml.evaluation import evaluate
from tilepipe.ml.training import train
from tilepipe.params import Params, apply_overrides, validate
from tilepipe.tiles.splitting import assign_blocks
from tilepipe.tiles.store import read_index

METRIC = {"classification": "macro_f1", "segmentation": "miou"}


@dataclass(frozen=True)
class Training:
    """One training of the study: which scenes, which repeat, where its files go."""

    name: str
    kind: str  # "scenes": a subset of the training scenes; "trap": spatial blocks of one scene
    size: int
    repeat: int
    seed: int
    scenes: tuple[str, ...]
    train_tiles: int
    dir: str


def study_sizes(sizes: list[int] | None, n_scenes: int, split_json: Path) -> list[int]:
    """The subset sizes: as configured, or 1, 2, 4, ... below ``n_scenes`` and then all of them."""
    if sizes is None:
        return sorted({*(2**i for i in range(n_scenes.bit_length()) if 2**i < n_scenes), n_scenes})
    if max(sizes) > n_scenes:
        raise TilepipeError(
            f"study.sizes: {max(sizes)} is more than the {n_scenes} training scene(s) of {split_json}"
        )
    return list(sizes)


def scene_orders(scenes: list[str], repeats: int, seed: int) -> list[list[str]]:
    """One seeded order of the training scenes per repeat; its prefixes are the nested subsets.

    The first scenes of the repeats differ (while there are scenes enough), so the single-scene
    points and the traps cover different places rather than one lucky or unlucky scene.
    """
    rng = np.random.default_rng([seed, 0])
    firsts = [scenes[i] for i in rng.permutation(len(scenes))]
    orders = []
    for repeat in range(repeats):
        first = firsts[repeat % len(scenes)]
        rest = [s for s in scenes if s != first]
        order = np.random.default_rng([seed, 1, repeat]).permutation(len(rest))
        orders.append([first, *(rest[i] for i in order)])
    return orders


def usable(stores: dict, scene: str, params: Params, tiles: list[int] | None = None) -> np.ndarray:
    """Tile numbers of ``scene`` that training would use (labelled; pure enough for classification)."""
    ref = select_tiles(stores, {scene: tiles}, params.train.task, params.train.min_purity)
    return ref.tile


def share(pools: dict[str, np.ndarray], total: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Draw ``total`` tiles spread evenly over the pools' scenes (a short scene gives all it has)."""
    quota = dict.fromkeys(pools, 0)
    left, open_ = total, sorted(pools)
    while left > 0 and open_:
        each, extra = divmod(left, len(open_))
        for i, scene in enumerate(list(open_)):
            take = min(each + (i < extra), len(pools[scene]) - quota[scene])
            quota[scene] += take
            left -= take
            if quota[scene] == len(pools[scene]):
                open_.remove(scene)
    return {
        s: sorted(rng.choice(pools[s], size=quota[s], replace=False).tolist())
        for s in sorted(pools)
        if quota[s]
    }


def training_params(params: Params, seed: int, epochs: int | None = None) -> Params:
    """The params of one study training: its seed, epochs (default ``study.epochs``), the thread budget."""
    study = params.study
    raw = apply_overrides(
        params.model_dump(mode="json"),
        [
            f"seed={seed}",
            f"train.epochs={epochs or study.epochs}",
            f"train.threads={study.threads}",
            "train.resume=false",
        ],
    )
    return validate(raw, source="study")


def plan_study(params: Params, tiles_dir: Path, split_json: Path, work_dir: Path) -> dict[str, Any]:
    """Choose every training's scenes and tiles; ``work_dir`` gets their split files; return the plan."""
    split_json, study = Path(split_json), params.study
    train_scenes, val_members, test_scenes = _split_scenes(split_json)
    stores = open_stores(tiles_dir, sorted({*train_scenes, *val_members}))
    pools = {s: usable(stores, s, params) for s in train_scenes}
    blocks = {s: assign_blocks(read_index(Path(tiles_dir) / s), params, params.seed) for s in train_scenes}
    budget = study.train_tiles or min(len(p) for p in pools.values())
    for scene in (s for s in train_scenes if len(pools[s]) < budget):
        print(
            f"warning: study.train_tiles={budget} but {scene} has {len(pools[scene])} usable tiles: "
            "its single-scene trainings see fewer (column train_tiles)",
            file=sys.stderr,
        )
    val = _val_sample(stores, val_members, params)
    sizes = study_sizes(study.sizes, len(train_scenes), split_json)
    trainings, seen = [], set()
    for repeat, order in enumerate(scene_orders(train_scenes, study.repeats, study.seed)):
        seed = study.seed + repeat
        for size in sizes:
            scenes = tuple(sorted(order[:size]))
            if scenes in seen:  # e.g. every repeat's "all scenes": trained once
                continue
            seen.add(scenes)
            rng = np.random.default_rng([study.seed, 2, repeat, size])
            chosen = share({s: pools[s] for s in scenes}, budget, rng)
            members = {"train": chosen, "val": val, "test": dict.fromkeys(test_scenes)}
            trainings.append((f"n{size}-r{repeat}", "scenes", size, repeat, seed, members))
        members = _trap_members(stores, params, order[0], blocks[order[0]], budget, repeat)
        trainings.append((f"trap-r{repeat}", "trap", 1, repeat, seed, members))
    if Path(work_dir).exists():  # only now: a study that cannot run leaves the last one's files alone
        shutil.rmtree(work_dir)
    val_count = sum(len(v) for v in val.values())
    return {
        "sizes": sizes,
        "repeats": study.repeats,
        "train_tiles": budget,
        "epochs": study.epochs,
        "val_tiles": val_count,
        "metric": METRIC[params.train.task],
        "train_scenes": train_scenes,
        "test_scenes": test_scenes,
        "trainings": [asdict(_write(work_dir, *t)) for t in trainings],
    }


def _split_scenes(split_json: Path) -> tuple[list[str], dict[str, Any], list[str]]:
    """Training scenes, validation members and test scenes of a whole-scene split."""
    if not split_json.is_file():
        raise TilepipeError(f"{split_json}: not found; run `dvc repro split` first")
    doc = json.loads(split_json.read_text())
    if doc.get("mode") != "scenes":
        raise TilepipeError(
            f"{split_json}: the study needs whole scenes per split (split.spatial_blocks=false)"
        )
    train_scenes = sorted(split_members(split_json, "train"))
    val_members, test_scenes = split_members(split_json, "val"), sorted(split_members(split_json, "test"))
    if not train_scenes or not val_members or not test_scenes:
        raise TilepipeError(f"{split_json}: the study needs training, validation and test scenes")
    return train_scenes, val_members, test_scenes


def _trap_members(
    stores: dict, params: Params, trap: str, blocks: dict[str, list[int]], budget: int, repeat: int
) -> dict[str, Any]:
    """The single-scene trap: train, val and test on spatial blocks of one scene."""
    parts = {k: usable(stores, trap, params, blocks[k]) for k in ("train", "val", "test")}
    if min(len(p) for p in parts.values()) == 0:
        raise TilepipeError(
            f"{trap}: too few tiles for spatial blocks of split.block_tiles={params.split.block_tiles} "
            "(the single-scene trap needs train, val and test blocks)"
        )
    rng = np.random.default_rng([params.study.seed, 3, repeat])
    return {
        "train": share({trap: parts["train"]}, budget, rng),
        "val": share({trap: parts["val"]}, params.study.val_tiles or len(parts["val"]), rng),
        "test": {trap: sorted(parts["test"].tolist())},
    }


def _val_sample(stores: dict, members: dict, params: Params) -> dict[str, list[int]]:
    """The validation tiles every training scores each epoch: a seeded sample of the val scenes."""
    pools = {s: usable(stores, s, params, members[s]) for s in sorted(members)}
    count = params.study.val_tiles or sum(len(p) for p in pools.values())
    return share(pools, count, np.random.default_rng([params.study.seed, 4]))


def _write(work_dir: Path, name: str, kind: str, size: int, repeat: int, seed: int, members) -> Training:
    folder = Path(work_dir) / name
    write_json(folder / "split.json", {"mode": f"study-{kind}", "members": members})
    scenes = tuple(sorted(members["train"]))
    tiles = sum(len(v) for v in members["train"].values())
    return Training(name, kind, size, repeat, seed, scenes, tiles, str(folder.resolve()))


def run_training(
    params: Params, training: dict[str, Any], tiles_dir: Path, split_json: Path, on_epoch=None
) -> dict[str, Any]:
    """Train one study model (tilepipe/ml/training.py) and score it on the held-out test scenes.

    A trap training is also scored on the test blocks of its own scene (its "self" score). A
    training with ``heldout_split`` (a cross-validation fold) is scored on that split's test scenes.
    """
    folder = Path(training["dir"])
    tp = training_params(params, training["seed"], training.get("epochs"))
    summary = train(tp, Path(tiles_dir), folder / "split.json", folder / "model", on_epoch=on_epoch)
    metric = METRIC[tp.train.task]
    heldout_split = Path(training.get("heldout_split") or split_json)
    heldout = evaluate(tp, folder / "model", Path(tiles_dir), heldout_split, folder / "heldout")
    row = {
        **{k: training[k] for k in ("name", "kind", "size", "repeat", "seed", "train_tiles")},
        "scenes": " ".join(training["scenes"]),
        "epochs": tp.train.epochs,
        "best_epoch": summary["best_epoch"],
        "heldout": heldout[metric],
        "self": None,
        "heldout_accuracy": heldout["accuracy"],
    }
    if training["kind"] == "trap":
        own = evaluate(tp, folder / "model", Path(tiles_dir), folder / "split.json", folder / "self")
        row["self"] = own[metric]
        row["self_metrics"] = {k: own[k] for k in ("accuracy", "macro_f1", "miou")}
    row["heldout_metrics"] = heldout
    return row
