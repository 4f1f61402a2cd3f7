"""The champion rule end to end: real trainings, evaluations and a real MLflow registry (SQLite in tmp).

Two test scenes that disagree: t0 is mostly water, t1 mostly forest. A model that always says
"water" becomes the first champion; one that always says "forest" has the higher pooled macro-F1
(it is better on t1, worse on t0) and must not take the alias; a trained model, better on both
scenes, must.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from rasterio.transform import from_origin

from tests.conftest import ROOT, tiny_overrides, tiny_params, write_catalog, write_raster, write_scene
from tilepipe import cli
from tilepipe.ml.checkpoint import load_model, save_model

NAME = "tilepipe-landcover"
TRAIN = ["train.batch_size=16", "train.width=8", "train.min_purity=0.5", "train.lr=0.01"]
# the class of each 16 px column: t0 is half water, t1 more than half forest
STRIPES = {"t0": [1, 1, 1, 1, 1, 2, 2, 2, 3, 3], "t1": [1, 1, 1, 2, 2, 2, 2, 2, 2, 3]}


def write_striped(folder: Path, scene_id: str, columns: list[int], seed: int) -> dict[str, Path]:
    """A 32 px tall scene of 16 px wide class columns, coloured as conftest.write_scene colours classes."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.asarray(columns, dtype=np.uint8), 16)[None, :].repeat(32, axis=0)
    image = np.stack([classes * 40 + rng.integers(1, 20, classes.shape) for _ in range(3)]).astype(np.uint8)
    transform = from_origin(500000.0, 4000000.0, 1.0, 1.0)
    bands = ["red", "green", "blue"]
    image_path = write_raster(folder / f"{scene_id}.tif", image, transform=transform, nodata=0,
                              descriptions=bands)  # fmt: skip
    labels = write_raster(folder / f"{scene_id}_labels.tif", classes, transform=transform, nodata=0)
    return {"image": image_path, "labels": labels}


def row(scene_id: str, paths: dict[str, Path], split: str) -> dict[str, str]:
    return {"scene_id": scene_id, "image": paths["image"].name, "labels": paths["labels"].name,
            "split": split}  # fmt: skip


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """Scenes s0, s1 (train) and s2 (val) with every class; the disagreeing test scenes t0 and t1."""
    from tilepipe.stages.ingest import ingest
    from tilepipe.stages.split import split
    from tilepipe.stages.tile import tile

    rows = []
    for i, name in enumerate(("train", "train", "val")):
        paths = write_scene(tmp_path, f"s{i}", size=(160, 64), seed=i)
        rows.append(row(f"s{i}", paths, name))
    for i, (scene_id, columns) in enumerate(STRIPES.items()):
        rows.append(row(scene_id, write_striped(tmp_path, scene_id, columns, seed=10 + i), "test"))
    catalog = write_catalog(tmp_path, rows)
    params = tiny_params(tmp_path, *TRAIN)
    ingest(params, catalog, tmp_path / "scenes.json")
    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    return tmp_path


def cli_run(root: Path, *args: str, epochs: int = 1) -> int:
    sets = [x for o in [*tiny_overrides(root), *TRAIN, f"train.epochs={epochs}"] for x in ("--set", o)]
    return cli.main([*args[:1], "--params", str(ROOT / "params.yaml"), *sets, *args[1:]])


def version(root: Path, models: str, *, constant: int | None = None, epochs: int = 1) -> dict[str, str]:
    """Train into ``root/models`` (a real MLflow run), optionally make the model always say one class,
    then evaluate it, which logs the evaluation and registers the version; return its tags."""
    paths = ["--tiles", str(root / "tiles"), "--split", str(root / "split.json")]
    assert cli_run(root, "train", *paths, "--out", str(root / models), epochs=epochs) == 0
    if constant is not None:
        model, meta = load_model(root / models / "model.pt")
        with torch.no_grad():
            model.net.head.weight.zero_()
            model.net.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(constant), 5).float() * 5)
        save_model(root / models / "model.pt", model, meta)
    out = root / f"metrics-{models}"
    assert cli_run(root, "evaluate", "--model-dir", str(root / models), *paths, "--out", str(out)) == 0
    run_id = json.loads((root / models / "run.json").read_text())["run_id"]
    client = MlflowClient()
    found = [v for v in client.search_model_versions(f"name='{NAME}'") if v.tags.get("run_id") == run_id]
    assert len(found) == 1
    return {**found[0].tags, "version": str(found[0].version)}


def champion_version() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def test_a_noise_level_gain_does_not_take_the_alias_and_a_clear_one_does(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")

    water = version(workspace, "water", constant=0)
    assert water["champion_decision"] == "first version" and champion_version() == water["version"]

    forest = version(workspace, "forest", constant=1)
    assert float(forest["test_macro_f1"]) > float(water["test_macro_f1"]), "higher pooled score"
    low, high = json.loads(forest["champion_diff_macro_f1_ci"])
    assert low < 0 < high and float(forest["champion_diff_macro_f1"]) > 0
    assert forest["champion_compared_with"] == water["version"] and forest["champion_confidence"] == "0.9"
    kept = f"does not beat champion v{water['version']} (within noise): macro_f1 +"
    assert forest["champion_decision"].startswith(kept)
    assert champion_version() == water["version"], "a gain the scenes disagree on keeps the champion"

    trained = version(workspace, "trained", epochs=6)
    low, high = json.loads(trained["champion_diff_macro_f1_ci"])
    assert 0 < low <= float(trained["champion_diff_macro_f1"]) <= high
    assert trained["champion_decision"].startswith(f"beats champion v{water['version']}: macro_f1 +")
    assert champion_version() == trained["version"]
    out = capsys.readouterr().out
    assert f"register: {NAME} v{trained['version']}: beats champion" in out and "-> champion" in out
