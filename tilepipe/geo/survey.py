"""What a catalog holds, read before any params exist: scenes, bands, dtypes, label classes.

``tilepipe catalog CATALOG`` prints a line per scene; with ``--params`` it proposes the ``data:``
and ``bands:`` sections of params.yaml from what it found. Rasters are read block by block.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilepipe.errors import bad_file
from tilepipe.fsutil import input_problem, relative_to_cwd, write_text
from tilepipe.geo.bands import band_names, parse_band_mapping
from tilepipe.geo.catalog import CatalogRow, naming_origin, read_catalog
from tilepipe.geo.labels import is_geojson
from tilepipe.geo.raster_io import gdal_env, ground_resolution, open_raster
from tilepipe.geo.remote import is_remote, read_remote_bytes, remote_stat

SAMPLE_BLOCKS = 64  # image blocks read per scene for the value range


@dataclass
class SceneSurvey:
    """One catalog scene as found: grid, bands, dtype, value range, label kind and classes."""

    scene_id: str
    size: tuple[int, int]
    crs: str
    gsd_m: float
    bands: list[str]
    band_indexes: list[int]
    dtype: str
    low: float
    high: float
    labels_kind: str
    split: str | None
    classes: Counter = field(default_factory=Counter)  # raster value or GeoJSON class -> pixels / features


def _value_range(src) -> tuple[float, float]:
    """Smallest and largest valid value over up to SAMPLE_BLOCKS blocks spread over the scene."""
    windows = [w for _, w in src.block_windows(1)]
    picks = np.unique(np.linspace(0, len(windows) - 1, num=min(len(windows), SAMPLE_BLOCKS)).round())
    low, high = np.inf, -np.inf
    for i in picks.astype(int):
        data = src.read(window=windows[i], masked=True)
        values = data.compressed() if np.ma.isMaskedArray(data) else data.ravel()
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def _raster_classes(path: Path) -> Counter:
    """Pixels per value of a label raster (nodata left out), counted block by block."""
    counts: Counter = Counter()
    with open_raster(path) as src:
        if src.dtypes[0].startswith("float"):
            raise bad_file(path, f"label raster must hold integer classes, not {src.dtypes[0]}")
        for _, window in src.block_windows(1):
            block = src.read(1, window=window, masked=True)
            values, n = np.unique(block.compressed(), return_counts=True)
            counts.update(dict(zip(values.tolist(), n.tolist(), strict=True)))
    return counts


def _geojson_classes(path: Path) -> Counter:
    """Features per ``class`` value of a GeoJSON label file."""
    try:
        raw = read_remote_bytes(path) if is_remote(path) else Path(path).read_bytes()
        features = json.loads(raw).get("features") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise bad_file(path, f"not valid GeoJSON ({exc})") from None
    classes: Counter = Counter()
    for number, feature in enumerate(features):
        label = (feature.get("properties") or {}).get("class")
        if label is None:
            raise bad_file(path, f"feature {number} has no `class` attribute")
        classes[str(label)] += 1
    return classes


def survey_scene(row: CatalogRow) -> SceneSurvey:
    """Read one scene's metadata, value range and label classes (a one-line error if unreadable)."""
    with naming_origin(row), gdal_env():
        return _survey(row)


def _survey(row: CatalogRow) -> SceneSurvey:
    if is_remote(row.labels):
        remote_stat(row.labels)
    elif problem := input_problem(row.labels, missing="label file not found"):
        raise bad_file(row.labels, problem)
    with open_raster(row.image) as src:
        names = band_names(src, parse_band_mapping(row.bands, row.image), row.band_labels, row.sensor)
        low, high = _value_range(src)
        survey = SceneSurvey(
            scene_id=row.scene_id,
            size=(src.width, src.height),
            crs=src.crs.to_string() if src.crs else "none",
            gsd_m=round(ground_resolution(src), 3) if src.crs else float("nan"),
            bands=list(names) or [f"band{i}" for i in range(1, src.count + 1)],
            band_indexes=list(names.values()) or list(range(1, src.count + 1)),
            dtype=src.dtypes[0],
            low=low,
            high=high,
            labels_kind="geojson" if is_geojson(row.labels) else "raster",
            split=row.split,
        )
    survey.classes = _geojson_classes(row.labels) if is_geojson(row.labels) else _raster_classes(row.labels)
    return survey


def survey_catalog(
    path: Path, image_asset: str | None = None, labels_asset: str | None = None
) -> list[tuple[CatalogRow, SceneSurvey]]:
    """Every scene of a catalog (CSV or STAC), with what a survey found."""
    return [(row, survey_scene(row)) for row in read_catalog(path, image_asset, labels_asset)]


def write_csv(rows: list[tuple[CatalogRow, SceneSurvey]], out: Path) -> None:
    """The CSV catalog equivalent to a STAC one: paths relative to the CSV, band names as a mapping."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scene_id", "image", "labels", "split", "bands"])
    base = Path(out).resolve().parent
    for row, survey in rows:
        named = [f"{n}={i}" for n, i in zip(survey.bands, survey.band_indexes, strict=True)]
        paths = [p if is_remote(p) else Path(os.path.relpath(Path(p).resolve(), base)).as_posix()
                 for p in (row.image, row.labels)]  # fmt: skip
        mapping = ";".join(named) if row.bands or row.band_labels else ""  # the file's own names need none
        writer.writerow([row.scene_id, *paths, row.split or "", mapping])
    write_text(out, buffer.getvalue())


def scene_line(s: SceneSurvey) -> str:
    """One line per scene: id, size, CRS, GSD, bands, dtype, label kind, split."""
    return (
        f"{s.scene_id}: {s.size[0]}x{s.size[1]} {s.crs} {s.gsd_m:g} m, bands {','.join(s.bands)}, {s.dtype} "
        f"[{s.low:g}, {s.high:g}], labels {s.labels_kind} ({len(s.classes)} classes), split {s.split or '-'}"
    )


def proposed_params(catalog: Path, scenes: list[SceneSurvey]) -> dict[str, Any]:
    """The ``data:`` and ``bands:`` sections that fit what the catalog holds."""
    raster = sum((s.classes for s in scenes if s.labels_kind == "raster"), Counter())
    named = sum((s.classes for s in scenes if s.labels_kind == "geojson"), Counter())
    classes, background = [], "ignore"
    if raster:
        common = raster.most_common(1)[0][0]
        for value in sorted(raster):
            name = "background" if value == 0 and value == common else f"class_{value}"
            classes.append({"name": name, "value": int(value)})
        background = "background" if any(c["name"] == "background" for c in classes) else "ignore"
    taken = {c["value"] for c in classes}
    for label in sorted(named):
        if label.isdigit() and int(label) in taken:
            continue  # GeoJSON giving a raster's value: the same class
        value = int(label) if label.isdigit() else next(v for v in range(1, 255) if v not in taken)
        taken.add(value)
        classes.append({"name": label if not label.isdigit() else f"class_{label}", "value": value})
    shared = [b for b in scenes[0].bands if all(b in s.bands for s in scenes)]
    scale = {}
    for dtype in sorted({s.dtype for s in scenes}):
        seen = [s for s in scenes if s.dtype == dtype]
        low, high = min(s.low for s in seen), max(s.high for s in seen)
        scale[dtype] = [low, high if high > low else low + 1]  # a flat image still needs a range
    imagery = relative_to_cwd(Path(catalog).parent)
    return {
        "data": {"catalog": relative_to_cwd(Path(catalog)), "imagery": imagery, "classes": classes,
                 "background": background},
        "bands": {"input": shared, "scale": scale},
    }  # fmt: skip


def merged_params(raw: dict[str, Any], proposed: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's sections with the proposal laid over them (bands.scale: the dtypes seen only)."""
    merged = {**raw, "data": {**raw.get("data", {}), **proposed["data"]}}
    bands = raw.get("bands", {})
    scale = {**bands.get("scale", {}), **proposed["bands"]["scale"]}
    merged["bands"] = {**bands, **proposed["bands"], "scale": scale}
    return merged


def write_sections(path: Path, merged: dict[str, Any], keys: tuple[str, ...] = ("data", "bands")) -> None:
    """Rewrite the top-level ``keys`` blocks of a params file; every other line stays as it was."""
    import yaml

    lines = Path(path).read_text().splitlines(keepends=True)
    for key in keys:
        block = yaml.safe_dump({key: merged[key]}, sort_keys=False, default_flow_style=None, width=100)
        starts = [i for i, line in enumerate(lines) if line.startswith(f"{key}:")]
        if not starts:
            lines += ["\n", block]
            continue
        end = next((j for j in range(starts[0] + 1, len(lines)) if lines[j][:1].isalpha()), len(lines))
        while end > starts[0] + 1 and not lines[end - 1].strip():
            end -= 1  # keep the blank lines before the next section
        lines[starts[0] : end] = [block]
    write_text(path, "".join(lines))
