"""A map's class areas on the ellipsoid (any CRS, degrees included) and its confidence band."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin

from tests.conftest import ROOT, write_scene
from tests.test_map import make_model
from tilepipe.geo.raster_io import Grid
from tilepipe.mapping.blend import NODATA, Strip
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.stats import MapStats
from tilepipe.ml.checkpoint import load_model
from tilepipe.params import load_params

A, F = 6378137.0, 1 / 298.257223563  # WGS84
E2 = F * (2 - F)


def zone_area(lat: float) -> float:
    """Area (m^2) on the WGS84 ellipsoid between the equator and ``lat``, per radian of longitude."""
    s, e = math.sin(math.radians(lat)), math.sqrt(E2)
    return A * A * (1 - E2) / 2 * (s / (1 - E2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e))


def cell_area(lat_top: float, lat_bottom: float, degrees_wide: float) -> float:
    return math.radians(degrees_wide) * (zone_area(lat_top) - zone_area(lat_bottom))


@pytest.mark.parametrize("lat", [0.0, 45.0, 70.0])
def test_areas_on_a_degree_grid_are_those_of_the_ellipsoid(lat):
    res, width, height = 0.01, 300, 200  # 3 x 2 degrees: the area per pixel changes by row
    grid = Grid(CRS.from_epsg(4326), from_origin(10.0, lat + 2.0, res, res), width, height)
    stats = MapStats(grid, 2)
    classes = np.zeros((height, width), dtype=np.uint8)
    classes[height // 2 + 3 :] = 1  # a boundary inside a block of rows
    classes[:5, :7] = NODATA
    for row in range(0, height, 17):  # strips of any height, as the blend yields them
        stats.add(Strip(row, classes[row : row + 17], None))
    result = stats.result()
    top, bottom = lat + 2.0, lat + 2.0 - (height // 2 + 3) * res
    hectare = 1e4
    assert result["class_hectares"][1] == pytest.approx(cell_area(bottom, lat, 3.0) / hectare, rel=5e-5)
    nodata = cell_area(top, top - 5 * res, 7 * res)
    expected_0 = (cell_area(top, bottom, 3.0) - nodata) / hectare
    assert result["class_hectares"][0] == pytest.approx(expected_0, rel=5e-5)
    whole = (cell_area(top, lat, 3.0) - nodata) / hectare
    assert sum(result["class_hectares"]) == pytest.approx(whole, rel=2e-6)
    assert result["class_cells"] == [int((classes == 0).sum()), int((classes == 1).sum())]
    assert result["nodata_fraction"] == pytest.approx(35 / (width * height), abs=1e-6)
    assert result["mean_confidence"] is None  # no probabilities were given


def test_the_confidence_band_is_the_top_class_probability(tmp_path):
    torch.set_num_threads(1)
    scene = write_scene(tmp_path, "s", size=(200, 160))["image"]
    model, meta = load_model(make_model(tmp_path / "model.pt"))
    params = load_params(ROOT / "params.yaml")
    out = tmp_path / "map.tif"
    summary = predict_scene(params, model, meta, scene, out, probabilities=True, confidence=True, stats=True)
    with rasterio.open(out) as src:
        assert src.count == 2 + len(meta.classes)
        assert src.descriptions[:2] == ("class", "water") and src.descriptions[-1] == "confidence"
        classes, confidence, probs = src.read(1), src.read(src.count), src.read()[1:-1]
    assert np.abs(confidence.astype(int) - probs.max(axis=0)).max() <= 1  # both round p x 255
    assert (classes == probs.argmax(axis=0)).mean() > 0.99  # ties after rounding aside
    mean = summary["stats"]["mean_confidence"]
    assert mean == pytest.approx(confidence.mean() / 255, abs=2 / 255)
