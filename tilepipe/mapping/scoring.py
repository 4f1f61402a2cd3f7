"""Scene-level evaluation: map each whole test scene and score the map against its labels.

Tile metrics (tilepipe/ml/evaluation.py) score tiles cut on the tile grid; this scores what a user
gets from ``tilepipe predict``: the blended full-scene map, on the prediction grid, including
scene edges, nodata collars and window seams. Scenes are processed in strips (never whole).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from tilepipe.errors import bad_file
from tilepipe.fsutil import write_json
from tilepipe.geo.aoi import AoiMask
from tilepipe.geo.labels import IGNORE, open_labels
from tilepipe.geo.raster_io import gdal_env
from tilepipe.geo.remote import as_location
from tilepipe.geo.scenes import SceneRecord, read_scene_records
from tilepipe.mapping.blend import NODATA, cell_grid_shape
from tilepipe.mapping.scene import class_colours, open_scene, output_grid
from tilepipe.ml.checkpoint import ModelMeta
from tilepipe.ml.metrics import confusion, summarize
from tilepipe.ml.uncertainty import scene_intervals, with_intervals
from tilepipe.params import Params

PREVIEW_PX = 1024  # previews are decimated to at most this many px a side
MAP_READ_PX = 512  # pixel rows of the scene scored per read


def held_out_scenes(scenes_json: Path, split_json: Path) -> list[SceneRecord]:
    """Ingest records of the test scenes that are held out whole.

    With ``split.spatial_blocks`` a scene's test part is only some blocks of it; mapping the
    whole scene would score training pixels too, so such scenes are left out (tile metrics
    still cover them).
    """
    members = json.loads(Path(split_json).read_text())["members"]["test"]
    records = read_scene_records(scenes_json)
    return [r for r in records if r.scene_id in members and members[r.scene_id] is None]


def _cell_majority(labels: np.ndarray, cell: int, n_classes: int) -> np.ndarray:
    """Majority class of each ``cell`` x ``cell`` block (IGNORE where no pixel is labelled)."""
    rows, cols = labels.shape[0] // cell, labels.shape[1] // cell
    blocks = labels[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell)
    counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(n_classes)], axis=-1)
    majority = counts.argmax(axis=-1).astype(np.uint8)
    majority[counts.sum(axis=-1) == 0] = IGNORE
    return majority


def score_map(
    params: Params, meta: ModelMeta, record: SceneRecord, map_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confusion matrix of a predicted map vs the scene's labels, plus decimated (map, label) previews.

    The map is read in block rows, the labels window by window: memory does not grow with the scene.
    """
    classes = list(meta.classes)
    n_classes = len(classes)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    with gdal_env(params.tile.gdal_cache_mb), open_scene(record.image, meta, record.band_mapping) as scene:
        grid = output_grid(meta, scene.grid)
        step = max(1, math.ceil(max(grid.width, grid.height) / PREVIEW_PX))
        cell = 1 if meta.segmentation else cell_grid_shape(1, 1, meta.tile_size)[0]
        labels = open_labels(as_location(record.labels), scene.grid, params.data)
        aoi = None if record.aoi_geometry is None else AoiMask(record.aoi_geometry, record.crs, scene.grid)
        previews: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        try:
            with rasterio.open(map_path) as src:
                if (src.width, src.height) != (grid.width, grid.height) or src.crs != grid.crs:
                    raise bad_file(map_path, f"is not on the grid of {record.image} for this model")
                rows_per_read = max(1, MAP_READ_PX // cell)
                for row in range(0, grid.height, rows_per_read):
                    rows = min(rows_per_read, grid.height - row)
                    predicted = src.read(1, window=Window(0, row, grid.width, rows))
                    window = Window(0, row * cell, grid.width * cell, rows * cell)
                    truth = labels.read(window)
                    if aoi is not None:  # scored only inside the area of interest
                        truth[~aoi.inside(window)] = IGNORE
                    if cell > 1:
                        truth = _cell_majority(truth, cell, n_classes)
                    keep = (truth != IGNORE) & (predicted != NODATA)
                    cm += confusion(truth[keep], predicted[keep], n_classes)
                    pick = [r for r in range(rows) if (row + r) % step == 0]
                    previews[0].append(predicted[pick, ::step])
                    previews[1].append(truth[pick, ::step])
        finally:
            labels.close()
    return cm, np.concatenate(previews[0]), np.concatenate(previews[1])


def plot_preview(
    predicted: np.ndarray, actual: np.ndarray, classes: list[str], title: str, path: Path
) -> None:
    """Prediction and labels side by side in class colours (nodata / unlabelled in light grey)."""
    import matplotlib  # here, not at the top: predict needs none of it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from tilepipe.ml.plots import save_png

    colours = [tuple(c / 255 for c in rgb) for rgb in class_colours(classes)] + [(0.9, 0.9, 0.9)]
    cmap = ListedColormap(colours)
    n = len(classes)
    height, width = predicted.shape
    aspect = height / max(width, 1)
    panel = min(6.0, 8.0 / aspect)  # inches: panels at most 6 wide and 8 tall
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel, panel * aspect + 1.0), layout="constrained")
    for ax, data, name in zip(axes, (predicted, actual), ("prediction", "labels"), strict=True):
        ax.imshow(np.where(data < n, data, n), cmap=cmap, vmin=0, vmax=n, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    handles = [Patch(color=colours[i], label=c) for i, c in enumerate(classes)]
    handles.append(Patch(color=colours[-1], label="nodata / unlabelled"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False)
    fig.suptitle(title)
    save_png(fig, path)


def evaluate_scenes(
    params: Params, meta: ModelMeta, records: list[SceneRecord], maps_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Score each test scene's map in ``maps_dir``; write ``scene_metrics.json`` and a preview PNG each."""
    classes = list(meta.classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = np.zeros((len(classes), len(classes)), dtype=np.int64)
    scenes: dict[str, Any] = {}
    per_scene = []
    for record in records:
        map_path = Path(maps_dir) / f"{record.scene_id}.tif"
        if not map_path.is_file():
            raise bad_file(map_path, "no predicted map for this test scene (run `tilepipe predict` first)")
        cm, predicted, actual = score_map(params, meta, record, map_path)
        total += cm
        per_scene.append(cm)
        scores = summarize(cm, classes)
        scenes[record.scene_id] = {**_rounded(scores, cm), "confusion": cm.tolist()}
        title = (
            f"{record.scene_id}: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}, "
            f"mIoU {scores['miou']:.3f}"
        )
        plot_preview(predicted, actual, classes, title, out_dir / f"{record.scene_id}.png")
        print(f"scene map {title}", flush=True)
    result = {
        "task": meta.task,
        "unit": "pixel" if meta.segmentation else "cell",
        "overall": _rounded(summarize(total, classes), total),
        "intervals": scene_intervals(np.stack(per_scene), classes),
        "scenes": scenes,
        "confusion": total.tolist(),
    }
    write_json(out_dir / "scene_metrics.json", result)
    return result


def _rounded(scores: dict[str, Any], cm: np.ndarray) -> dict[str, Any]:
    out = {k: round(scores[k], 4) for k in ("accuracy", "macro_f1", "miou")}
    out["per_class_iou"] = {name: c["iou"] for name, c in scores["per_class"].items()}
    out["scored"] = int(cm.sum())
    return out


def score_maps(
    params: Params,
    meta: ModelMeta,
    split_json: Path,
    maps_dir: Path,
    scenes_json: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """``map_*`` metrics of the held-out scenes' full-scene maps, with a preview PNG each in ``out_dir``."""
    records = held_out_scenes(Path(scenes_json), split_json)
    if not records:
        print("evaluate: no test scene is held out whole (split.spatial_blocks), so no map is scored")
        return {"map_scenes": 0}
    result = evaluate_scenes(params, meta, records, maps_dir, out_dir)
    overall = result["overall"]
    metrics = {
        "map_accuracy": overall["accuracy"],
        "map_macro_f1": overall["macro_f1"],
        "map_miou": overall["miou"],
        "map_scenes": len(records),
        "map_scored": overall["scored"],
        "map_unit": result["unit"],
        "map_per_class": {  # per class over the scored cells (pixels) of every held-out map
            name: {k: c[k] for k in ("precision", "recall", "f1", "iou", "support")}
            for name, c in summarize(np.asarray(result["confusion"]), list(meta.classes))["per_class"].items()
        },
    }
    with_intervals(metrics, result["intervals"], prefix="map_")
    low_high = {k: metrics[f"map_{k}_ci"] for k in ("accuracy", "macro_f1", "miou")}
    print(
        f"evaluate: full-scene maps of {len(records)} held-out scene(s), per {result['unit']}: "
        + ", ".join(
            f"{k} {overall[k]:.3f}" + (f" [{v[0]:.3f}, {v[1]:.3f}]" if v else "") for k, v in low_high.items()
        )
    )
    return metrics
