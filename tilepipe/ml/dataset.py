"""Torch data path over the tile store: memory-mapped shards, shuffled across scenes, batched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tilepipe.geo.labels import IGNORE
from tilepipe.ml.normalize import Normalization, normalize
from tilepipe.tiles.store import SceneTiles

Task = Literal["classification", "segmentation"]
AUGMENT = {  # train.augment -> (flips and turns, photometric jitter)
    "none": (False, False), "geometric": (True, False), "photometric": (False, True), "both": (True, True),
}  # fmt: skip
GAIN = (0.8, 1.25)  # photometric jitter per tile and band: gain and gamma log-uniform in these ranges,
GAMMA = (0.8, 1.25)  # an offset uniform in +-OFFSET, applied to the [0, 1] pixels before normalisation
OFFSET = 0.05


@dataclass(frozen=True)
class TileRef:
    """Which tiles of the store a split uses: parallel arrays of scene number and tile number."""

    scene_ids: list[str]
    scene: np.ndarray
    tile: np.ndarray
    target: np.ndarray  # classification: majority class per tile; segmentation: -1


def split_members(split_json: Path, name: str) -> dict[str, list[int] | None]:
    """scene_id -> tile numbers (None = all tiles) of one split."""
    return json.loads(Path(split_json).read_text())["members"][name]


def select_tiles(
    stores: dict[str, SceneTiles], members: dict[str, list[int] | None], task: Task, min_purity: float
) -> TileRef:
    """Pick a split's tiles; for classification keep tiles whose majority class is pure enough."""
    scene_ids = sorted(members)
    scenes, tiles, targets = [], [], []
    for number, scene_id in enumerate(scene_ids):
        chosen = members[scene_id]
        store = stores[scene_id]
        idx = np.arange(len(store)) if chosen is None else np.asarray(chosen, dtype=np.int64)
        hist = store.histograms()[idx, :-1] if len(idx) else np.zeros((0, 1))
        labelled = hist.sum(axis=1)
        if task == "classification":
            majority = hist.argmax(axis=1) if len(idx) else np.zeros(0, dtype=np.int64)
            purity = hist.max(axis=1) / np.maximum(labelled, 1) if len(idx) else np.zeros(0)
            keep = (labelled > 0) & (purity >= min_purity)
            target = majority[keep]
        else:
            keep = labelled > 0
            target = np.full(int(keep.sum()), -1)
        scenes.append(np.full(int(keep.sum()), number))
        tiles.append(idx[keep])
        targets.append(target)
    return TileRef(
        scene_ids,
        np.concatenate(scenes).astype(np.int64) if scenes else np.zeros(0, np.int64),
        np.concatenate(tiles).astype(np.int64) if tiles else np.zeros(0, np.int64),
        np.concatenate(targets).astype(np.int64) if targets else np.zeros(0, np.int64),
    )


def band_statistics(
    stores: dict[str, SceneTiles],
    ref: TileRef,
    max_tiles: int = 4096,
    norm: Normalization | None = None,
    scenes: np.ndarray | None = None,
) -> dict[str, list]:
    """Per-band mean and std over (an evenly spread sample of) the training tiles, as the model takes them.

    That is after ``norm`` (``scenes``: each scene's mean and std, for ``scene``): the model's built-in
    layer standardises its input with these figures.
    """
    count = len(ref.tile)
    picks = np.linspace(0, count - 1, num=min(count, max_tiles)).round().astype(np.int64)
    total = total_sq = None
    pixels = 0
    for i in picks:
        image = stores[ref.scene_ids[ref.scene[i]]].image(int(ref.tile[i]))
        if norm is not None:
            image = normalize(image, norm, None if scenes is None else scenes[ref.scene[i]])
        image = image.astype(np.float64)
        flat = image.reshape(image.shape[0], -1)
        total = flat.sum(axis=1) if total is None else total + flat.sum(axis=1)
        total_sq = (flat**2).sum(axis=1) if total_sq is None else total_sq + (flat**2).sum(axis=1)
        pixels += flat.shape[1]
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 1e-12))
    return {"mean": mean.round(6).tolist(), "std": np.maximum(std, 1e-3).round(6).tolist()}


class TileBatches(Dataset):
    """A map-style dataset whose items are whole batches: ``dataset[list_of_positions]``.

    Gathering a batch with one fancy index per shard is far cheaper than one memmap slice
    per tile, and lets a DataLoader with any worker count deliver ready batches.
    ``augment``: none, geometric (flips and turns), photometric (band jitter) or both (True: geometric).
    ``norm`` and ``scenes`` (each ref scene's mean and std, for ``scene``): ``tilepipe.ml.normalize``.
    """

    def __init__(
        self,
        stores: dict[str, SceneTiles],
        ref: TileRef,
        task: Task,
        augment: bool | str = False,
        norm: Normalization | None = None,
        scenes: np.ndarray | None = None,
    ) -> None:
        self.stores, self.ref, self.task = stores, ref, task
        self.augment = {True: "geometric", False: "none"}.get(augment, augment)
        self.norm, self.scenes = norm, scenes

    def __len__(self) -> int:
        return len(self.ref.tile)

    def __getitem__(self, item: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch for (seed, epoch, positions), or for (seed, epoch, positions, rows): one rank's rows of it.

        With rows, each tile gets the flip or turn (and jitter) it gets in the whole batch on one process.
        """
        seed, epoch, positions, *share = item
        positions = np.asarray(positions, dtype=np.int64)
        segmentation = self.task == "segmentation"
        geometric, photometric = AUGMENT[self.augment]
        ops = dihedral_ops(seed, epoch, positions) if geometric else None
        jitter = jitter_draws(seed, epoch, positions, self._bands()) if photometric else None
        if share:
            rows = np.asarray(share[0], np.int64)
            positions, ops, jitter, images, labels = self._share(positions, rows, ops, jitter)
        else:
            images, labels = self.gather(positions, labels=segmentation)
        if ops is not None:
            images, labels = dihedral(images, labels, ops)
        if jitter is not None:
            images = jittered(images, jitter)
        if self.norm is not None:
            scenes = None if self.scenes is None else self.scenes[self.ref.scene[positions]]
            images = normalize(images, self.norm, scenes)
        x = torch.from_numpy(images)  # float32; the model standardises it (models.Normalized)
        if not segmentation:
            return x, torch.from_numpy(self.ref.target[positions])
        classes = labels.astype(np.int64)
        classes[classes == IGNORE] = -100
        return x, torch.from_numpy(classes)

    def _bands(self) -> int:
        return len(next(iter(self.stores.values())).index["bands"])

    def _share(self, positions: np.ndarray, rows: np.ndarray, ops, jitter) -> tuple:
        """Positions, ops, jitter and tiles of ``rows`` of a batch; none of them (shaped alike) if empty."""
        segmentation = self.task == "segmentation"
        ops = None if ops is None else ops[rows]
        jitter = None if jitter is None else jitter[rows]
        if len(rows) == 0:  # the last, short batch of an epoch left this rank nothing
            images, labels = self.gather(positions[:1], labels=segmentation)
            return positions[:0], ops, jitter, images[:0], None if labels is None else labels[:0]
        return positions[rows], ops, jitter, *self.gather(positions[rows], labels=segmentation)

    def gather(self, positions: np.ndarray, labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Tiles (float32 images in [0, 1], uint8 labels or None) for the given positions, in that order."""
        scene, tile = self.ref.scene[positions], self.ref.tile[positions]
        scenes = np.unique(scene)
        if len(scenes) == 1:  # one scene's gather is the batch already: no copy into another
            return self.stores[self.ref.scene_ids[scenes[0]]].gather(tile, labels=labels)
        first = self.stores[self.ref.scene_ids[scene[0]]]
        bands, size = first.stored_image(int(tile[0])).shape[:2]
        images = np.empty((len(positions), bands, size, size), dtype=np.float32)
        classes = np.empty((len(positions), size, size), dtype=np.uint8) if labels else None
        for s in scenes:
            store = self.stores[self.ref.scene_ids[s]]
            rows = np.flatnonzero(scene == s)
            images[rows], got = store.gather(tile[rows], labels=labels)
            if classes is not None:
                classes[rows] = got
        return images, classes


def dihedral_ops(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """Which of the 8 flips and 90-degree turns each tile of a batch gets.

    The seed travels with the batch: resume-safe, and the same in any loader worker.
    """
    return np.random.default_rng([seed, epoch, int(positions[0])]).integers(0, 8, size=len(positions))


def jitter_draws(seed: int, epoch: int, positions: np.ndarray, bands: int) -> np.ndarray:
    """Per tile and band of a batch: gain, gamma and offset, (n, 3, bands) float32.

    Seeded like the flips (seed, epoch, the batch's first position), on a stream of its own.
    """
    rng = np.random.default_rng([seed, epoch, int(positions[0]), 1])
    shape = (len(positions), bands)
    gain = np.exp(rng.uniform(np.log(GAIN[0]), np.log(GAIN[1]), shape))
    gamma = np.exp(rng.uniform(np.log(GAMMA[0]), np.log(GAMMA[1]), shape))
    offset = rng.uniform(-OFFSET, OFFSET, shape)
    return np.stack([gain, gamma, offset], axis=1).astype(np.float32)


def jittered(images: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``gain * x ** gamma + offset`` per tile and band, clipped to [0, 1] (images (n, bands, h, w))."""
    gain, gamma, offset = (draws[:, k, :, None, None] for k in range(3))
    out = np.power(images, gamma, dtype=np.float32)
    np.multiply(out, gain, out=out)
    np.add(out, offset, out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def dihedral(
    images: np.ndarray, labels: np.ndarray | None, ops: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tiles turned by ``ops[i]`` quarter turns (op % 4), then mirrored left-right when op >= 4.

    One copy per op from a strided view: less memory traffic than turning then mirroring copies.
    """
    out_images = np.empty_like(images)
    out_labels = None if labels is None else np.empty_like(labels)
    for op in np.unique(ops):
        rows = np.flatnonzero(ops == op)
        out_images[rows] = _turned(images[rows], int(op))
        if labels is not None:
            out_labels[rows] = _turned(labels[rows], int(op))
    return out_images, out_labels


def _turned(tiles: np.ndarray, op: int) -> np.ndarray:
    view = np.rot90(tiles, op % 4, axes=(-2, -1))  # as torch.rot90(..., dims=(-2, -1))
    return view[..., ::-1] if op >= 4 else view


class EpochBatchSampler(Sampler[tuple[int, int, list[int]]]):
    """Yields (seed, epoch, positions) per batch; a fresh seeded permutation across all scenes each epoch.

    The seed and epoch travel with each batch so augmentation stays deterministic in loader workers.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation to yield next."""
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        for start in range(0, self.size, self.batch_size):
            yield self.seed, self.epoch, order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.size + self.batch_size - 1) // self.batch_size


def make_loader(
    dataset: TileBatches,
    batch_size: int,
    seed: int,
    shuffle: bool,
    workers: int,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader over whole batches; ``workers`` 0 keeps both cores for training.

    ``sampler`` replaces the ``EpochBatchSampler`` (one rank's share: ``tilepipe.ml.distributed``).
    """
    sampler = sampler or EpochBatchSampler(len(dataset), batch_size, seed, shuffle)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def open_stores(tiles_dir: Path, scene_ids: list[str]) -> dict[str, SceneTiles]:
    """Open (and checksum-verify) the tile store of each scene."""
    return {s: SceneTiles(Path(tiles_dir) / s) for s in scene_ids}
