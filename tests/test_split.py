import json

import numpy as np
import pytest

from tests.conftest import tiny_params, write_catalog, write_scene
from tilepipe.errors import TilepipeError
from tilepipe.stages.ingest import ingest
from tilepipe.stages.split import split
from tilepipe.stages.tile import tile
from tilepipe.tiles.splitting import assign_scenes


def _prepare(tmp_path, catalog, *overrides):
    params = tiny_params(tmp_path, *overrides)
    ingest(params, catalog, tmp_path / "scenes.json")
    tile(params, tmp_path / "scenes.json", tmp_path / "tiles")
    return params


def test_whole_scenes_never_cross_splits(tmp_path, scenes):
    params = _prepare(tmp_path, scenes)
    result = split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    members = result["members"]
    seen = [s for name in members for s in members[name]]
    assert sorted(seen) == ["s0", "s1", "s2", "s3"]
    assert len(seen) == len(set(seen))
    assert all(members[name] for name in ("train", "val", "test"))
    assert all(v is None for name in members for v in members[name].values())
    assert json.loads((tmp_path / "split.json").read_text()) == result
    assert result["counts"]["train"]["tiles"] == 30 * result["counts"]["train"]["scenes"]


def test_split_is_seeded_and_ratio_driven():
    scenes = [f"s{i:02d}" for i in range(20)]
    ratios = {"train": 0.6, "val": 0.2, "test": 0.2}
    first = assign_scenes(scenes, ratios, seed=1)
    assert first == assign_scenes(scenes, ratios, seed=1)
    assert first != assign_scenes(scenes, ratios, seed=2)
    counts = {k: list(first.values()).count(k) for k in ratios}
    assert counts == {"train": 12, "val": 4, "test": 4}


def test_catalog_split_column_is_honoured(tmp_path):
    rows = []
    for i, name in enumerate(["test", "train", "val", "train"]):
        paths = write_scene(tmp_path, f"s{i}", seed=i)
        rows.append(
            {"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name, "split": name}
        )
    catalog = write_catalog(tmp_path, rows)
    params = _prepare(tmp_path, catalog)
    result = split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    assert set(result["members"]["test"]) == {"s0"}
    assert set(result["members"]["train"]) == {"s1", "s3"}


def test_single_scene_is_refused_with_explanation(tmp_path):
    paths = write_scene(tmp_path, "only")
    catalog = write_catalog(
        tmp_path, [{"scene_id": "only", "image": paths["image"].name, "labels": paths["labels"].name}]
    )
    params = _prepare(tmp_path, catalog)
    with pytest.raises(TilepipeError, match="one sample"):
        split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    assert not (tmp_path / "split.json").exists()


def test_empty_split_says_why(tmp_path):
    rows = []
    for i in range(2):
        paths = write_scene(tmp_path, f"s{i}", seed=i)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name})
    params = _prepare(tmp_path, write_catalog(tmp_path, rows))
    with pytest.raises(TilepipeError, match="is empty: no scene was assigned"):
        split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")


def test_spatial_blocks_opt_in_keeps_a_buffer(tmp_path):
    paths = write_scene(tmp_path, "big", size=(320, 320))
    catalog = write_catalog(
        tmp_path, [{"scene_id": "big", "image": paths["image"].name, "labels": paths["labels"].name}]
    )
    params = _prepare(
        tmp_path, catalog, "split.spatial_blocks=true", "split.block_tiles=4", "split.buffer_tiles=1"
    )
    result = split(params, tmp_path / "scenes.json", tmp_path / "tiles", tmp_path / "split.json")
    index = json.loads((tmp_path / "tiles" / "big" / "index.json").read_text())
    rc = np.array([index["tiles"]["row"], index["tiles"]["col"]]).T
    where = {name: rc[result["members"][name]["big"]] for name in ("train", "val", "test")}
    assert all(len(v) for v in where.values())
    for a in where:
        for b in where:
            if a < b:
                gap = np.abs(where[a][:, None, :] - where[b][None, :, :]).max(axis=2)
                assert gap.min() > 1, f"{a} and {b} tiles closer than the buffer"


def test_classes_the_training_split_lacks_are_named(tmp_path, capsys):
    from tilepipe.tiles.splitting import class_warnings, print_summary

    names = ["background", "center_pivot", "road"]
    shares = {"train": (1.0, 0.0, 0.0), "val": (1.0, 0.0, 0.0), "test": (0.9, 0.0, 0.1)}
    counts = {
        split: {"scenes": 1, "tiles": 9, "class_fraction": dict(zip(names, values, strict=True))}
        for split, values in shares.items()
    }
    warnings = class_warnings(counts, names)
    assert warnings[0].startswith("class(es) center_pivot, road have no labelled pixel in the training split")
    assert warnings[1].startswith("class(es) road are in the test split only")
    print_summary({"mode": "scenes", "counts": counts}, names)
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == ["split", "scenes", "tiles", "background", "center_pivot", "road"]  # not cut to 8
