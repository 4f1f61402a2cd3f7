"""End to end: `dvc repro` on a copy of the repository with tiny params, then push and pull."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc_project

BIN = Path(sys.executable).parent
TINY = {
    "synthesize": {"scenes": 5, "min_size": 160, "max_size": 260, "seed": 3},
    "tile": {"size": 32, "stride": 32, "workers": 2},
    "train": {"epochs": 2, "width": 8, "batch_size": 32},
    "evaluate": {"min_test_tiles": 1},
}


def _run(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.xdist_group("dvc")
def test_dvc_repro_is_complete_idempotent_and_restorable(tmp_path):
    repo, env = dvc_project(tmp_path, TINY)
    git = ["git", "-c", "init.defaultBranch=main"]

    first = _run(["dvc", "repro"], repo, env)
    assert "Running stage 'tile'" in first.stdout
    tiles = sorted((repo / "data" / "tiles").glob("*/index.json"))
    assert len(tiles) == 5
    assert (repo / "data" / "split" / "split.json").is_file()
    assert (repo / "data" / "stats" / "stats.json").is_file()  # analyze, between split and train
    assert (repo / "metrics" / "metrics.json").is_file()
    assert (repo / "models" / "model.pt").is_file()
    scored = yaml.safe_load((repo / "metrics" / "metrics.json").read_text())
    assert scored["map_scenes"] >= 1 and 0.0 <= scored["map_miou"] <= 1.0  # predict -> evaluate scored maps
    for scene_id in scored["per_scene_accuracy"]:
        assert (repo / "predictions" / f"{scene_id}.tif").is_file()
        assert (repo / "metrics" / "scenes" / f"{scene_id}.png").stat().st_size > 0

    status = _run(["dvc", "status"], repo, env)
    assert "up to date" in status.stdout, status.stdout
    second = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout
    metrics = _run(["dvc", "metrics", "show"], repo, env)
    assert "macro_f1" in metrics.stdout

    _run(["dvc", "push"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "lock"], repo, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    _run(["dvc", "remote", "modify", "--local", "local", "url", str(repo / "dvc-remote")], clone, env)
    _run(["dvc", "pull"], clone, env)
    for index in tiles:
        scene_dir = index.parent
        for file in scene_dir.iterdir():
            restored = clone / file.relative_to(repo)
            assert restored.read_bytes() == file.read_bytes(), restored
    stats_file = Path("data/stats/stats.json")
    assert (clone / stats_file).read_bytes() == (repo / stats_file).read_bytes()

    # bands.normalize: standardize runs end to end; the statistics stay cached (they do not depend on it)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["bands"]["normalize"] = "standardize"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    third = _run(["dvc", "repro"], repo, env)
    assert "Running stage 'train'" in third.stdout and "Running stage 'evaluate'" in third.stdout
    assert "Running stage 'analyze'" not in third.stdout and "Running stage 'tile'" not in third.stdout
    from tilepipe.ml.checkpoint import load_model

    meta = load_model(repo / "models" / "model.pt")[1]
    stats = yaml.safe_load((repo / "data" / "stats" / "stats.json").read_text())
    assert meta.norm.mode == "standardize" and meta.norm.mean == stats["mean"]
    assert 0.0 <= yaml.safe_load((repo / "metrics" / "metrics.json").read_text())["macro_f1"] <= 1.0
