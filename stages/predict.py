"""Predict stage: map whole scenes of any size to Cloud Optimized GeoTIFFs in bounded memory.

``resolve_model`` finds a model (a ``model.pt``, an MLflow registry alias or an MLflow run);
``predict_scene`` reads the scene in strips (stages/blend.py does the sliding windows), writes
finished rows by whole blocks into a tiled GeoTIFF beside the output, then streams it into a
COG and renames it into place.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from torch import nn
from tqdm import tqdm

from stages.blend import NODATA, Strip, cell_grid_shape, classify_strips, segment_plan, segment_strips
from stages.errors import TilepipeError, bad_file
from stages.fsutil import atomic_path
from stages.params import Params
from stages.raster_io import (
    Grid,
    aligned,
    check_georeferenced,
    gdal_env,
    ground_resolution,
    open_raster,
    parse_band_mapping,
    read_padded,
    resolve_bands,
    target_grid,
)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
QUIET_MLFLOW = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
BLOCK = 256  # rows and columns of the intermediate GeoTIFF's blocks; rows are written a block at a time
PROB_MAX = 254  # probability bands: round(p * 255), capped at 254 because 255 is the nodata value
COLOURS = {
    "water": (31, 120, 180),
    "forest": (51, 160, 44),
    "cropland": (255, 217, 47),
    "urban": (227, 26, 28),
    "bare": (191, 154, 110),
}
PALETTE = [(166, 206, 227), (178, 223, 138), (251, 154, 153), (253, 191, 111), (202, 178, 214),
           (255, 127, 0), (106, 61, 154), (177, 89, 40), (128, 128, 128), (0, 128, 128)]  # fmt: skip


def class_colours(classes: list[str]) -> list[tuple[int, int, int]]:
    """An RGB colour per class: fixed ones for the usual land-cover names, a palette for the rest."""
    return [COLOURS.get(name.lower(), PALETTE[i % len(PALETTE)]) for i, name in enumerate(classes)]


# --- finding the model ---------------------------------------------------------------------------


def resolve_model(spec: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Model (eval mode) and meta from a ``model.pt`` path, ``models:/NAME@ALIAS`` or an MLflow run id."""
    text = str(spec).strip()
    if text.startswith(("models:/", "runs:/")) or RUN_ID.match(text):
        return _from_mlflow(text)
    path = Path(text)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise TilepipeError(f"{text}: no such model file, and not models:/NAME@ALIAS or an MLflow run id")
    from stages.train import load_model

    try:
        return load_model(path)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise bad_file(path, f"not a tilepipe model.pt ({type(exc).__name__}: {reason})") from None


def _from_mlflow(spec: str) -> tuple[nn.Module, dict[str, Any]]:
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from stages.tracking import tracking_uri

    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise TilepipeError(
            f"{spec}: no MLflow store at {store} (train first, set MLFLOW_TRACKING_URI, "
            "or pass --model models/model.pt)"
        )
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    bar_setting = os.environ.get(QUIET_MLFLOW)
    os.environ[QUIET_MLFLOW] = "false"  # no download progress bars around the one summary line
    try:
        if spec.startswith("models:/"):
            run_id, uri = _registry_run(client, spec), spec
        elif spec.startswith("runs:/"):
            run_id, uri = spec.split("/")[1], spec
        else:
            run_id, uri = client.get_run(spec).info.run_id, f"runs:/{spec}/model"
        meta = mlflow.artifacts.load_dict(f"runs:/{run_id}/model_meta.json")
        logged = mlflow.pytorch.load_model(uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TilepipeError(f"{spec}: cannot load from MLflow at {store} ({reason})") from None
    finally:
        if bar_setting is None:
            os.environ.pop(QUIET_MLFLOW, None)
        else:
            os.environ[QUIET_MLFLOW] = bar_setting
    return _eager(logged, meta, spec), meta


def _eager(logged: nn.Module, meta: dict[str, Any], spec: str) -> nn.Module:
    """The logged weights in a fresh eager model.

    MLflow saves PyTorch models as ``torch.export`` programs (pt2) whose graph is traced at the
    input example's shape (one tile); sliding windows of any other size need the eager module.
    """
    from stages.models import Normalized, build_model

    net = build_model(meta["model"], len(meta["bands"]), len(meta["classes"]), meta["width"])
    model = Normalized(net, meta["mean"], meta["std"])
    try:
        model.load_state_dict(logged.state_dict())
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise TilepipeError(f"{spec}: logged weights do not fit its model_meta.json ({reason})") from None
    return model.eval()


def _registry_run(client, spec: str) -> str:
    """The source run of a registered version: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    from mlflow.exceptions import MlflowException

    rest = spec.removeprefix("models:/")
    if "@" in rest:
        version = client.get_model_version_by_alias(*rest.split("@", 1))
    elif "/" in rest:
        version = client.get_model_version(*rest.split("/", 1))
    else:  # a logged model id (models:/m-...)
        import mlflow

        return mlflow.get_logged_model(rest).source_run_id
    run_id = version.run_id or version.tags.get("run_id")
    if not run_id and version.model_id:
        import mlflow

        run_id = mlflow.get_logged_model(version.model_id).source_run_id
    if not run_id:
        raise MlflowException(f"version {version.version} of {version.name} has no source run")
    return run_id


# --- reading the scene -----------------------------------------------------------------------------


@dataclass
class SceneView:
    """A scene opened for prediction: pixels on the model's grid, the model's bands, its dtype."""

    path: Path
    view: Any  # the dataset or a WarpedVRT on the model's ground resolution
    grid: Grid
    indexes: list[int]
    dtype: str
    scale: dict[str, Any]

    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """A window (may pass the edge) as float32 bands in [0, 1], zero where invalid, and its mask."""
        raw, valid = read_padded(self.view, window, self.indexes)
        image = raw.astype(np.float32)  # raster_io.scale_to_unit, in place: strips are wide
        low, high = self.scale[self.dtype]
        image -= np.float32(low)
        image *= np.float32(1.0 / (high - low))
        np.clip(image, 0.0, 1.0, out=image)
        if np.issubdtype(raw.dtype, np.floating):  # integers cannot give NaN
            np.nan_to_num(image, copy=False, nan=0.0)
        np.copyto(image, np.float32(0), where=~valid)  # 5x faster than boolean-index assignment
        return image, valid


@contextmanager
def open_scene(path: Path | str, meta: dict[str, Any], bands: str | dict[str, int] | None = None):
    """Open a scene whose bands fit the model, on the model's grid; a misfit is a one-line error."""
    path = Path(path)
    with open_raster(path) as src:
        check_georeferenced(src)
        dtype = src.dtypes[0]
        if dtype not in meta["scale"]:
            raise bad_file(
                path, f"dtype {dtype} is not one the model knows how to scale ({', '.join(meta['scale'])})"
            )
        mapping = dict(bands) if isinstance(bands, dict) else parse_band_mapping(bands, path)
        indexes = resolve_bands(src, mapping, list(meta["bands"]))
        if len(set(indexes)) != len(indexes):
            raise bad_file(path, f"band mapping uses one band for several model inputs ({meta['bands']})")
        grid = target_grid(src, meta.get("gsd"))
        coarser = meta.get("gsd") is not None and meta["gsd"] > ground_resolution(src)
        view = aligned(src, grid, Resampling.average if coarser else Resampling.bilinear)
        try:
            yield SceneView(path, view, grid, indexes, dtype, meta["scale"])
        finally:
            if view is not src:
                view.close()


def output_grid(meta: dict[str, Any], grid: Grid) -> Grid:
    """The map's grid: the pixel grid (segmentation) or cells of tile_size // 2 px (classification)."""
    if meta.get("task") == "segmentation":
        return grid
    cell, rows, cols = cell_grid_shape(grid.height, grid.width, int(meta["tile_size"]))
    return Grid(grid.crs, grid.transform * Affine.scale(cell), cols, rows)


def window_total(params: Params, meta: dict[str, Any], grid: Grid) -> int:
    """How many windows the model runs on (for the progress bar), after checking the window params."""
    if meta.get("task") == "segmentation":
        pp = params.predict
        if pp.window % 8:
            raise TilepipeError(f"predict.window {pp.window}: must be a multiple of 8 for the U-Net")
        try:
            _, _, rows, cols = segment_plan(grid.height, grid.width, pp.window, pp.margin)
        except ValueError as exc:
            raise TilepipeError(f"predict.window / predict.margin: {exc}") from None
        return len(rows) * len(cols)
    _, rows, cols = cell_grid_shape(grid.height, grid.width, int(meta["tile_size"]))
    return max(rows - 1, 1) * max(cols - 1, 1)


def predict_strips(
    params: Params,
    model: nn.Module,
    meta: dict[str, Any],
    scene: SceneView,
    progress: Callable[[int], object],
    with_probs: bool = True,
) -> Iterator[Strip]:
    """Finished rows of the scene's map, top to bottom, on :func:`output_grid`."""
    window_total(params, meta, scene.grid)  # checks the window params before any work
    model.eval()
    grid, n_classes, pp = scene.grid, len(meta["classes"]), params.predict
    shape = (scene.read, grid.height, grid.width, n_classes)
    if meta.get("task") == "segmentation":
        return segment_strips(
            model, *shape, pp.window, pp.margin, pp.batch_size, progress, with_probs=with_probs
        )
    tile_size = int(meta["tile_size"])
    return classify_strips(model, *shape, tile_size, pp.batch_size, progress, with_probs=with_probs)


# --- writing the map -------------------------------------------------------------------------------


class MapWriter:
    """Writes strips into a tiled GeoTIFF, only ever whole block rows, so no block is written twice."""

    def __init__(self, path: Path, grid: Grid, meta: dict[str, Any], probabilities: bool) -> None:
        classes = list(meta["classes"])
        self.probabilities = probabilities
        self.dst = rasterio.open(
            path, "w", driver="GTiff", width=grid.width, height=grid.height,
            count=1 + (len(classes) if probabilities else 0), dtype="uint8", nodata=NODATA,
            crs=grid.crs, transform=grid.transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
            compress="zstd", BIGTIFF="IF_SAFER",
        )  # fmt: skip
        self.dst.update_tags(
            TILEPIPE_CLASSES=json.dumps(classes),
            TILEPIPE_TASK=str(meta.get("task", "classification")),
            TILEPIPE_MODEL=str(meta.get("model", "")),
            TILEPIPE_NODATA=str(NODATA),
        )
        self.dst.set_band_description(1, "class")
        self.dst.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(classes)})
        for i, name in enumerate(classes):
            if probabilities:
                self.dst.set_band_description(i + 2, name)
                self.dst.update_tags(i + 2, PROBABILITY_SCALE=f"value / 255, at most {PROB_MAX}")
        if not probabilities:
            self.dst.write_colormap(1, dict(enumerate(class_colours(classes))))
        self.row = 0
        self.pending: list[np.ndarray] = []
        self.counts = np.zeros(256, dtype=np.int64)

    def add(self, strip: Strip) -> None:
        """Queue finished rows; write every complete block row."""
        bands = [strip.classes[None]]
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


def predict_scene(
    params: Params,
    model: nn.Module,
    meta: dict[str, Any],
    scene: Path | str,
    output: Path | str,
    probabilities: bool = False,
    bands: str | dict[str, int] | None = None,
) -> dict[str, Any]:
    """Map a whole scene to a COG: band 1 class index (255 nodata), optionally a probability band each."""
    scene, output = Path(scene), Path(output)
    if output.resolve() == scene.resolve():
        raise bad_file(output, "output would overwrite the input scene")
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, strips_path = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".strips.tif", dir=output.parent)
    os.close(fd)
    strips_file = Path(strips_path)
    try:
        with gdal_env(params.tile.gdal_cache_mb), open_scene(scene, meta, bands) as opened:
            out_grid = output_grid(meta, opened.grid)
            total = window_total(params, meta, opened.grid)
            bar = tqdm(
                total=total, desc=f"predict {scene.name}", unit="window", disable=not sys.stderr.isatty()
            )
            writer = MapWriter(strips_file, out_grid, meta, probabilities)
            try:
                for strip in predict_strips(params, model, meta, opened, bar.update, probabilities):
                    writer.add(strip)
            finally:
                writer.close()
                bar.close()
            write_cog(strips_file, output)
    except RasterioError as exc:
        raise TilepipeError(f"{scene}: read or write failed ({str(exc).splitlines()[0]})") from None
    finally:
        strips_file.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    summary = _summary(meta, scene, output, opened.grid, out_grid, total, seconds, writer.counts)
    print(summary["line"], flush=True)
    return summary


def _summary(
    meta, scene: Path, output: Path, grid: Grid, out_grid: Grid, windows: int, seconds: float, counts
):
    classes = list(meta["classes"])
    mapped = int(counts[: len(classes)].sum())
    shares = sorted(((counts[i] / max(mapped, 1), name) for i, name in enumerate(classes)), reverse=True)
    nodata = 1 - mapped / max(out_grid.width * out_grid.height, 1)
    line = (
        f"predict: {scene.name} {grid.width}x{grid.height} px -> {output} "
        f"({out_grid.width}x{out_grid.height} {meta.get('task', 'classification')} map), {windows} windows "
        f"in {seconds:.1f} s ({grid.width * grid.height / max(seconds, 1e-9) / 1e6:.2f} Mpx/s); "
        + ", ".join(f"{name} {share:.0%}" for share, name in shares[:3])
        + f", nodata {nodata:.0%}"
    )
    return {
        "output": str(output),
        "width": out_grid.width,
        "height": out_grid.height,
        "windows": windows,
        "seconds": round(seconds, 3),
        "class_pixels": {name: int(counts[i]) for i, name in enumerate(classes)},
        "nodata_pixels": int(out_grid.width * out_grid.height - mapped),
        "line": line,
    }
