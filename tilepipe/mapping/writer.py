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


def top_class_confidence(probs: np.ndarray) -> np.ndarray:
    """The confidence band of a strip: the top class's softmax probability x 255 as uint8 (at most 254).

    The one place a map's confidence is computed (a calibrated model would scale ``probs`` here).
    255 is the map's nodata value, as in the probability bands.
    """
    top = probs.max(axis=0)
    return np.minimum(np.rint(top * 255), PROB_MAX).astype(np.uint8)


class MapWriter:
    """Writes strips into a tiled GeoTIFF, only ever whole block rows, so no block is written twice."""

    def __init__(
        self, path: Path, grid: Grid, meta: ModelMeta, probabilities: bool, confidence: bool = False
    ) -> None:
        classes = list(meta.classes)
        self.probabilities, self.confidence = probabilities, confidence
        first_prob = 3 if confidence else 2  # band 1 class, [band 2 confidence], then a band per class
        self.dst = rasterio.open(
            path, "w", driver="GTiff", width=grid.width, height=grid.height,
            count=first_prob - 1 + (len(classes) if probabilities else 0), dtype="uint8", nodata=NODATA,
            crs=grid.crs, transform=grid.transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
            compress="zstd", BIGTIFF="IF_SAFER",
        )  # fmt: skip
        self.dst.update_tags(
            TILEPIPE_CLASSES=json.dumps(classes),
            TILEPIPE_TASK=meta.task,
            TILEPIPE_MODEL=meta.model,
            TILEPIPE_NODATA=str(NODATA),
        )
        self.dst.set_band_description(1, "class")
        self.dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(classes)})
        if confidence:
            self.dst.set_band_description(2, "confidence")
            scale = f"top-class probability: value / 255, at most {PROB_MAX}"
            self.dst.update_tags(2, PROBABILITY_SCALE=scale)
        for i, name in enumerate(classes):
            if probabilities:
                self.dst.set_band_description(i + first_prob, name)
                self.dst.update_tags(i + first_prob, PROBABILITY_SCALE=f"value / 255, at most {PROB_MAX}")
        if not probabilities and not confidence:  # a colour table needs a one-band file
            self.dst.write_colormap(1, dict(enumerate(class_colours(classes))))
        self.row = 0
        self.pending: list[np.ndarray] = []
        self.counts = np.zeros(256, dtype=np.int64)

    def add(self, strip: Strip) -> None:
        """Queue finished rows; write every complete block row."""
        bands = [strip.classes[None]]
        if self.confidence and strip.probs is not None:
            band = top_class_confidence(strip.probs)
            band[strip.classes == NODATA] = NODATA
            bands.append(band[None])
        if self.probabilities and strip.probs is not None:
            probs = np.multiply(strip.probs, 255, out=strip.probs)  # in place: strips are not reused
            bands.append(np.minimum(np.rint(probs, out=probs), PROB_MAX, out=probs).astype(np.uint8))
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
        self.dst.close()


def write_cog(source: Path, output: Path) -> None:
    """Stream a tiled GeoTIFF into a DEFLATE COG (nearest-neighbour overviews), atomically."""
    with atomic_path(output) as tmp:
        rasterio.shutil.copy(
            source, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, RESAMPLING="NEAREST",
            OVERVIEWS="AUTO", NUM_THREADS="ALL_CPUS", BIGTIFF="IF_SAFER",
        )  # fmt: skip
