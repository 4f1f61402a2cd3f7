"""train.init: weight files in each supported layout, made here from tilepipe's own networks and renamed."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT, TRAIN, tiny_overrides, tiny_params
from tilepipe import cli
from tilepipe.errors import TilepipeError
from tilepipe.ml.checkpoint import ModelMeta, load_model, model_from_meta, save_model
from tilepipe.ml.finetune import SENTINEL2_ALL
from tilepipe.ml.models import build_model
from tilepipe.ml.pretrained import _resnet_names, load_init
from tilepipe.params import load_params
from tilepipe.stages.train import train

CLASSES = ["water", "forest", "cropland", "urban", "bare"]
RGB = ["red", "green", "blue"]


def resnet_state(channels: int = 3, fc: bool = True, seed: int = 1) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict in torchvision/timm names: every tensor shaped as tilepipe's resnet18
    (width 64) holds it, the stem a 7x7 kernel over ``channels`` bands, and an ImageNet fc."""
    gen = torch.Generator().manual_seed(seed)
    ours = build_model("resnet18", 3, 5, 64).state_dict()
    state = {}
    for theirs, name in _resnet_names().items():
        shape = ours[name].shape
        if theirs == "conv1.weight":
            shape = (64, channels, 7, 7)
        if name.endswith("num_batches_tracked"):
            state[theirs] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[theirs] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[theirs] = torch.randn(shape, generator=gen)
    if fc:
        state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def area_resized(w: torch.Tensor) -> torch.Tensor:
    """7x7 taps on 3x3 by area: each tap a 3x3 block of w/9 on a 21x21 grid, summed per 7x7 block."""
    fine = w.repeat_interleave(3, -1).repeat_interleave(3, -2) / 9
    return fine.unfold(-2, 7, 7).unfold(-2, 7, 7).sum((-1, -2))


def _save(path, blob):
    torch.save(blob, path)
    return path


def _fresh(model="resnet18", bands=RGB, width=64):
    torch.manual_seed(0)
    return build_model(model, len(bands), len(CLASSES), width)


def test_torchvision_layout_maps_every_backbone_tensor_onto_resnet18(tmp_path):
    state = resnet_state()
    path = _save(tmp_path / "resnet18-f37072fd.pth", state)
    net, head = _fresh(), _fresh().head.weight.detach().clone()
    report = load_init(net, "resnet18", RGB, CLASSES, str(path))
    got = net.state_dict()
    assert torch.equal(got["blocks.3.conv2.weight"], state["layer2.1.conv2.weight"])
    assert torch.equal(got["blocks.2.shortcut.0.weight"], state["layer2.0.downsample.0.weight"])
    assert torch.equal(got["blocks.7.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert torch.equal(got["stem.1.running_mean"], state["bn1.running_mean"])
    assert torch.equal(got["head.weight"], head), "the head keeps its seeded random start"
    # the 7x7 stem on 3x3 by area: each kernel's sum (its response to a flat patch) is kept
    expected = area_resized(state["conv1.weight"])
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got["stem.0.weight"], expected, **close)
    torch.testing.assert_close(got["stem.0.weight"].sum((2, 3)), state["conv1.weight"].sum((2, 3)), **close)
    assert len(report.loaded) == 120 and report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == ["fc.weight", "fc.bias"]
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    line = report.line()
    assert "\n" not in line and "120 loaded, 2 missing (head.weight, head.bias), 2 unexpected" in line


def test_timm_checkpoint_lightning_and_ssl4eo_moco_layouts(tmp_path):
    timm = {"epoch": 90, "arch": "resnet18", "state_dict": resnet_state(fc=False), "version": 2}
    lightning = {
        "state_dict": {f"model.backbone.{k}": v for k, v in resnet_state().items()}
        | {"criterion.weight": torch.ones(5)},
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "hyper_parameters": {"lr": 0.01, "backbone": "resnet18"},
    }
    query, key = resnet_state(13, seed=2), resnet_state(13, seed=3)
    moco = {  # SSL4EO-S12's MoCo checkpoint: two encoders and a queue under module.
        "state_dict": {f"module.encoder_q.{k}": v for k, v in query.items()}
        | {f"module.encoder_k.{k}": v for k, v in key.items()}
        | {"module.queue": torch.randn(128, 16)},
        "epoch": 100,
    }
    for name, blob, source in (("timm", timm, "state_dict"), ("lightning", lightning, "state_dict")):
        net = _fresh()
        report = load_init(net, "resnet18", RGB, CLASSES, str(_save(tmp_path / f"{name}.pth", blob)))
        inner = blob[source] if name == "timm" else {k[15:]: v for k, v in blob[source].items()}
        assert torch.equal(net.state_dict()["blocks.5.conv1.weight"], inner["layer3.1.conv1.weight"]), name
        assert len(report.loaded) == 120, name
    assert "criterion.weight" in report.unexpected and "'model.backbone.'" in report.layout
    net = _fresh(bands=["red", "green", "blue", "nir"])
    report = load_init(
        net, "resnet18", ["red", "green", "blue", "nir"], CLASSES, str(_save(tmp_path / "m.pth", moco))
    )
    assert torch.equal(net.state_dict()["blocks.1.bn1.weight"], query["layer1.1.bn1.weight"]), (
        "encoder_q, not _k"
    )
    assert "module.encoder_k.conv1.weight" in report.unexpected and "module.queue" in report.unexpected
    stem = area_resized(query["conv1.weight"]) * 13 / 4
    for i, band in enumerate(["red", "green", "blue", "nir"]):  # B04, B03, B02, B08 of the 13
        torch.testing.assert_close(
            net.state_dict()["stem.0.weight"][:, i], stem[:, SENTINEL2_ALL.index(band)], rtol=1e-4, atol=1e-4
        )
    assert "13 -> 4 bands (red, green, blue, nir copied by name" in report.first_conv


def test_torchgeo_weights_onto_the_unet_encoder_and_bands_it_lacks(tmp_path):
    state = resnet_state(13, fc=False)  # TorchGeo's resnet18_sentinel2_all_moco: timm names, 13 bands
    path = _save(tmp_path / "resnet18_sentinel2_all_moco-59bfdff9.pth", state)
    bands = ["red", "elevation"]
    net = _fresh("unet", bands)
    decoder = net.merge[0][0][0].weight.detach().clone()
    report = load_init(net, "unet", bands, CLASSES, str(path))
    got = net.state_dict()
    assert torch.equal(got["down.1.0.0.weight"], state["layer2.0.conv1.weight"])
    assert torch.equal(got["down.2.1.1.running_var"], state["layer3.0.bn2.running_var"])
    assert torch.equal(got["bottom.1.0.weight"], state["layer4.0.conv2.weight"])
    assert torch.equal(net.merge[0][0][0].weight, decoder), "the decoder is not in a ResNet"
    pooled = area_resized(state["conv1.weight"])
    close = {"rtol": 1e-4, "atol": 1e-4}
    red = pooled[:, SENTINEL2_ALL.index("red")]
    torch.testing.assert_close(got["down.0.0.0.weight"][:, 0], red * 6.5, **close)
    torch.testing.assert_close(got["down.0.0.0.weight"][:, 1], pooled.mean(1) * 6.5, **close)
    assert len(report.loaded) == 8 * 6 and "layer1.1.conv1.weight" in report.unexpected
    assert all(k.startswith(("up.", "merge.", "head.")) for k in report.missing)


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        ({"features.0.weight": torch.zeros(8, 3, 3, 3)}, "cannot map key 'features.0.weight'"),
        (
            {**resnet_state(), "layer1.0.conv3.weight": torch.zeros(1)},
            "cannot map key 'layer1.0.conv3.weight'",
        ),
        ({"state_dict": {"a": 1}}, "holds no state dict"),
        ({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, "weights_only=True"),
    ],
    ids=["vgg", "resnet50-block", "no-tensors", "pickled-object"],
)
def test_a_file_it_cannot_map_is_one_line(tmp_path, blob, problem):
    path = _save(tmp_path / "weights.pth", blob)
    with pytest.raises(TilepipeError) as err:
        load_init(_fresh(), "resnet18", RGB, CLASSES, str(path))
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_bad_hash_and_wrong_width_are_one_line(tmp_path):
    path = _save(tmp_path / "w.pth", resnet_state())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cases = [
        (f"{tmp_path / 'nope.pth'}", "file not found"),
        (f"{path}#sha256={'0' * 64}", f"SHA-256 is {digest}, not the {'0' * 64} pinned"),
    ]
    for spec, problem in cases:
        with pytest.raises(TilepipeError, match=problem):
            load_init(_fresh(), "resnet18", RGB, CLASSES, spec)
    load_init(_fresh(), "resnet18", RGB, CLASSES, f"{path}#sha256={digest.upper()}")  # the pin holds
    with pytest.raises(TilepipeError, match="train.width must be the pretrained network's: 64"):
        load_init(_fresh(width=24), "resnet18", RGB, CLASSES, str(path))
    with pytest.raises(TilepipeError, match="onto train.model resnet18 or unet, not small_cnn"):
        load_init(_fresh("small_cnn"), "small_cnn", RGB, CLASSES, str(path))
    meta = ModelMeta("classification", "small_cnn", 8, RGB, {"uint8": [0, 255]}, CLASSES, 16)
    save_model(tmp_path / "cnn.pt", model_from_meta(meta), meta)
    with pytest.raises(TilepipeError, match="cnn.pt: a tilepipe small_cnn model, not resnet18"):
        load_init(_fresh(), "resnet18", RGB, CLASSES, str(tmp_path / "cnn.pt"))
    with pytest.raises(TilepipeError, match=r"train.width must be the pretrained network's: 8, the file's"):
        load_init(_fresh("small_cnn", width=16), "small_cnn", RGB, CLASSES, str(tmp_path / "cnn.pt"))


def test_params_check_the_spec_and_that_freezing_needs_weights(tmp_path):
    with pytest.raises(TilepipeError, match="train.init: expected PATH or PATH#sha256="):
        load_params(ROOT / "params.yaml", ["train.init=w.pth#sha256=abc"])
    with pytest.raises(TilepipeError, match="freeze_epochs needs train.init"):
        load_params(ROOT / "params.yaml", ["train.freeze_epochs=2"])


def test_cli_reports_a_missing_init_file_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = [x for o in [*tiny_overrides(tmp_path), "train.init=gone.pth"] for x in ("--set", o)]
    assert cli.main(["train", "--params", str(ROOT / "params.yaml"), *sets]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gone.pth: file not found" in err and "Traceback" not in err


def test_fine_tune_freezes_the_body_then_trains_it_and_records_lineage(prepared, monkeypatch):
    """A tilepipe model pretrained here, fine-tuned with freeze_epochs=1: epoch 1 moves the head only."""
    tmp_path, params = prepared
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    paths = (tmp_path / "tiles", tmp_path / "split.json")
    pretrain = tiny_params(tmp_path, *TRAIN, "train.epochs=1")
    train(pretrain, *paths, tmp_path / "pre")
    source = torch.load(tmp_path / "pre" / "model.pt", weights_only=True)["state_dict"]
    digest = hashlib.sha256((tmp_path / "pre" / "model.pt").read_bytes()).hexdigest()
    spec = f"train.init={tmp_path / 'pre' / 'model.pt'}#sha256={digest}"
    tuned = tiny_params(tmp_path, *TRAIN, "train.epochs=2", spec, "train.freeze_epochs=1")
    states = {}

    def keep(epoch, _metrics):
        states[epoch] = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["model"]

    result = train(tuned, *paths, tmp_path / "ft", on_epoch=keep)
    first, second = states[1], states[2]
    body = [k for k in source if k.startswith("net.features.") and "num_batches" not in k]
    assert body and all(torch.equal(first[k], source[k]) for k in body), "frozen: weights and BN stats"
    assert not torch.equal(first["net.head.weight"], source["net.head.weight"]), "the head trains"
    assert any(not torch.equal(second[k], source[k]) for k in body), "epoch 2 trains the body"
    _, meta = load_model(tmp_path / "ft" / "model.pt")
    assert (meta.init, meta.init_sha256) == ("model.pt", digest)
    tags = MlflowClient().get_run(result["run_id"]).data.tags
    assert (tags["init_file"], tags["init_sha256"]) == ("model.pt", digest)
    logged = MlflowClient().download_artifacts(result["run_id"], "model_meta.json", str(tmp_path))
    assert json.loads(open(logged).read())["init_sha256"] == digest


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
def test_freezing_on_two_ranks_holds_the_body_and_trains_the_head(prepared):
    """DDP with a frozen body: every parameter still gets a gradient, so no rank waits on another."""
    tmp_path, params = prepared
    meta = ModelMeta("classification", "small_cnn", 8, RGB, {"uint8": [0, 255]}, CLASSES, 16,
                     mean=[0.5] * 3, std=[0.2] * 3)  # fmt: skip
    torch.manual_seed(5)
    save_model(tmp_path / "init.pt", model_from_meta(meta), meta)
    sets = [*tiny_overrides(tmp_path), *TRAIN, "train.epochs=1", "train.threads=1"]
    sets += [f"train.init={tmp_path / 'init.pt'}", "train.freeze_epochs=1"]
    paths = [
        "--tiles",
        str(tmp_path / "tiles"),
        "--split",
        str(tmp_path / "split.json"),
        "--out",
        str(tmp_path / "ddp"),
    ]
    cmd = [str(Path(sys.executable).parent / "tilepipe"), "train", "--params", str(ROOT / "params.yaml")]
    cmd += [*(x for s in sets for x in ("--set", s)), *paths, "--nproc-per-node", "2"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("train.init init.pt") == 1, "rank 0 alone reports the init"
    source = torch.load(tmp_path / "init.pt", weights_only=True)["state_dict"]
    tuned = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)["model"]
    body = [k for k in source if k.startswith("net.features.") and "num_batches" not in k]
    assert all(torch.equal(tuned[k], source[k]) for k in body)
    assert not torch.equal(tuned["net.head.weight"], source["net.head.weight"])
