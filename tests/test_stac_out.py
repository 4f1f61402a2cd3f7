"""STAC out: each predicted map has a STAC item beside it, the held-out maps a self-contained catalog.

Validation never reaches the network: the core Item and Catalog JSON schemas are the ones pystac
ships (``pystac.validation.local_validator``); extension schemas are not shipped by any installed
package, so the extension fields are read back through pystac's extension classes and checked
against the rules of projection v2.0.0 and classification v2.0.0 here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pystac
import pytest
import rasterio
import torch
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

from tests.conftest import CLASSES, prepare_tiny_pipeline, write_raster
from tilepipe.errors import TilepipeError
from tilepipe.fsutil import file_sha256
from tilepipe.mapping.scene import class_colours
from tilepipe.mapping.stac_item import COG, build_item, item_path, write_item
from tilepipe.ml.checkpoint import ModelMeta, save_model
from tilepipe.ml.models import Normalized, SmallCNN
from tilepipe.stages.predict import predict_held_out, predict_one

RGB = ["red", "green", "blue"]
DEAD_PROXY = "http://127.0.0.1:9"  # discard port: any fetch through it fails at once


def _offline(uri: str) -> Resource:
    raise NoSuchResource(ref=uri)  # a schema not shipped locally would need the network: fail instead


def validate_core(obj: dict, kind: str) -> None:
    """Validate against the core STAC JSON schema that pystac ships (no network)."""
    from pystac.validation.local_validator import get_local_schema_cache

    cache = get_local_schema_cache()
    registry = Registry(retrieve=_offline).with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in cache.items()
    )
    version = pystac.get_stac_version()
    uri = f"https://schemas.stacspec.org/v{version}/{kind}-spec/json-schema/{kind}.json"
    jsonschema.Draft7Validator(cache[uri], registry=registry).validate(obj)


def check_extensions(item: pystac.Item, classes: list[str]) -> None:
    """The projection and classification fields, read back by pystac and held to their v2 rules."""
    proj = ProjectionExtension.ext(item)
    assert proj.code is not None and re.fullmatch(r"EPSG:\d+", proj.code)
    assert len(proj.transform) in (6, 9) and all(isinstance(v, float | int) for v in proj.transform)
    assert len(proj.shape) == 2 and all(isinstance(v, int) and v > 0 for v in proj.shape)
    asset = item.assets["map"]
    assert asset.media_type == COG and asset.roles == ["data"]
    found = ClassificationExtension.ext(asset).classes
    assert [c.value for c in found] == [*range(len(classes)), 255]
    assert [c.description for c in found[:-1]] == classes and found[-1].nodata is True
    for c in found:
        assert re.fullmatch(r"[0-9A-Za-z_-]+", c.name)  # classification v2: a name is an identifier
    hints = [c.color_hint for c in found[:-1]]
    assert hints == ["".join(f"{v:02X}" for v in rgb) for rgb in class_colours(classes)]
    assert ProjectionExtension.get_schema_uri() in item.stac_extensions
    assert ClassificationExtension.get_schema_uri() in item.stac_extensions


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Tiny scenes ingested, tiled and split, and a small CNN saved as models/model.pt (untrained)."""
    tmp_path, params = prepare_tiny_pipeline(tmp_path_factory.mktemp("stac"))
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, len(CLASSES), 8), [0.5] * 3, [0.3] * 3)
    meta = ModelMeta(
        task="classification", model="small_cnn", width=8, bands=RGB,
        scale={"uint8": [0, 255]}, classes=CLASSES, tile_size=16, mean=[0.5] * 3, std=[0.3] * 3,
    )  # fmt: skip
    (tmp_path / "models").mkdir()
    save_model(tmp_path / "models" / "model.pt", model, meta)
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": "a" * 32}))
    return tmp_path, params


def test_held_out_maps_form_a_catalog_of_valid_items(pipeline, monkeypatch):
    tmp_path, params = pipeline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTTP_PROXY", DEAD_PROXY)
    monkeypatch.setenv("HTTPS_PROXY", DEAD_PROXY)
    out = tmp_path / "predictions"
    predict_held_out(params, Path("models/model.pt"), Path("scenes.json"), Path("split.json"), out)

    catalog_dict = json.loads((out / "catalog.json").read_text())
    validate_core(catalog_dict, "catalog")
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    items = sorted(catalog.get_items(), key=lambda i: i.id)
    assert [i.id for i in items] == ["s3", "s4"]  # the test scenes, held out whole
    for item in items:
        raw = json.loads((out / f"{item.id}.json").read_text())
        validate_core(raw, "item")
        check_extensions(item, CLASSES)
        assert item.properties["tilepipe:model_source"] == "models/model.pt"
        # a DVC output: the model by its bytes, not by the run id that differs from run to run
        assert "tilepipe:model_run_id" not in item.properties
        assert item.properties["tilepipe:model_sha256"] == file_sha256(tmp_path / "models" / "model.pt")
        assert item.properties["tilepipe:datetime_source"] == "prediction"
        # the asset and the source scene resolve to the real files, through relative hrefs
        assert Path(item.assets["map"].get_absolute_href()) == out / f"{item.id}.tif"
        (source,) = [link for link in raw["links"] if link["rel"] == "derived_from"]
        assert not source["href"].startswith("/")
        assert (out / source["href"]).resolve() == (tmp_path / f"{item.id}.tif").resolve()
        with rasterio.open(out / f"{item.id}.tif") as src:
            assert ProjectionExtension.ext(item).shape == [src.height, src.width]
            assert ProjectionExtension.ext(item).transform == list(src.transform)[:6]
            assert ProjectionExtension.ext(item).code == f"EPSG:{src.crs.to_epsg()}"
            west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        np.testing.assert_allclose(item.bbox, [west, south, east, north], atol=1e-6)
        ring = np.asarray(item.geometry["coordinates"][0])
        assert ring[0].tolist() == ring[-1].tolist() and len(ring) > 5

    # A rerun with the same model writes the same items, but for the time of an unknown-time scene.
    before = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    predict_held_out(params, Path("models/model.pt"), Path("scenes.json"), Path("split.json"), out)
    after = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    for doc in (*before.values(), *after.values()):
        doc.get("properties", {}).pop("datetime", None)
    assert before == after


def test_one_scene_item_takes_the_scenes_time_and_a_wkt2_crs(pipeline, tmp_path, monkeypatch):
    source_root, params = pipeline
    monkeypatch.setenv("HTTPS_PROXY", DEAD_PROXY)
    crs = rasterio.crs.CRS.from_proj4("+proj=aea +lat_1=29.5 +lat_2=45.5 +lat_0=37.5 +lon_0=-96 +ellps=GRS80")
    image = np.random.default_rng(1).integers(1, 255, (3, 48, 40), dtype=np.uint8)
    scene = write_raster(tmp_path / "scene.tif", image, crs.to_wkt(), from_origin(0, 0, 1, 1), 0, RGB)
    with rasterio.open(scene, "r+") as dst:
        dst.update_tags(TIFFTAG_DATETIME="2021:06:30 10:20:30")
    out = tmp_path / "maps" / "scene_map.tif"
    summary = predict_one(params, source_root / "models" / "model.pt", scene, out)

    assert summary["item"] == str(tmp_path / "maps" / "scene_map.json")
    raw = json.loads(Path(summary["item"]).read_text())
    validate_core(raw, "item")
    item = pystac.Item.from_dict(raw)
    assert item.datetime.isoformat() == "2021-06-30T10:20:30+00:00"
    assert item.properties["tilepipe:datetime_source"] == "scene"
    proj = ProjectionExtension.ext(item)
    assert proj.code is None and rasterio.crs.CRS.from_wkt(proj.wkt2) == crs
    (source,) = [link for link in raw["links"] if link["rel"] == "derived_from"]
    assert source["href"] == "../scene.tif"

    # An explicit time (a scene ingested from a STAC item) wins over the file's tag.
    meta = ModelMeta(task="segmentation", model="unet", width=4, bands=RGB,
                     scale={"uint8": [0, 255]}, classes=["open water", "forest"], tile_size=16)  # fmt: skip
    named = build_item(out, scene, meta, {"name": "m", "version": "3", "run_id": "b" * 32, "source": "x"},
                       scene_datetime="2020-01-02T03:04:05Z")  # fmt: skip
    assert named.datetime.isoformat() == "2020-01-02T03:04:05+00:00"
    assert named.properties["tilepipe:model_name"] == "m"
    assert named.properties["tilepipe:model_version"] == "3"
    classes = ClassificationExtension.ext(named.assets["map"]).classes
    assert [c.name for c in classes] == ["open_water", "forest", "nodata"]
    assert classes[0].description == "open water"
    written = write_item(named, tmp_path / "named.json")
    validate_core(json.loads(written.read_text()), "item")


def test_an_item_path_that_would_clash_is_one_line(tmp_path):
    for name in ("catalog.tif", "predictions.tif", "map.json"):
        with pytest.raises(TilepipeError, match=re.escape(name)) as err:
            item_path(tmp_path / name)
        assert "\n" not in str(err.value)
    assert item_path(tmp_path / "a.tif") == tmp_path / "a.json"
