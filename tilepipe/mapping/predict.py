"""Full-scene prediction: any scene size to a Cloud Optimized GeoTIFF in bounded memory.

``predict_scene`` reads the scene in strips (tilepipe/mapping/blend.py does the sliding windows),
writes finished rows by whole blocks into a tiled GeoTIFF beside the output
(tilepipe/mapping/writer.py), then streams it into a COG and renames it into place.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rasterio.errors import RasterioError
from rasterio.windows import Window
from torch import nn
from tqdm import tqdm

from tilepipe.errors import TilepipeError, bad_file
from tilepipe.geo.aoi import AoiMask
from tilepipe.geo.raster_io import Grid, gdal_env
from tilepipe.geo.read_errors import ReadInterrupted, is_transient_read_error
from tilepipe.geo.remote import as_location
from tilepipe.mapping.blend import (
    NODATA,
    Strip,
    cell_grid_shape,
    classify_strips,
    segment_plan,
    segment_strips,
)
from tilepipe.mapping.scene import SceneView, open_scene, output_grid
from tilepipe.mapping.stats import MapStats
from tilepipe.mapping.writer import MapWriter, write_cog
from tilepipe.ml.calibration import calibrated
from tilepipe.ml.checkpoint import ModelMeta
from tilepipe.params import Params
from tilepipe.redaction import redact, redact_text


def window_total(params: Params, meta: ModelMeta, grid: Grid) -> int:
    """How many windows the model runs on (for the progress bar), after checking the window params."""
    if meta.segmentation:
        pp = params.predict
        if pp.window % 8:
            raise TilepipeError(f"predict.window {pp.window}: must be a multiple of 8 for the U-Net")
        try:
            _, _, rows, cols = segment_plan(grid.height, grid.width, pp.window, pp.margin)
        except ValueError as exc:
            raise TilepipeError(f"predict.window / predict.margin: {exc}") from None
        return len(rows) * len(cols)
    _, rows, cols = cell_grid_shape(grid.height, grid.width, meta.tile_size)
    return max(rows - 1, 1) * max(cols - 1, 1)


def predict_strips(
    params: Params,
    model: nn.Module,
    meta: ModelMeta,
    scene: SceneView,
    progress: Callable[[int], object],
    with_probs: bool = True,
) -> Iterator[Strip]:
    """Finished rows of the scene's map, top to bottom, on :func:`output_grid`.

    Probabilities are calibrated: the logits are divided by ``meta.temperature`` before the softmax.
    """
    window_total(params, meta, scene.grid)  # checks the window params before any work
    model = calibrated(model, meta).eval()
    grid, n_classes, pp = scene.grid, len(meta.classes), params.predict
    shape = (scene.read, grid.height, grid.width, n_classes)
    if meta.segmentation:
        return segment_strips(
            model, *shape, pp.window, pp.margin, pp.batch_size, progress, with_probs=with_probs
        )
    return classify_strips(model, *shape, meta.tile_size, pp.batch_size, progress, with_probs=with_probs)


def predict_scene(
    params: Params,
    model: nn.Module,
    meta: ModelMeta,
    scene: Path | str,
    output: Path | str,
    probabilities: bool = False,
    bands: str | dict[str, int] | None = None,
    aoi: tuple[dict[str, Any], str] | None = None,
    confidence: bool = False,
    stats: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Map a whole scene to a COG: band 1 class index (255 nodata), optionally a probability band each.

    ``aoi``: (GeoJSON geometry, its CRS); the map is nodata outside it.
    ``confidence``: one more (last) band, the top class's (calibrated) probability x 255.
    ``stats`` adds the map's class areas, nodata share and mean confidence
    (:class:`tilepipe.mapping.stats.MapStats`) to the summary.
    A read that failed on the way is :class:`ReadInterrupted` (a retry can help); ``quiet``: no line.
    """
    scene, output = as_location(scene), Path(output)
    if isinstance(scene, Path) and output.resolve() == scene.resolve():
        raise bad_file(output, "output would overwrite the input scene")
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, strips_path = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".strips.tif", dir=output.parent)
    os.close(fd)
    strips_file = Path(strips_path)
    try:
        tolerance = params.predict.gsd_tolerance
        with gdal_env(params.tile.gdal_cache_mb), open_scene(scene, meta, bands, tolerance) as opened:
            out_grid = output_grid(meta, opened.grid)
            total = window_total(params, meta, opened.grid)
            mask = None if aoi is None else AoiMask(*aoi, out_grid)
            if mask is not None and mask.empty:
                raise bad_file(scene, "the area of interest does not overlap the scene")
            bar = tqdm(
                total=total,
                desc=f"predict {Path(str(scene)).name}",
                unit="window",
                disable=not sys.stderr.isatty(),
            )
            writer = MapWriter(strips_file, out_grid, meta, probabilities, confidence)
            counted = MapStats(out_grid, len(meta.classes)) if stats else None
            with_probs = probabilities or stats
            try:
                for strip in predict_strips(params, model, meta, opened, bar.update, with_probs):
                    if mask is not None:
                        _blank_outside(strip, mask)
                    if counted is not None:
                        counted.add(strip)  # before the writer scales the probabilities in place
                    writer.add(strip)
            finally:
                writer.close()
                bar.close()
            write_cog(strips_file, output)
    except RasterioError as exc:
        problem = f"{redact(scene)}: read or write failed ({redact_text(str(exc).splitlines()[0])})"
        raise (ReadInterrupted if is_transient_read_error(exc) else TilepipeError)(problem) from None
    finally:
        strips_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    summary = _summary(meta, scene, output, opened.grid, out_grid, total, seconds, writer)
    if counted is not None:
        summary["stats"] = {**counted.result(), "scene_pixels": opened.grid.width * opened.grid.height}
    if not quiet:
        print(summary["line"], flush=True)
    return summary


def _blank_outside(strip: Strip, mask: AoiMask) -> None:
    """Nodata (probabilities 0) in a strip's pixels or cells whose centre lies outside the AOI."""
    rows, width = strip.classes.shape
    outside = ~mask.inside(Window(0, strip.row, width, rows))
    strip.classes[outside] = NODATA
    if strip.probs is not None:
        strip.probs[:, outside] = 0
    if strip.confidence is not None:
        strip.confidence[outside] = 0


def _summary(
    meta: ModelMeta,
    scene: Path,
    output: Path,
    grid: Grid,
    out_grid: Grid,
    windows: int,
    seconds: float,
    writer: MapWriter,
) -> dict[str, Any]:
    classes, counts = list(meta.classes), writer.counts
    mapped = int(counts[: len(classes)].sum())
    shares = sorted(((counts[i] / max(mapped, 1), name) for i, name in enumerate(classes)), reverse=True)
    nodata = 1 - mapped / max(out_grid.width * out_grid.height, 1)
    line = (
        f"predict: {Path(str(scene)).name} {grid.width}x{grid.height} px -> {output} "
        f"({out_grid.width}x{out_grid.height} {meta.task} map), {windows} windows "
        f"in {seconds:.1f} s ({grid.width * grid.height / max(seconds, 1e-9) / 1e6:.2f} Mpx/s); "
        + ", ".join(f"{name} {share:.0%}" for share, name in shares[:3])
        + f", nodata {nodata:.0%}; mean confidence {writer.mean_confidence:.3f}"
    )
    return {
        "output": str(output),
        "width": out_grid.width,
        "height": out_grid.height,
        "windows": windows,
        "seconds": round(seconds, 3),
        "class_pixels": {name: int(counts[i]) for i, name in enumerate(classes)},
        "nodata_pixels": int(out_grid.width * out_grid.height - mapped),
        "mean_confidence": round(writer.mean_confidence, 4),  # top-class probability, mapped pixels
        "temperature": meta.temperature,
        "line": line,
    }
