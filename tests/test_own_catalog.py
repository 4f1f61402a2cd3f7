"""The README's "Your own catalog" recipe, command by command, on a tiny catalog of one's own."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from rasterio.transform import from_origin

from tests.conftest import ROOT, dvc_project, write_geojson, write_raster

BIN = Path(sys.executable).parent
TINY = {  # the built-in data made small (as a first `make run` would have cached it) and a short training
    "synthesize": {"scenes": 5, "min_size": 160, "max_size": 260, "seed": 3},
    "tile": {"size": 16, "stride": 16, "workers": 1, "max_nodata": 0.5},
    "train": {"epochs": 2, "width": 8, "batch_size": 16, "min_purity": 0.5},
    "evaluate": {"min_test_tiles": 1, "min_test_scenes": 1},
}
GRIDS = [  # three CRSs: UTM 33N, UTM 10N, lon/lat
    ("EPSG:32633", 500000.0, 4000000.0, 1.0),
    ("EPSG:32610", 400000.0, 4100000.0, 1.0),
    ("EPSG:4326", 10.0, 45.0, 1e-5),
]


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def own_imagery(folder: Path) -> None:
    """Three panchromatic uint16 scenes: two 0/1 road masks (0 = background), one GeoJSON of buildings."""
    folder.mkdir(parents=True)
    rng, rows = np.random.default_rng(1), []
    for i, (crs, x, y, res) in enumerate(GRIDS):
        road = np.zeros((96, 96), dtype=np.uint8)
        road[36 + 8 * i : 52 + 8 * i, :] = 1
        image = rng.integers(300, 900, (1, 96, 96)).astype(np.uint16) + road.astype(np.uint16) * 1500
        write_raster(folder / f"p{i}.tif", image, crs, from_origin(x, y, res, res), descriptions=["pan"])
        if i < 2:
            write_raster(folder / f"p{i}_roads.tif", road, crs, from_origin(x, y, res, res))
            rows.append({"scene_id": f"p{i}", "image": f"p{i}.tif", "labels": f"p{i}_roads.tif"})
            continue
        x0, x1, y0, y1 = x + 8 * res, x + 88 * res, y - 52 * res, y - 68 * res
        block = {"type": "Polygon", "coordinates": [[(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]]}
        write_geojson(folder / f"p{i}.geojson", [(block, "building")], crs="EPSG:4326")
        rows.append({"scene_id": f"p{i}", "image": f"p{i}.tif", "labels": f"p{i}.geojson"})
    with open(folder / "catalog.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["scene_id", "image", "labels"])
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.xdist_group("dvc")
def test_the_readme_recipe_runs_the_users_stages_only(tmp_path):
    repo, env = dvc_project(tmp_path, TINY)
    _run(["dvc", "repro", "synthesize"], repo, env)  # what the first `make run` left in the cache

    # The recipe, as the README gives it:
    own_imagery(repo / "data" / "my-imagery")
    _run(["dvc", "add", "data/my-imagery"], repo, env)
    written = _run(["tilepipe", "catalog", "data/my-imagery/catalog.csv", "--params", "--write"], repo, env)
    first = _run(["dvc", "repro"], repo, env)

    assert "catalog: wrote the data: and bands: sections of params.yaml (3 classes)" in written.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["classes"] == [
        {"name": "background", "value": 0},  # the masks' most common value
        {"name": "class_1", "value": 1},
        {"name": "building", "value": 2},
    ]
    assert params["data"]["background"] == "background" and params["bands"]["input"] == ["pan"]
    assert "Running stage 'synthesize'" not in first.stdout, first.stdout
    assert "Running stage 'evaluate'" in first.stdout
    again = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    metrics = next(iter(shown.values()))["data"]["metrics/metrics.json"]["data"]
    assert set(metrics["per_class"]) == {"background", "class_1", "building"}
    assert set(metrics["per_scene_accuracy"]) <= {"p0", "p1", "p2"}


@pytest.mark.parametrize(
    ("broken", "culprit", "problem"),
    [
        ("catalog", "catalog.csv", "catalog not found"),
        ("float labels", "p0_roads.tif", "label raster must hold integer classes, not float32"),
        ("no class", "p2.geojson", "feature 0 has no `class` attribute"),
    ],
)
def test_catalog_mistakes_are_one_line(tmp_path, broken, culprit, problem):
    folder = tmp_path / "mine"
    own_imagery(folder)
    if broken == "catalog":
        (folder / "catalog.csv").unlink()
    elif broken == "float labels":
        crs, x, y, res = GRIDS[0]
        floats = np.zeros((96, 96), np.float32)
        write_raster(folder / "p0_roads.tif", floats, crs, from_origin(x, y, res, res))
    else:
        doc = json.loads((folder / "p2.geojson").read_text())
        doc["features"][0]["properties"] = {"kind": "building"}
        (folder / "p2.geojson").write_text(json.dumps(doc))
    cmd = [str(BIN / "tilepipe"), "catalog", str(folder / "catalog.csv"), "--params"]
    result = subprocess.run([*cmd, str(ROOT / "params.yaml")], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"tilepipe catalog: error: {folder / culprit}: {problem}"), lines[0]
