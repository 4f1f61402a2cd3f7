"""Areas of interest: an AOI in another CRS, one that misses its scene, a multipolygon in a vector file,
a STAC item's geometry; tiles cut, labels, maps and map scores only inside."""

import json

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.warp import transform

from tests.conftest import ROOT, tiny_overrides, tiny_params, write_scene
from tilepipe import cli
from tilepipe.errors import TilepipeError
from tilepipe.geo.aoi import geometry_sha256
from tilepipe.geo.scenes import read_scene_records
from tilepipe.mapping.blend import NODATA
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.scoring import score_map
from tilepipe.ml.checkpoint import ModelMeta, model_from_meta, save_model
from tilepipe.stages.ingest import ingest
from tilepipe.stages.predict import predict_held_out
from tilepipe.stages.tile import tile
from tilepipe.tiles.cutting import fingerprint, plan
from tilepipe.tiles.store import read_index

X0, Y0 = 500000.0, 4000000.0  # write_scene's origin: 96 x 80 px of 1 m in EPSG:32633


META = ModelMeta(  # a random classifier of 16 px tiles: maps with 8 px cells
    "classification", "small_cnn", 4, ["red", "green", "blue"], {"uint8": [0, 255]},
    ["water", "forest", "cropland", "urban", "bare"], 16, mean=[0.5] * 3, std=[0.2] * 3,
)  # fmt: skip


def utm_box(left: float, top: float, right: float, bottom: float) -> list[tuple[float, float]]:
    """A ring of scene pixels (col, row) as UTM coordinates, densified (100 points a side)."""
    ring = []
    for (c0, r0), (c1, r1) in zip(
        [(left, top), (right, top), (right, bottom), (left, bottom)],
        [(right, top), (right, bottom), (left, bottom), (left, top)],
        strict=True,
    ):
        ring += [(X0 + c0 + (c1 - c0) * t, Y0 - r0 - (r1 - r0) * t) for t in np.linspace(0, 1, 100)[:-1]]
    return [*ring, ring[0]]


def in_crs(ring, crs: str) -> list[list[float]]:
    xs, ys = transform("EPSG:32633", crs, [x for x, _ in ring], [y for _, y in ring])
    return [[x, y] for x, y in zip(xs, ys, strict=True)]


def scene_with_aoi(tmp_path, aoi_name: str | None, splits=("train",)) -> None:
    rows = []
    for i, split in enumerate(splits):
        paths = write_scene(tmp_path, f"s{i}", seed=i)
        row = {
            "scene_id": f"s{i}",
            "image": paths["image"].name,
            "labels": paths["labels"].name,
            "split": split,
        }
        rows.append(row | ({"aoi": aoi_name} if aoi_name and i == 0 else {}))
    columns = ["scene_id", "image", "labels", "split", "aoi"]
    lines = [",".join(columns)] + [",".join(r.get(c, "") for c in columns) for r in rows]
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n")


def test_aoi_in_lon_lat_drops_tiles_outside_and_maps_and_scores_inside_only(tmp_path, capsys):
    # the left 58 of 96 columns, as lon/lat (GeoJSON's own CRS: no crs member)
    lonlat = in_crs(utm_box(0, -5, 58, 85), "EPSG:4326")
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [lonlat]}}
    (tmp_path / "aoi.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    scene_with_aoi(tmp_path, "aoi.geojson")
    params = tiny_params(tmp_path)
    ingest(params, tmp_path / "catalog.csv", tmp_path / "scenes.json")
    assert "AOI 0.00464 km2 (60% of the scene)" in capsys.readouterr().out
    (record,) = read_scene_records(tmp_path / "scenes.json")
    assert record.aoi.endswith("/aoi.geojson") and record.aoi_fraction == pytest.approx(58 / 96, abs=1e-3)
    assert record.aoi_area_km2 == pytest.approx(58 * 80 / 1e6, rel=1e-3)
    assert shapely.geometry.shape(record.aoi_geometry).bounds == pytest.approx(
        (X0, Y0 - 80, X0 + 58, Y0), abs=0.01
    )

    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    index = read_index(tmp_path / "tiles" / "s0")
    cols, hist = np.asarray(index["tiles"]["col"]), np.asarray(index["tiles"]["hist"])
    # 16 px tiles: columns 0-2 inside, column 3 (48-64 px) 6/16 outside (kept at max_nodata 0.5), 4-5 out
    assert sorted(set(cols.tolist())) == [0, 1, 2, 3] and index["tile_count"] == 20 and index["dropped"] == 10
    assert (hist[cols < 3, -1] == 0).all() and (hist[cols == 3, -1] == 6 * 16).all(), "no label outside"

    meta = META
    model = model_from_meta(meta).eval()
    aoi = (record.aoi_geometry, record.crs)
    predict_scene(params, model, meta, tmp_path / "s0.tif", tmp_path / "map.tif", True, aoi=aoi)
    with rasterio.open(tmp_path / "map.tif") as src:  # cells of 8 px: centres 4, 12, ..., 52 inside
        classes, probs = src.read(1), src.read(2)
    assert (classes[:, :7] != NODATA).all() and (classes[:, 7:] == NODATA).all()
    assert (probs[:, 7:] == 0).all()
    cm, _, _ = score_map(params, meta, record, tmp_path / "map.tif")
    assert cm.sum() == 7 * 10, "scored only inside the AOI"
    # the predict stage maps held-out scenes with their AOI; `tilepipe predict --aoi FILE` any scene
    save_model(tmp_path / "model.pt", model, meta)
    (tmp_path / "split.json").write_text(json.dumps({"mode": "scenes", "members": {"test": {"s0": None}}}))
    predict_held_out(
        params, tmp_path / "model.pt", tmp_path / "scenes.json", tmp_path / "split.json", tmp_path / "maps"
    )
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    args = [str(tmp_path / "s0.tif"), str(tmp_path / "cli.tif"), "--model", str(tmp_path / "model.pt")]
    assert (
        cli.main(
            [
                "predict",
                "--params",
                str(ROOT / "params.yaml"),
                *sets,
                *args,
                "--aoi",
                str(tmp_path / "aoi.geojson"),
            ]
        )
        == 0
    )
    for path in (tmp_path / "maps" / "s0.tif", tmp_path / "cli.tif"):
        with rasterio.open(path) as src:
            assert np.array_equal(src.read(1), classes), path


def test_aoi_that_misses_its_scene_is_one_line(tmp_path, capsys):
    far = in_crs(utm_box(500, 500, 600, 600), "EPSG:3857")
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [far]}}
    crs = {"type": "name", "properties": {"name": "EPSG:3857"}}
    doc = {"type": "FeatureCollection", "crs": crs, "features": [feature]}
    (tmp_path / "far.geojson").write_text(json.dumps(doc))
    scene_with_aoi(tmp_path, "far.geojson")
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    paths = ["--catalog", str(tmp_path / "catalog.csv"), "--out", str(tmp_path / "scenes.json")]
    code = cli.main(["ingest", "--params", str(ROOT / "params.yaml"), *sets, *paths])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert "far.geojson: the area of interest does not overlap its scene s0.tif" in err
    assert not (tmp_path / "scenes.json").exists()
    save_model(tmp_path / "model.pt", model_from_meta(META), META)
    args = [str(tmp_path / "s0.tif"), str(tmp_path / "map.tif"), "--model", str(tmp_path / "model.pt")]
    code = cli.main(
        [
            "predict",
            "--params",
            str(ROOT / "params.yaml"),
            *sets,
            *args,
            "--aoi",
            str(tmp_path / "far.geojson"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "s0.tif: the area of interest does not overlap the scene" in err
    assert not (tmp_path / "map.tif").exists()


def test_multipolygon_in_a_geopackage_keeps_only_its_tiles(tmp_path):
    import pyogrio.raw

    parts = [utm_box(0, 0, 32, 32), utm_box(64, 48, 96, 80)]  # top-left and bottom-right 2 x 2 tiles
    geom = shapely.MultiPolygon([shapely.Polygon(in_crs(p, "EPSG:3857")) for p in parts])
    pyogrio.raw.write(str(tmp_path / "aoi.gpkg"), np.array([shapely.to_wkb(geom)], dtype=object), [], [],
                      driver="GPKG", geometry_type="MultiPolygon", crs="EPSG:3857")  # fmt: skip
    scene_with_aoi(tmp_path, "aoi.gpkg", splits=("train", "train"))
    params = tiny_params(tmp_path)
    ingest(params, tmp_path / "catalog.csv", tmp_path / "scenes.json")
    records = read_scene_records(tmp_path / "scenes.json")
    assert records[0].aoi_fraction == pytest.approx(2 * 32 * 32 / (96 * 80), abs=1e-3)
    assert records[0].aoi_geometry["type"] == "MultiPolygon" and records[1].aoi is None
    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    index = read_index(tmp_path / "tiles" / "s0")
    kept = sorted(zip(index["tiles"]["row"], index["tiles"]["col"], strict=True))
    assert kept == [(0, 0), (0, 1), (1, 0), (1, 1), (3, 4), (3, 5), (4, 4), (4, 5)]
    assert read_index(tmp_path / "tiles" / "s1")["tile_count"] == 30, "no AOI: every tile"
    assert fingerprint(records[1], params) != fingerprint(records[0], params)
    # another AOI for s0 re-tiles s0 alone
    one = shapely.Polygon(in_crs(parts[0], "EPSG:3857"))
    pyogrio.raw.write(str(tmp_path / "aoi.gpkg"), np.array([shapely.to_wkb(one)], dtype=object), [], [],
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:3857")  # fmt: skip
    ingest(params, tmp_path / "catalog.csv", tmp_path / "scenes.json")
    assert [
        s.scene_id for s in plan(read_scene_records(tmp_path / "scenes.json"), params, tmp_path / "tiles")
    ] == ["s0"]


def test_stac_item_geometry_is_the_aoi_with_use_geometry(tmp_path):
    write_scene(tmp_path, "s0")
    ring = in_crs(utm_box(0, 0, 48, 80), "EPSG:4326")
    item = {
        "type": "Feature", "stac_version": "1.0.0", "stac_extensions": [], "id": "s0",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [*np.min(ring, axis=0).tolist(), *np.max(ring, axis=0).tolist()],
        "properties": {"datetime": "2024-01-15T10:30:00Z"}, "links": [],
        "assets": {"image": {"href": "s0.tif", "roles": ["data"]},
                   "labels": {"href": "s0_labels.tif", "roles": ["labels"]}},
    }  # fmt: skip
    (tmp_path / "item.json").write_text(json.dumps(item))
    params = tiny_params(tmp_path, f"data.catalog={tmp_path / 'item.json'}", "data.stac.use_geometry=true")
    ingest(params, tmp_path / "item.json", tmp_path / "scenes.json")
    (record,) = read_scene_records(tmp_path / "scenes.json")
    assert record.aoi.endswith("(item s0) geometry") and record.aoi_fraction == pytest.approx(0.5, abs=1e-3)
    assert record.aoi_sha256 == geometry_sha256(item["geometry"])
    plain = tiny_params(tmp_path, f"data.catalog={tmp_path / 'item.json'}")
    ingest(plain, tmp_path / "item.json", tmp_path / "plain.json")
    assert read_scene_records(tmp_path / "plain.json")[0].aoi is None, "off by default"
    item["geometry"] = None
    (tmp_path / "item.json").write_text(json.dumps({**item, "bbox": None}))
    with pytest.raises(TilepipeError, match="item s0 has no geometry"):
        ingest(params, tmp_path / "item.json", tmp_path / "scenes.json")
