"""The tile store: per scene, a few ``.npy`` shards plus ``index.json``.

Why ``.npy`` shards: they memory-map with numpy alone (no decode on read, a tile is a
slice), a scene becomes a handful of files DVC hashes quickly (one file per tile chokes
DVC and filesystems at millions of tiles), and any tool can open them. Shards are
written whole from a bounded buffer (``tile.shard_mb``) to a temp file and renamed, and
their checksum sits in the index, so a truncated or altered shard is never accepted. The checksum
is XXH3-128, a non-cryptographic hash made for this (about 7.8 GB/s here vs 1.4 GB/s for SHA-256,
which hashed every byte tiling writes a second time); stores written before it hold SHA-256.

Pixels are kept as the scene stores them when it holds 8- or 16-bit integers (half the bytes of
float16 or less, and no conversion while tiling); readers map them onto [0, 1] with the scene's
``bands.scale``, the same values as ``raster_io.scale_to_unit`` gives the source.
Other dtypes are stored already scaled, as float16.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xxhash

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import atomic_path, write_json
from tilepipe.geo.raster_io import scale_to_unit

INDEX = "index.json"
UNIT_DTYPE = "float16"  # how pixels of dtypes not stored as read are kept: scaled onto [0, 1]
# A test seam, never set in use: the kill test names a scene whose tiling then stops for good
# after its first shard, so the kill lands at a known point instead of in a timing window.
HOLD_SCENE = "TILEPIPE_TEST_HOLD_SCENE"
RELEASE_FILE = "TILEPIPE_TEST_RELEASE_FILE"  # with it, the held scene goes on once this file exists
CHECKSUM = "xxh3_128"  # the key of a shard's checksums in the index, named by their algorithm
_HASHES: dict[str, Callable[[], Any]] = {CHECKSUM: xxhash.xxh3_128, "sha256": hashlib.sha256}


@dataclass(frozen=True)
class PixelEncoding:
    """How a scene's shards hold pixels: ``dtype`` values mapped linearly from [low, high] onto [0, 1]."""

    dtype: str
    low: float = 0.0
    high: float = 1.0

    @classmethod
    def for_source(cls, dtype: str, scale: dict[str, tuple[float, float]]) -> PixelEncoding:
        """Source integers of up to 16 bits as read; anything else scaled to float16."""
        source, (low, high) = np.dtype(dtype), scale[dtype]
        # nodata is stored as the dtype's minimum, which must scale to 0 (it does when low >= minimum)
        if np.issubdtype(source, np.integer) and source.itemsize <= 2 and low >= np.iinfo(source).min:
            return cls(source.name, float(low), float(high))
        return cls(UNIT_DTYPE)

    @classmethod
    def from_index(cls, index: dict[str, Any]) -> PixelEncoding:
        """The encoding an index records (stores written before it was recorded hold float16)."""
        return cls(**index.get("pixels", {"dtype": UNIT_DTYPE}))

    @property
    def nodata(self) -> float:
        """The stored value of nodata pixels: it maps to 0."""
        kind = np.dtype(self.dtype)
        return float(np.iinfo(kind).min) if np.issubdtype(kind, np.integer) else 0.0

    def encode(self, raw: np.ndarray, source_dtype: str, scale: dict[str, tuple[float, float]]) -> np.ndarray:
        """A read of the source in this encoding (no copy when stored as read)."""
        if self.dtype == UNIT_DTYPE:
            return scale_to_unit(raw, source_dtype, scale).astype(UNIT_DTYPE)
        return raw.astype(self.dtype, copy=False)

    def to_unit(self, stored: np.ndarray) -> np.ndarray:
        """Stored pixels as float32 in [0, 1].

        Integers get the very values ``scale_to_unit`` gives the source: the same float32 arithmetic
        on the same integers (2-2.5x the speed of a lookup table, which needs an int64 index).
        """
        if not np.issubdtype(np.dtype(self.dtype), np.integer):
            return stored.astype(np.float32)
        return scale_to_unit(stored, self.dtype, {self.dtype: (self.low, self.high)})


class _HashingWriter:
    """File wrapper that hashes what is written (np.save streams through it)."""

    def __init__(self, fh) -> None:
        self.fh = fh
        self.digest = _HASHES[CHECKSUM]()

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
    """Buffers tiles of one scene and writes them as shards of about ``shard_mb`` MB.

    A full shard is written (hashed, written, fsynced) by one background thread while the caller
    reads and cuts the next chunk: those calls release the GIL, so reading and writing overlap.
    At most one shard is in flight, so memory stays at about two shards.
    """

    out_dir: Path
    shard_mb: int
    image_dtype: str = UNIT_DTYPE
    shards: list[dict[str, Any]] = field(default_factory=list)
    _images: list[np.ndarray] = field(default_factory=list)
    _labels: list[np.ndarray] = field(default_factory=list)
    _bytes: int = 0
    _count: int = 0
    _pool: ThreadPoolExecutor | None = None
    _in_flight: Future | None = None

    def add(self, image: np.ndarray, label: np.ndarray) -> tuple[int, int]:
        """Queue one tile; returns its (shard number, offset in shard)."""
        shards, offsets = self.add_many(image[None], label[None])
        return int(shards[0]), int(offsets[0])

    def add_many(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queue tiles (n x bands x size x size, n x size x size); returns their shards and offsets.

        Shards break after the tile that brings them to ``shard_mb``, exactly as one ``add`` per tile.
        The arrays are kept until written: do not change them afterwards.
        """
        images, labels = images.astype(self.image_dtype, copy=False), labels.astype(np.uint8, copy=False)
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
                self._submit()
        return shards, offsets

    def flush(self) -> None:
        """Write the buffered tiles as the next shard and wait until every shard is on disk."""
        self._submit()
        self._wait()

    def close(self) -> None:
        """Wait for the shard in flight (if any) and stop the writer thread; call on every exit path."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _submit(self) -> None:
        if not self._images:
            return
        self._wait()
        number = len(self.shards)
        images, labels = f"images-{number:05d}.npy", f"labels-{number:05d}.npy"
        shard = {"images": images, "labels": labels, "count": self._count, CHECKSUM: {}}
        self.shards.append(shard)
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._in_flight = self._pool.submit(self._write, shard, self._images, self._labels)
        self._images, self._labels, self._bytes, self._count = [], [], 0, 0

    def _write(self, shard: dict[str, Any], images: list[np.ndarray], labels: list[np.ndarray]) -> None:
        shard[CHECKSUM][shard["images"]] = _save_npy(self.out_dir / shard["images"], images)
        shard[CHECKSUM][shard["labels"]] = _save_npy(self.out_dir / shard["labels"], labels)
        if (held := os.environ.get(HOLD_SCENE)) and self.out_dir.name.startswith(f".{held}."):
            (self.out_dir / "held").touch()  # the test seam: say so, then stop here until killed ...
            release = os.environ.get(RELEASE_FILE)
            while not (release and Path(release).exists()):  # ... or until the release file appears
                threading.Event().wait(0.05)
            (self.out_dir / "held").unlink()

    def _wait(self) -> None:
        if self._in_flight is not None:
            done, self._in_flight = self._in_flight, None
            done.result()  # re-raises a write error here, in the caller's thread


def write_index(scene_dir: Path, index: dict[str, Any]) -> None:
    """Write a scene's index last, so its presence means the shards are complete."""
    write_json(scene_dir / INDEX, index, compact=True)


def read_index(scene_dir: Path) -> dict[str, Any]:
    """Read a scene's tile index, or fail naming it."""
    path = Path(scene_dir) / INDEX
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise TilepipeError(f"{path}: tile index not found (run `tilepipe tile`)") from None
    except orjson.JSONDecodeError as exc:
        raise TilepipeError(f"{path}: tile index is corrupt ({exc})") from None


def verify_shards(scene_dir: Path, index: dict[str, Any]) -> str | None:
    """Check every shard's checksum; return a problem description or None when all are intact."""
    for shard in index.get("shards", []):
        algorithm = CHECKSUM if CHECKSUM in shard else "sha256"
        for name, expected in shard[algorithm].items():
            path = Path(scene_dir) / name
            if not path.is_file():
                return f"{path}: shard missing"
            if _file_digest(path, algorithm) != expected:
                return f"{path}: shard checksum mismatch (truncated or modified)"
    return None


def _file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, _HASHES[algorithm]).hexdigest()


class SceneTiles:
    """Read access to one scene's tiles through memory-mapped shards."""

    def __init__(self, scene_dir: Path, verify: bool = True) -> None:
        self.dir = Path(scene_dir)
        self.index = read_index(self.dir)
        if verify and (problem := verify_shards(self.dir, self.index)):
            raise TilepipeError(problem)
        self._images = [np.load(self.dir / s["images"], mmap_mode="r") for s in self.index["shards"]]
        self._labels = [np.load(self.dir / s["labels"], mmap_mode="r") for s in self.index["shards"]]
        self.encoding = PixelEncoding.from_index(self.index)
        tiles = self.index["tiles"]
        self.shard_of = np.asarray(tiles["shard"], dtype=np.int64)
        self.offset_of = np.asarray(tiles["offset"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.shard_of)

    def stored_image(self, i: int) -> np.ndarray:
        """Tile ``i`` as stored (bands, size, size), memory-mapped: see ``encoding``."""
        return self._images[self.shard_of[i]][self.offset_of[i]]

    def image(self, i: int) -> np.ndarray:
        """Tile ``i`` as (bands, size, size) float32 in [0, 1]."""
        return self.encoding.to_unit(self.stored_image(i))

    def label(self, i: int) -> np.ndarray:
        """Tile ``i`` labels as (size, size) class indexes (255 = ignore)."""
        return self._labels[self.shard_of[i]][self.offset_of[i]]

    def gather(self, tiles: np.ndarray, labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Images (float32 in [0, 1]) and labels (or None) of many tiles: one sorted fancy index per shard."""
        shards, offsets = self.shard_of[tiles], self.offset_of[tiles]
        first = self._images[0]
        images = np.empty((len(tiles), *first.shape[1:]), dtype=first.dtype)
        classes = np.empty((len(tiles), *first.shape[2:]), dtype=np.uint8) if labels else None
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            rows = rows[np.argsort(offsets[rows], kind="stable")]
            images[rows] = self._images[shard][offsets[rows]]  # stays stored: converted once, below
            if classes is not None:
                classes[rows] = self._labels[shard][offsets[rows]]
        return self.encoding.to_unit(images), classes

    def histograms(self) -> np.ndarray:
        """Per-tile class histograms (tiles x (classes + 1)); the last column counts ignored pixels."""
        return np.asarray(self.index["tiles"]["hist"], dtype=np.int64)


def scene_dirs(tiles_dir: Path) -> dict[str, Path]:
    """scene_id -> folder, for every scene folder with an index under ``tiles_dir`` (not temp folders)."""
    found = sorted(Path(tiles_dir).glob(f"*/{INDEX}"))
    return {p.parent.name: p.parent for p in found if not p.parent.name.startswith(".")}
