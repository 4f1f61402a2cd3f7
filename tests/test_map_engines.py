"""ONNX Runtime beside torch (the reference) on real scenes: the same maps, and torch when it is missing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio
import torch

from tests.conftest import ROOT, tiny_params
from tests.test_predict import CLASSES, blended, calibrated_unet, cls_meta, random_scene, seg_meta
from tilepipe.mapping.blend import class_softmax, classify_strips
from tilepipe.mapping.engines import OnnxRuntimeModel, engine_model
from tilepipe.mapping.predict import predict_scene
from tilepipe.mapping.scene import open_scene
from tilepipe.ml.models import Normalized, ResNet18, SmallCNN

AGREE, PROB_TOL = 0.9999, 1e-4  # the bar for an engine to map with


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def same_maps(reference: np.ndarray, other: np.ndarray) -> None:
    assert reference.shape == other.shape
    assert np.mean(reference.argmax(axis=0) == other.argmax(axis=0)) >= AGREE
    assert np.abs(reference - other).max() <= PROB_TOL


def classified(model, path) -> np.ndarray:
    with open_scene(path, cls_meta()) as scene:
        strips = classify_strips(model, scene.read, scene.grid.height, scene.grid.width, len(CLASSES), 16, 7)
        return np.concatenate([s.probs for s in strips], axis=1)


def test_onnxruntime_blends_the_unets_windows_as_torch_does(tmp_path):
    path, image = random_scene(tmp_path, size=(200, 160))
    model = calibrated_unet(image).eval()
    onnx = engine_model(model, "onnxruntime")
    assert isinstance(onnx, OnnxRuntimeModel)
    reference = blended(model, seg_meta(), path, window=128, margin=48)
    assert reference.std(axis=(1, 2)).min() > 0.01, "a map that varies, or the comparison means little"
    same_maps(reference, blended(onnx, seg_meta(), path, window=128, margin=48))
    # a window larger than the scene is the scene's own size: a second shape, a second session
    same_maps(blended(model, seg_meta(), path, 256, 48), blended(onnx, seg_meta(), path, 256, 48))
    assert sorted(onnx.sessions) == [(3, 128, 128), (3, 160, 200)]


@pytest.mark.parametrize("shape", [(16, 5), (3, 4, 9, 7)])
def test_the_softmax_outside_torch_is_torchs_to_float_rounding(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 30
    logits[0, 1] = 1e4  # exp() of it overflows unless the maximum is taken off first
    reference = torch.softmax(logits, dim=1).numpy()
    assert np.array_equal(class_softmax(logits.clone(), "torch"), reference)
    other = class_softmax(logits.clone(), "onnxruntime")
    assert other.dtype == np.float32 and np.all(np.isfinite(other))
    assert np.abs(other - reference).max() <= 1e-6
    assert np.array_equal(other.argmax(axis=1), reference.argmax(axis=1))


@pytest.mark.parametrize("net", [SmallCNN, ResNet18])
def test_onnxruntime_classifies_the_windows_as_torch_does(tmp_path, net):
    path, _ = random_scene(tmp_path, size=(100, 84))
    torch.manual_seed(0)
    model = Normalized(net(3, len(CLASSES), 4), [0.5] * 3, [0.3] * 3).eval()
    example = torch.rand(7, 3, 16, 16)
    onnx = engine_model(model, "onnxruntime", example)
    assert isinstance(onnx, OnnxRuntimeModel) and len(onnx.sessions) == 1
    same_maps(classified(model, path), classified(onnx, path))


def test_a_cog_mapped_by_onnxruntime_has_torchs_classes(tmp_path):
    path, image = random_scene(tmp_path, size=(120, 96))
    model = calibrated_unet(image).eval()
    params = tiny_params(tmp_path, "predict.window=64", "predict.margin=16", "predict.batch_size=4")
    for name, engine in (("torch", model), ("onnx", engine_model(model, "onnxruntime"))):
        predict_scene(params, engine, seg_meta(), path, tmp_path / f"{name}.tif")
    with rasterio.open(tmp_path / "torch.tif") as a, rasterio.open(tmp_path / "onnx.tif") as b:
        assert a.profile == b.profile
        assert np.mean(a.read(1) == b.read(1)) >= AGREE


def test_torch_is_the_fallback_when_onnxruntime_is_missing():
    code = (
        "import sys, torch\nsys.modules['onnxruntime'] = None  # as if it were not installed\n"
        "from tilepipe.mapping.engines import engine_model\nfrom tilepipe.ml.models import SmallCNN\n"
        "model = SmallCNN(3, 5, 4).eval()\n"
        "print(engine_model(model, 'onnxruntime', torch.rand(2, 3, 16, 16)) is model)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("map engine: onnxruntime unavailable (")
    assert lines[0].endswith("; mapping with torch")


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="choose from torch, onnxruntime"):
        engine_model(SmallCNN(3, 5, 4), "tensorrt")


def test_an_export_is_kept_and_the_next_process_loads_it_without_exporting(tmp_path):
    make = "torch.manual_seed(0)\nmodel = Normalized(SmallCNN(3, 5, 4), [0.5] * 3, [0.3] * 3).eval()\n"
    torch.manual_seed(0)  # the same seeded model here and (``make``) in the next process
    model = Normalized(SmallCNN(3, 5, 4), [0.5] * 3, [0.3] * 3).eval()
    cache = (tmp_path / "onnx", "f" * 64)  # (folder, the model file's SHA-256)
    example = torch.rand(5, 3, 16, 16)
    first = engine_model(model, "onnxruntime", example, cache=cache)
    assert isinstance(first, OnnxRuntimeModel)
    kept = list((tmp_path / "onnx").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("f" * 64)
    assert kept[0].name.endswith("-model-3x16x16.onnx")
    torch.save(example, tmp_path / "x.pt")
    code = (
        "import torch\n"
        "def refuse(*a, **k): raise RuntimeError('exported again')\n"
        "torch.onnx.export = refuse  # the next process must not need the exporter\n"
        "from tilepipe.mapping.engines import OnnxRuntimeModel, engine_model\n"
        "from tilepipe.ml.models import Normalized, SmallCNN\n"
        f"{make}x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"out = engine_model(model, 'onnxruntime', x, cache=({str(cache[0])!r}, {cache[1]!r}))\n"
        "assert isinstance(out, OnnxRuntimeModel), 'fell back to torch'\n"
        f"torch.save(out(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), first(example))
