"""The tile store: per scene, a few ``.npy`` shards plus ``index.json``.

Why ``.npy`` shards: they memory-map with numpy alone (no decode on read, a tile is a
slice), a scene becomes a handful of files DVC hashes quickly (one file per tile chokes
DVC and filesystems at millions of tiles), and any tool can open them. Shards are
written whole from a bounded buffer (``tile.shard_mb``) to a temp file and renamed, and
their SHA-256 sits in the index, so a truncated shard is never accepted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import TilepipeError
from stages.fsutil import atomic_path, file_sha256, write_json

INDEX = "index.json"
IMAGE_DTYPE = np.float16


class _HashingWriter:
    """File wrapper that hashes what is written (np.save streams through it)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.fh.write(data)


def _save_npy(path: Path, pieces: list[np.ndarray]) -> str:
    """Write ``pieces`` (same dtype and trailing shape) as one ``.npy`` without concatenating them."""
    first = pieces[0]
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": (sum(len(p) for p in pieces), *first.shape[1:]),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer = _HashingWriter(fh)
        np.lib.format.write_array_header_1_0(writer, header)
        for piece in pieces:
            writer.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
        fh.flush()
    return writer.digest.hexdigest()


@dataclass
class ShardWriter:
    """Buffers tiles of one scene and writes them as shards of about ``shard_mb`` MB."""

    out_dir: Path
    shard_mb: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _images: list[np.ndarray] = field(default_factory=list)
    _labels: list[np.ndarray] = field(default_factory=list)
    _bytes: int = 0
    _count: int = 0

    def add(self, image: np.ndarray, label: np.ndarray) -> tuple[int, int]:
        """Queue one tile; returns its (shard number, offset in shard)."""
        shards, offsets = self.add_many(image.astype(IMAGE_DTYPE)[None], label.astype(np.uint8)[None])
        return int(shards[0]), int(offsets[0])

    def add_many(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queue tiles (n x bands x size x size, n x size x size); returns their shards and offsets.

        Shards break after the tile that brings them to ``shard_mb``, exactly as one ``add`` per tile.
        """
        images, labels = images.astype(IMAGE_DTYPE, copy=False), labels.astype(np.uint8, copy=False)
        n, limit = len(images), self.shard_mb * 1024 * 1024
        per_tile = images[0].nbytes + labels[0].nbytes if n else 1
        shards, offsets = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        start = 0
        while start < n:
            take = min(n - start, max(1, -(-(limit - self._bytes) // per_tile)))
            shards[start : start + take] = len(self.shards)
            offsets[start : start + take] = np.arange(self._count, self._count + take)
            self._images.append(images[start : start + take])
            self._labels.append(labels[start : start + take])
            self._count, self._bytes, start = self._count + take, self._bytes + take * per_tile, start + take
            if self._bytes >= limit:
                self.flush()
        return shards, offsets

    def flush(self) -> None:
        """Write the buffered tiles as the next shard."""
        if not self._images:
            return
        number = len(self.shards)
        images, labels = f"images-{number:05d}.npy", f"labels-{number:05d}.npy"
        self.shards.append(
            {
                "images": images,
                "labels": labels,
                "count": self._count,
                "sha256": {
                    images: _save_npy(self.out_dir / images, self._images),
                    labels: _save_npy(self.out_dir / labels, self._labels),
                },
            }
        )
        self._images, self._labels, self._bytes, self._count = [], [], 0, 0


def write_index(scene_dir: Path, index: dict[str, Any]) -> None:
    """Write a scene's index last, so its presence means the shards are complete."""
    write_json(scene_dir / INDEX, index, compact=True)


def read_index(scene_dir: Path) -> dict[str, Any]:
    """Read a scene's tile index, or fail naming it."""
    path = Path(scene_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TilepipeError(f"{path}: tile index not found (run `tilepipe tile`)") from None
    except json.JSONDecodeError as exc:
        raise TilepipeError(f"{path}: tile index is corrupt ({exc})") from None


def verify_shards(scene_dir: Path, index: dict[str, Any]) -> str | None:
    """Check every shard's checksum; return a problem description or None when all are intact."""
    for shard in index.get("shards", []):
        for name, expected in shard["sha256"].items():
            path = Path(scene_dir) / name
            if not path.is_file():
                return f"{path}: shard missing"
            if file_sha256(path) != expected:
                return f"{path}: shard checksum mismatch (truncated or modified)"
    return None


class SceneTiles:
    """Read access to one scene's tiles through memory-mapped shards."""

    def __init__(self, scene_dir: Path, verify: bool = True) -> None:
        self.dir = Path(scene_dir)
        self.index = read_index(self.dir)
        if verify and (problem := verify_shards(self.dir, self.index)):
            raise TilepipeError(problem)
        self._images = [np.load(self.dir / s["images"], mmap_mode="r") for s in self.index["shards"]]
        self._labels = [np.load(self.dir / s["labels"], mmap_mode="r") for s in self.index["shards"]]
        tiles = self.index["tiles"]
        self.shard_of = np.asarray(tiles["shard"], dtype=np.int64)
        self.offset_of = np.asarray(tiles["offset"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.shard_of)

    def image(self, i: int) -> np.ndarray:
        """Tile ``i`` as (bands, size, size) float16 in [0, 1], memory-mapped."""
        return self._images[self.shard_of[i]][self.offset_of[i]]

    def label(self, i: int) -> np.ndarray:
        """Tile ``i`` labels as (size, size) class indexes (255 = ignore)."""
        return self._labels[self.shard_of[i]][self.offset_of[i]]

    def gather(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of many tiles at once: one sorted fancy index per shard."""
        shards, offsets = self.shard_of[tiles], self.offset_of[tiles]
        first = self._images[0]
        images = np.empty((len(tiles), *first.shape[1:]), dtype=first.dtype)
        labels = np.empty((len(tiles), *first.shape[2:]), dtype=np.uint8)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            rows = rows[np.argsort(offsets[rows], kind="stable")]
            images[rows] = self._images[shard][offsets[rows]]
            labels[rows] = self._labels[shard][offsets[rows]]
        return images, labels

    def histograms(self) -> np.ndarray:
        """Per-tile class histograms (tiles x (classes + 1)); the last column counts ignored pixels."""
        return np.asarray(self.index["tiles"]["hist"], dtype=np.int64)


def scene_dirs(tiles_dir: Path) -> dict[str, Path]:
    """scene_id -> folder, for every scene folder with an index under ``tiles_dir`` (not temp folders)."""
    found = sorted(Path(tiles_dir).glob(f"*/{INDEX}"))
    return {p.parent.name: p.parent for p in found if not p.parent.name.startswith(".")}
