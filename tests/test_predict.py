import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from tests.conftest import (
    CLASSES,
    ROOT,
    tiny_overrides,
    tiny_params,
    write_catalog,
    write_raster,
    write_scene,
)
from tilepipe import cli
from tilepipe.errors import TilepipeError
from tilepipe.geo.raster_io import target_grid
from tilepipe.mapping.blend import (
    NODATA,
    UNET_EXACT_MARGIN,
    UNET_RECEPTIVE_RADIUS,
    classify_strips,
    segment_strips,
)
from tilepipe.mapping.predict import predict_scene, predict_strips
from tilepipe.mapping.scene import open_scene
from tilepipe.mapping.scoring import evaluate_scenes, held_out_scenes
from tilepipe.ml.checkpoint import ModelMeta, load_model, save_model
from tilepipe.ml.models import Normalized, SmallCNN, UNet
from tilepipe.ml.training import train
from tilepipe.params import load_params
from tilepipe.stages.ingest import ingest
from tilepipe.stages.predict import predict_held_out
from tilepipe.stages.split import split
from tilepipe.stages.tile import tile
from tilepipe.tracking import fetch
from tilepipe.tracking.fetch import Prefetch
from tilepipe.tracking.models import describe_model, resolve_model

RGB = ["red", "green", "blue"]
SCALE = {"uint8": [0, 255], "uint16": [0, 10000]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def seg_meta(**extra):
    fields = {"task": "segmentation", "model": "unet", "width": 4, "bands": RGB, "scale": SCALE}
    return ModelMeta(**{**fields, "classes": CLASSES, "tile_size": 16, "gsd": None, **extra})


def cls_meta(**extra):
    return replace(seg_meta(), task="classification", model="small_cnn", **extra)


def calibrated_unet(image: np.ndarray, width: int = 4) -> Normalized:
    """A seeded fresh U-Net whose batch-norm statistics are set on the scene.

    At initialisation a U-Net's output barely varies (std ~1e-3), which would let a broken
    blend pass a tolerance test; calibrated batch norm makes every layer's signal unit-sized.
    """
    torch.manual_seed(0)
    model = Normalized(UNet(3, len(CLASSES), width), [0.5] * 3, [0.3] * 3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        h, w = image.shape[1] // 8 * 8, image.shape[2] // 8 * 8
        model(torch.from_numpy(image[:, :h, :w].astype(np.float32) / 255)[None])
    return model.eval()


def random_scene(tmp_path, size=(200, 160), name="r.tif", **kwargs):
    width, height = size
    image = np.random.default_rng(0).integers(1, 256, (3, height, width), dtype=np.uint8)
    return write_raster(tmp_path / name, image, descriptions=RGB, **kwargs), image


def full_pass(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(image.astype(np.float32) / 255)[None]), 1)[0].numpy()


def blended(model, meta, path, window, margin):
    with open_scene(path, meta) as scene:
        strips = list(
            segment_strips(
                model, scene.read, scene.grid.height, scene.grid.width, len(CLASSES), window, margin, 4
            )
        )
    assert [s.row for s in strips] == sorted(s.row for s in strips)
    return np.concatenate([s.probs for s in strips], axis=1)


def test_unet_receptive_field_is_what_the_blend_assumes():
    torch.manual_seed(0)
    net = UNet(1, 1, 2).double().eval()
    with torch.no_grad():
        for module in net.modules():  # positive weights, no biases: every dependency shows as > 0
            if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                module.weight.abs_()
                if module.bias is not None:
                    module.bias.zero_()
    left, right = [0] * 8, [0] * 8  # by output phase mod 8: how far left / right its inputs reach
    for q in range(200, 216):
        x = torch.zeros(1, 1, 8, 512, dtype=torch.float64)
        x[0, 0, :, q] = 1
        with torch.no_grad():
            hit = (net(x)[0, 0, 4] > 0).nonzero().flatten().tolist()
        for o in hit:
            left[o % 8], right[o % 8] = max(left[o % 8], o - q), max(right[o % 8], q - o)
    assert max(left + right) == UNET_RECEPTIVE_RADIUS

    def exact(m):  # windows start on multiples of 8; core pixels sit >= m px from an inner edge
        return all(left[(m + k) % 8] <= m + k and right[(-m - 1 - k) % 8] <= m + k for k in range(8))

    smallest = next(m for m in range(64) if all(exact(n) for n in range(m, 64)))
    assert smallest == UNET_EXACT_MARGIN
    assert load_params(ROOT / "params.yaml").predict.margin >= UNET_EXACT_MARGIN, "default is seamless"


def test_blended_windows_equal_one_pass_over_the_scene(tmp_path):
    path, image = random_scene(tmp_path)
    model = calibrated_unet(image)
    reference = full_pass(model, image)
    assert reference.std(axis=(1, 2)).min() > 0.01, "the reference must vary for the test to mean anything"
    probs = blended(model, seg_meta(), path, window=128, margin=48)  # 3 x 4 windows
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    assert np.abs(blended(model, seg_meta(), path, window=64, margin=16) - reference).max() > 1e-3

    params = tiny_params(tmp_path, "predict.window=128", "predict.margin=48", "predict.batch_size=3")
    predict_scene(params, model, seg_meta(), path, tmp_path / "map.tif", probabilities=True)
    with rasterio.open(tmp_path / "map.tif") as out:
        data = out.read()
    top2 = np.sort(reference, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4
    assert (data[0][clear] == reference.argmax(axis=0)[clear]).all()
    assert np.abs(data[1:] / 255 - reference).max() <= 1 / 255 + 1e-6


def test_segmentation_map_is_a_georeferenced_cog_and_keeps_nodata(tmp_path):
    width, height = 100, 84  # not multiples of 8: the last windows are padded
    image = np.random.default_rng(1).integers(1, 256, (3, height, width), dtype=np.uint8)
    image[:, 10:30, 40:70] = 0
    transform = from_origin(600000, 5000000, 2.0, 2.0)
    path = write_raster(tmp_path / "s.tif", image, "EPSG:32631", transform, nodata=0, descriptions=RGB)
    params = tiny_params(tmp_path, "predict.window=64", "predict.margin=24")
    summary = predict_scene(
        params, calibrated_unet(image), seg_meta(), path, tmp_path / "out" / "map.tif", True
    )
    with rasterio.open(tmp_path / "out" / "map.tif") as out:
        assert out.crs == rasterio.crs.CRS.from_epsg(32631)
        assert out.transform == transform and (out.width, out.height) == (width, height)
        assert out.count == 6 and out.dtypes[0] == "uint8" and out.nodata == NODATA
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.compression.name.lower() == "deflate" and out.is_tiled
        assert out.descriptions == ("class", *CLASSES)
        assert json.loads(out.tags()["TILEPIPE_CLASSES"]) == CLASSES
        classes = out.read(1)
        probs = out.read()[1:]
    assert (classes[10:30, 40:70] == NODATA).all()
    assert (classes != NODATA).sum() == width * height - 20 * 30
    assert summary["nodata_pixels"] == 20 * 30
    ok = classes != NODATA
    assert classes[ok].max() < len(CLASSES)
    assert np.abs(probs[:, ok].sum(axis=0).astype(int) - 255).max() <= 5
    assert probs.max() <= 254, "255 is nodata"
    assert not list(tmp_path.joinpath("out").glob(".*")), "no temp file left behind"


def test_classification_map_is_on_the_cell_grid(tmp_path):
    width, height = 100, 84
    image = np.random.default_rng(2).integers(1, 256, (3, height, width), dtype=np.uint8)
    image[:, :, :12] = 0  # cell column 0 (px 0-7) all nodata, column 1 (px 8-15) exactly half
    transform = from_origin(500000, 4000000, 1.0, 1.0)
    path = write_raster(tmp_path / "s.tif", image, "EPSG:32633", transform, nodata=0, descriptions=RGB)
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3).eval()
    params = tiny_params(tmp_path, "predict.batch_size=7")
    predict_scene(params, model, cls_meta(), path, tmp_path / "map.tif", probabilities=True)
    with rasterio.open(path) as src, rasterio.open(tmp_path / "map.tif") as out:
        assert out.crs == src.crs and out.transform == transform * transform.scale(8)
        assert (out.width, out.height) == (13, 11)  # ceil(100 / 8), ceil(84 / 8)
        for got, want in zip(out.bounds, src.bounds, strict=True):
            assert abs(got - want) < 8
        classes = out.read(1)
    valid = np.zeros((88, 104))  # the cells' extent; pixels past the scene's edge count as nodata
    valid[:84, 12:100] = 1
    fraction = valid.reshape(11, 8, 13, 8).mean(axis=(1, 3))
    assert fraction[0, 1] == 0.5 and fraction[10, 2] == 0.5 and fraction[10, 12] == 0.25
    np.testing.assert_array_equal(classes == NODATA, fraction < 0.5)  # nodata: more than half nodata

    # A cell's probabilities are the mean softmax of the four tile windows covering it.
    with open_scene(path, cls_meta()) as scene:
        cells = np.concatenate(
            [s.probs for s in predict_strips(params, model, cls_meta(), scene, lambda n: None)], axis=1
        )
        tiles = [scene.read(Window(8 * c, 8 * r, 16, 16))[0] for r in (2, 3) for c in (4, 5)]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(np.stack(tiles))), 1).mean(0).numpy()
    np.testing.assert_allclose(cells[:, 3, 5], expected, atol=1e-6)


@pytest.mark.parametrize("gsd", [None, 1.5])
def test_classification_reads_in_column_blocks_give_the_full_width_map(tmp_path, gsd):
    """Reading each window row in narrow blocks changes neither classes nor probabilities (bit for bit)."""
    width, height = 205, 61  # neither a multiple of the cell (8 px) nor of any block width below
    image = np.random.default_rng(3).integers(1, 256, (3, height, width), dtype=np.uint8)
    image[:, :, :21] = 0  # nodata: a band of columns, a hole across block edges, one band only
    image[:, 20:44, 50:130] = 0
    image[1, 3:9, 90:] = 0
    path = write_raster(tmp_path / "s.tif", image, nodata=0, descriptions=RGB)
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3).eval()
    meta = cls_meta(gsd=gsd)

    def classify(block):
        widths, windows = [], []

        def read(window):
            widths.append(int(window.width))
            return scene.read(window)

        with open_scene(path, meta) as scene:
            h, w = scene.grid.height, scene.grid.width
            run = classify_strips(model, read, h, w, len(CLASSES), 16, 3, windows.append, read_columns=block)
            strips = list(run)
        assert [s.row for s in strips] == list(range(len(strips))) == list(range(-(-h // 8)))
        assert sum(windows) == (-(-h // 8) - 1) * (-(-w // 8) - 1)  # every window once
        return np.stack([s.classes[0] for s in strips]), np.stack([s.probs[:, 0] for s in strips]), widths, w

    classes, probs, widths, w = classify(10**9)
    assert set(widths) == {-(-w // 8) * 8}  # one full-width read per window row
    if gsd is None:  # nodata cells: more than half nodata (pixels past the edge count as nodata)
        valid = np.zeros((64, 208))
        valid[:height, :width] = (image > 0).all(axis=0)
        np.testing.assert_array_equal(classes == NODATA, valid.reshape(8, 8, 26, 8).mean(axis=(1, 3)) < 0.5)
    assert (classes == NODATA).any() and (classes != NODATA).any()
    for read_columns in (8, 24, 40):  # 1, 3 and 5 windows per read; batches of 3 straddle reads
        got_classes, got_probs, widths, _ = classify(read_columns)
        assert max(widths) <= read_columns + 16 and len(widths) > len(classes)
        np.testing.assert_array_equal(got_classes, classes)
        np.testing.assert_array_equal(got_probs.view(np.uint32), probs.view(np.uint32))


def test_map_is_resampled_to_the_models_ground_resolution(tmp_path):
    path, image = random_scene(tmp_path, size=(120, 96))  # 1 m pixels
    params = tiny_params(tmp_path, "predict.window=64", "predict.margin=16")
    model = calibrated_unet(image)
    predict_scene(params, model, seg_meta(gsd=2.0), path, tmp_path / "map.tif")
    with rasterio.open(path) as src, rasterio.open(tmp_path / "map.tif") as out:
        grid = target_grid(src, 2.0)
        assert out.crs == src.crs and out.transform == grid.transform
        assert (out.width, out.height) == (60, 48)
        assert all(abs(a - b) <= 2.0 for a, b in zip(out.bounds, src.bounds, strict=True))

    # A lon/lat scene is warped to its UTM zone at the model's resolution.
    geo = from_origin(15.0, 45.0, 1e-5, 1e-5)
    lonlat = write_raster(tmp_path / "ll.tif", image[:, :64, :64], "EPSG:4326", geo, descriptions=RGB)
    predict_scene(params, model, seg_meta(gsd=1.0), lonlat, tmp_path / "ll_map.tif")
    with rasterio.open(lonlat) as src, rasterio.open(tmp_path / "ll_map.tif") as out:
        assert out.crs == rasterio.crs.CRS.from_epsg(32633) and abs(out.res[0] - 1.0) < 1e-9
        assert out.transform == target_grid(src, 1.0).transform
        want = transform_bounds(src.crs, out.crs, *src.bounds)
        assert all(abs(a - b) <= 1.5 for a, b in zip(out.bounds, want, strict=True))


def test_a_scene_whose_bands_do_not_fit_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    params = tiny_params(tmp_path)
    torch.manual_seed(0)
    model = Normalized(SmallCNN(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3).eval()
    data = np.random.default_rng(0).integers(1, 255, (4, 40, 40), dtype=np.uint8)
    unnamed = write_raster(tmp_path / "unnamed.tif", data)
    rg = write_raster(tmp_path / "rg.tif", data[:2], descriptions=["red", "green"])
    floaty = write_raster(tmp_path / "i16.tif", data[:3].astype(np.int32), descriptions=RGB)
    cases = [
        (unnamed, None, "no names"),
        (rg, None, "lacks band(s) blue"),
        (floaty, None, "dtype int32"),
        (unnamed, "red=3;green=2;blue=9", "file has 4 band(s)"),
    ]
    for path, bands, words in cases:
        with pytest.raises(TilepipeError) as err:
            predict_scene(params, model, cls_meta(), path, tmp_path / "x.tif", bands=bands)
        assert str(err.value).startswith(str(path)) and words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.tif").exists()
    predict_scene(params, model, cls_meta(), unnamed, tmp_path / "x.tif", bands="red=3;green=2;blue=1")
    assert (tmp_path / "x.tif").is_file()

    meta = replace(cls_meta(), mean=[0.5] * 3, std=[0.3] * 3, width=4, epoch=1, val={})
    save_model(tmp_path / "model.pt", model, meta)
    args = ["predict", str(rg), str(tmp_path / "y.tif"), "--model", str(tmp_path / "model.pt")]
    assert cli.main([*args, "--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rg.tif" in err and "lacks band(s) blue" in err
    for spec, words in [(tmp_path / "nope.pt", "no such model file"), (unnamed, "not a tilepipe model")]:
        with pytest.raises(TilepipeError, match=words):
            resolve_model(spec)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(TilepipeError, match="no MLflow store"):
        resolve_model("models:/tilepipe-landcover@champion")
    assert not (tmp_path / "none.db").exists(), "a lookup must not create a tracking store"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny scenes, tiled and split, and a small CNN trained on them (shared by the tests below)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    rows = []
    for i, name in enumerate(["train", "train", "val", "test"]):
        paths = write_scene(tmp_path, f"s{i}", seed=i)
        rows.append(
            {"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name, "split": name}
        )
    catalog = write_catalog(tmp_path, rows)
    sets = ["train.epochs=4", "train.batch_size=8", "train.width=8", "train.min_purity=0.5", "train.lr=0.003"]
    params = tiny_params(tmp_path, *sets)
    ingest(params, catalog, tmp_path / "scenes.json")
    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    return tmp_path, params, sets


def test_classification_maps_a_tiny_scene(trained, monkeypatch):
    tmp_path, params, sets = trained
    scene = tmp_path / "s3.tif"
    overrides = [x for o in [*tiny_overrides(tmp_path), *sets] for x in ("--set", o)]
    args = ["predict", str(scene), str(tmp_path / "s3_map.tif"), "--model", str(tmp_path / "models")]
    assert cli.main([*args, "--params", str(ROOT / "params.yaml"), *overrides]) == 0
    with rasterio.open(tmp_path / "s3_map.tif") as out, rasterio.open(tmp_path / "s3_labels.tif") as lab:
        predicted = out.read(1)
        labels = lab.read(1)  # class values 1..5 in vertical bands; cells are 8 x 8 px
    assert predicted.shape == (10, 12)
    truth = np.array(
        [
            [
                np.bincount(labels[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].ravel()).argmax() - 1
                for c in range(12)
            ]
            for r in range(10)
        ]
    )
    assert (predicted == truth).mean() > 0.5  # 5 balanced classes: chance is 0.2

    # Scene-level evaluation scores the same map, cell by cell, against each cell's majority label.
    monkeypatch.chdir(tmp_path)
    _, meta = load_model(tmp_path / "models" / "model.pt")
    maps = tmp_path / "maps"
    predict_held_out(
        params, tmp_path / "models" / "model.pt", tmp_path / "scenes.json", tmp_path / "split.json", maps
    )
    with rasterio.open(maps / "s3.tif") as batch_map:
        assert (batch_map.read(1) == predicted).all()  # the stage's map is the CLI's map
    records = held_out_scenes(tmp_path / "scenes.json", tmp_path / "split.json")
    result = evaluate_scenes(params, meta, records, maps, tmp_path / "scene_eval")
    assert result["unit"] == "cell" and list(result["scenes"]) == ["s3"]
    assert result["overall"]["scored"] == 120
    assert result["scenes"]["s3"]["accuracy"] == round((predicted == truth).mean(), 4)
    assert (tmp_path / "scene_eval" / "s3.png").stat().st_size > 0
    assert json.loads((tmp_path / "scene_eval" / "scene_metrics.json").read_text()) == result


def test_models_resolve_from_mlflow_and_serve_through_pyfunc(trained, monkeypatch):
    import mlflow.pyfunc

    from tilepipe.tracking.registry import register
    from tilepipe.tracking.runs import log_trained_model, training_run

    tmp_path, params, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with training_run(params, tmp_path / "split.json"):
        run = log_trained_model(tmp_path / "models")
    register(run, {"macro_f1": 0.5}, params, tmp_path / "split.json")
    local, local_meta = load_model(tmp_path / "models" / "model.pt")
    x = torch.from_numpy(np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32))
    champion = f"models:/{params.track.model_name}@champion"
    specs = (champion, run["run_id"], str(tmp_path / "models" / "model.pt"))
    loaded = [resolve_model(spec) for spec in specs]
    prefetch = Prefetch(champion)  # the weights fetched by a helper process, as `tilepipe predict` does
    try:
        assert prefetch.path().name == "model.pt"
        loaded.append(resolve_model(champion, prefetch))
        named = {"name": params.track.model_name, "version": "1", "run_id": run["run_id"], "source": champion}
        assert describe_model(champion, prefetch) == named  # what the STAC items record
    finally:
        prefetch.close()
    assert describe_model(champion) == named
    assert describe_model(run["run_id"])["run_id"] == run["run_id"]
    assert describe_model(tmp_path / "models")["run_id"] == run["run_id"]  # run.json beside model.pt
    monkeypatch.setattr(fetch, "WEIGHTS", "weights/none.pt")  # a run logged before the weights were
    with pytest.raises(TilepipeError, match="--trust-pickle"):
        resolve_model(champion)  # ... has only the pickled MLflow model: not unpickled by default
    loaded.append(resolve_model(champion, trust_pickle=True))  # ... loads through mlflow.pytorch
    for model, meta in loaded:
        assert meta == local_meta and not model.training
        with torch.no_grad():
            torch.testing.assert_close(model(x), local(x))
    for spec, words in [
        (f"models:/{params.track.model_name}@nope", "alias"),
        ("models:/unknown@champion", "unknown"),
        ("0" * 32, "0" * 32),
    ]:
        with pytest.raises(TilepipeError, match=words) as err:
            resolve_model(spec)
        assert "\n" not in str(err.value)
        prefetch = Prefetch(spec)
        with pytest.raises(TilepipeError, match=words):
            resolve_model(spec, prefetch)
        prefetch.close()

    # Serving: the logged model takes (n, bands, size, size) float32 in [0, 1] and returns class logits.
    served = mlflow.pyfunc.load_model(run["model_uri"])
    logits = np.asarray(served.predict(x.numpy()))
    assert logits.shape == (5, len(CLASSES))
    with torch.no_grad():
        np.testing.assert_allclose(logits, local(x).numpy(), atol=1e-5)


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from tilepipe.params import load_params
    from tilepipe.mapping.predict import predict_scene
    from tilepipe.ml.checkpoint import ModelMeta
    def status_kb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    scene, out, params_file = sys.argv[1:4]
    params = load_params(params_file, ["tile.gdal_cache_mb=16"])  # default window 256, batch 16
    meta = ModelMeta(task="segmentation", model="unet", width=4, bands=["red", "green", "blue"],
                     scale={"uint8": [0, 255]}, classes=list("abcde"), tile_size=64)
    model = torch.nn.Conv2d(3, 5, 1).eval()  # the pipeline's memory is under test, not the net's
    with torch.no_grad():
        model(torch.zeros(16, 3, 256, 256))  # allocator and thread pools warmed up
    # the peak of the prediction alone: Linux resets VmHWM to the current RSS on "5" (clear_refs)
    open("/proc/self/clear_refs", "w").write("5")
    before = status_kb("VmRSS")
    predict_scene(params, model, meta, scene, out, probabilities=True)
    after = status_kb("VmHWM")
    print(json.dumps({"before_kb": before, "after_kb": after}))
    """
)


def _striped_scene(path: Path, width: int, height: int) -> Path:
    """A tiled RGB GeoTIFF written block row by block row: the test never holds the scene either."""
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 4000000, 1, 1),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    yy, xx = np.mgrid[0:256, 0:width]
    with rasterio.open(path, "w", **profile) as dst:
        for band, name in enumerate(RGB, start=1):
            dst.set_band_description(band, name)
        for row in range(0, height, 256):
            block = ((xx // 37 + (yy + row) // 53) * 40 % 256).astype(np.uint8)
            dst.write(np.stack([block, block * 3, 255 - block]), window=Window(0, row, width, 256))
    return path


def _predict_rss_growth_mb(tmp_path: Path, scene: Path, out: Path) -> float:
    """Peak RSS added by predicting ``scene`` in a fresh process (after the model's first run)."""
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(scene), str(out), str(ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    return (rss["after_kb"] - rss["before_kb"]) / 1024


def test_memory_does_not_grow_with_the_scene(tmp_path):
    """Two scenes of one width, one three times the area: memory follows the width (one strip) only.

    The smaller scene already fills what is bounded by settings (GDAL's block cache, the strips
    in flight), so what the larger one adds would be memory that grows with the scene.
    """
    width, heights = 2048, (4096, 12288)
    growth = {}
    for height in heights:
        scene = _striped_scene(tmp_path / f"scene-{height}.tif", width, height)
        growth[height] = _predict_rss_growth_mb(tmp_path, scene, tmp_path / f"map-{height}.tif")
        with rasterio.open(tmp_path / f"map-{height}.tif") as out:
            assert (out.width, out.height, out.count) == (width, height, 6)
    extra_px = width * (heights[1] - heights[0])
    whole_scene_mb = extra_px * (5 + 3) * 4 / 2**20  # float32 probabilities + input of the extra rows
    print(f"peak RSS growth {growth} MB; the extra rows as whole-scene arrays: {whole_scene_mb:.0f} MB")
    assert growth[heights[1]] - growth[heights[0]] < whole_scene_mb / 10  # 51 MB of 512 MB
