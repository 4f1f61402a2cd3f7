"""Writing a predicted map: whole block rows into a tiled GeoTIFF, then streamed into a COG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil

from tilepipe.fsutil import atomic_path
from tilepipe.geo.raster_io import Grid
from tilepipe.mapping.blend import NODATA, Strip
from tilepipe.mapping.scene import class_colours
from tilepipe.ml.checkpoint import ModelMeta

BLOCK = 256  # rows and columns of the intermediate GeoTIFF's blocks; rows are written a block at a time
PROB_MAX = 254  # probability bands: round(p * 255), capped at 254 because 255 is the nodata value
CONFIDENCE = "confidence"  # the description of the top-class probability band (``--confidence``)


class MapWriter:
    """Writes strips into a tiled GeoTIFF, only ever whole block rows, so no block is written twice.

    Bands: the class, a probability per class (``probabilities``), the top class's probability
    (``confidence``); each x 255 and at most 254, 255 where the class is nodata.
    """

    def __init__(
        self, path: Path, grid: Grid, meta: ModelMeta, probabilities: bool, confidence: bool = False
    ) -> None:
        classes = list(meta.classes)
        self.probabilities, self.confidence = probabilities, confidence
        count = 1 + (len(classes) if probabilities else 0) + int(confidence)
        self.dst = rasterio.open(
            path, "w", driver="GTiff", width=grid.width, height=grid.height,
            count=count, dtype="uint8", nodata=NODATA,
            crs=grid.crs, transform=grid.transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
            compress="zstd", BIGTIFF="IF_SAFER",
        )  # fmt: skip
        self.dst.update_tags(
            TILEPIPE_CLASSES=json.dumps(classes),
            TILEPIPE_TASK=meta.task,
            TILEPIPE_MODEL=meta.model,
            TILEPIPE_NODATA=str(NODATA),
            TILEPIPE_TEMPERATURE=str(meta.temperature),
        )
        self.dst.set_band_description(1, "class")
        self.dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(classes)})
        for i, name in enumerate(classes):
            if probabilities:
                self.dst.set_band_description(i + 2, name)
                self.dst.update_tags(i + 2, PROBABILITY_SCALE=f"value / 255, at most {PROB_MAX}")
        if confidence:
            self.dst.set_band_description(count, CONFIDENCE)
            self.dst.update_tags(count, PROBABILITY_SCALE=f"top-class probability x 255, at most {PROB_MAX}")
        if count == 1:
            self.dst.write_colormap(1, dict(enumerate(class_colours(classes))))
        self.row = 0
        self.pending: list[np.ndarray] = []
        self.counts = np.zeros(256, dtype=np.int64)
        self.confidence_sum = 0.0  # of the mapped (not nodata) pixels' top-class probabilities

    @property
    def mean_confidence(self) -> float:
        """Mean top-class probability of the pixels (cells) mapped so far; 0 if none."""
        return self.confidence_sum / max(int(self.counts[:NODATA].sum()), 1)

    def add(self, strip: Strip) -> None:
        """Queue finished rows; write every complete block row."""
        bands = [strip.classes[None]]
        if self.probabilities and strip.probs is not None:
            probs = np.multiply(strip.probs, 255, out=strip.probs)  # in place: strips are not reused
            bands.append(np.minimum(np.rint(probs, out=probs), PROB_MAX, out=probs).astype(np.uint8))
        if strip.confidence is not None:
            self.confidence_sum += float(strip.confidence.sum(dtype=np.float64))  # 0 where nodata
            if self.confidence:
                bands.append(_confidence_band(strip)[None])
        self.pending.append(np.concatenate(bands, axis=0))
        self.counts += np.bincount(strip.classes.ravel(), minlength=256)
        rows = sum(p.shape[1] for p in self.pending)
        if rows >= BLOCK:
            self._flush(rows // BLOCK * BLOCK)

    def _flush(self, rows: int) -> None:
        data = np.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
        self.dst.write(data[:, :rows], window=rasterio.windows.Window(0, self.row, data.shape[2], rows))
        self.row += rows
        self.pending = [data[:, rows:]] if rows < data.shape[1] else []

    def close(self) -> None:
        """Write the last rows and close the file."""
        rows = sum(p.shape[1] for p in self.pending)
        if rows:
            self._flush(rows)
        self.dst.update_tags(TILEPIPE_MEAN_CONFIDENCE=f"{self.mean_confidence:.4f}")
        self.dst.close()


def _confidence_band(strip: Strip) -> np.ndarray:
    """The top class's probability x 255 as uint8 (at most 254), NODATA where the class is."""
    scaled = np.minimum(np.rint(strip.confidence * 255), PROB_MAX).astype(np.uint8)
    scaled[strip.classes == NODATA] = NODATA
    return scaled


def write_cog(source: Path, output: Path) -> None:
    """Stream a tiled GeoTIFF into a DEFLATE COG (nearest-neighbour overviews), atomically."""
    with atomic_path(output) as tmp:
        rasterio.shutil.copy(
            source, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, RESAMPLING="NEAREST",
            OVERVIEWS="AUTO", NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER",
        )  # fmt: skip
