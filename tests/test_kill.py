"""kill -9 in the middle of `tilepipe tile` and `tilepipe train`: nothing partial is ever accepted, and
a rerun ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import (
    ROOT,
    prepare_tiny_pipeline,
    tiny_overrides,
    tiny_params,
    write_catalog,
    write_scene,
)
from tilepipe.errors import TilepipeError
from tilepipe.geo.scenes import read_scene_records
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.training import train
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile
from tilepipe.tiles.cutting import plan
from tilepipe.tiles.store import HOLD_SCENE, SceneTiles, read_index, scene_dirs, verify_shards

TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
TILE = ["tile.size=32", "tile.stride=16", "tile.shard_mb=1"]
TRAIN = [
    "train.epochs=6",
    "train.batch_size=16",
    "train.width=8",
    "train.min_purity=0.5",
    "train.lr=0.01",
    "train.early_stopping.patience=100",
    "train.threads=1",
]


def _cmd(tmp_path: Path, command: str, overrides: list[str], *args: str) -> list[str]:
    sets = [x for o in [*tiny_overrides(tmp_path), *overrides] for x in ("--set", o)]
    return [TILEPIPE, command, "--params", str(ROOT / "params.yaml"), *sets, *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _spawn(cmd: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as out:
        environment = {**_env(cwd), **env}
        return subprocess.Popen(
            cmd, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    """SIGKILL the process (its pid only) as soon as ready() holds; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed (rc {proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"not ready after {timeout} s:\n{log.read_text()}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _survivors(session: int) -> list[psutil.Process]:
    """Live processes left in a killed process's session (orphaned workers)."""
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------- tile


@pytest.fixture
def big_scenes(tmp_path: Path) -> tuple[Path, object]:
    """Three scenes that take about half a second each to tile; ingested; returns (scenes.json, params)."""
    rows = []
    for i in range(3):
        paths = write_scene(tmp_path, f"s{i}", size=(1600, 1280), seed=i)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name})
    catalog = write_catalog(tmp_path, rows)
    params = tiny_params(tmp_path, *TILE)
    ingest(params, catalog, tmp_path / "scenes.json")
    return tmp_path / "scenes.json", params


def test_killed_tiling_leaves_no_accepted_partial_shard_and_a_rerun_is_byte_identical(tmp_path, big_scenes):
    scenes_json, params = big_scenes
    reference = tmp_path / "reference"
    tile(params, scenes_json, reference)  # uninterrupted, one worker (workers do not shape the tiles)

    out, log = tmp_path / "tiles", tmp_path / "tile.log"
    cmd = _cmd(tmp_path, "tile", [*TILE, "tile.workers=2"], "--scenes", str(scenes_json), "--out", str(out))
    # The kill's point is fixed, not a timing window: the test seam stops s1's tiling for good right
    # after its first shard (of several), while s0 and s2 finish on the two workers.
    assert len(list((reference / "s1").glob("images-*.npy"))) >= 3
    proc = _spawn(cmd, tmp_path, log, **{HOLD_SCENE: "s1"})

    def mid_run() -> bool:
        return set(scene_dirs(out)) == {"s0", "s2"} and any(out.glob(".s1.*.tmp/held"))

    _kill_when(proc, mid_run, log)
    deadline = time.monotonic() + 10
    while (left := _survivors(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"tiling workers outlived the killed parent: {left}"
    before = _tree(out)
    time.sleep(0.5)
    assert _tree(out) == before, "something still writes after the kill"

    # (a) What the kill left: complete scenes verify; partial shards sit only in temp folders,
    # which no reader sees and the next run plans to redo.
    assert any(".tmp" in name for name in before), sorted(before)
    complete = scene_dirs(out)
    assert sorted(complete) == ["s0", "s2"]
    for scene_dir in complete.values():
        index = read_index(scene_dir)
        assert verify_shards(scene_dir, index) is None
        assert len(SceneTiles(scene_dir)) == index["tile_count"]
    all_scenes = read_scene_records(scenes_json)
    todo = {s.scene_id for s in plan(all_scenes, params, out)}
    assert todo == {s.scene_id for s in all_scenes} - set(complete)

    # (b) A rerun through the CLI finishes the job: the same bytes as the uninterrupted run, no leftovers.
    rerun = _run(cmd, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(todo)} of 3 scene(s) to tile" in rerun.stdout
    assert _tree(out) == _tree(reference)

    # A shard truncated or modified on purpose: a read refuses it naming the file, a rerun rebuilds it.
    truncated = out / "s0" / "images-00001.npy"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = out / "s2" / "labels-00000.npy"
    raw = bytearray(flipped.read_bytes())
    raw[-1] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    for scene_dir, shard in ((out / "s0", truncated), (out / "s2", flipped)):
        with pytest.raises(TilepipeError, match=f"{shard}: shard checksum mismatch"):
            SceneTiles(scene_dir)
    assert sorted(tile(params, scenes_json, out)["tiled"]) == ["s0", "s2"]
    assert _tree(out) == _tree(reference)


# ------------------------------------------------------------------------------------------ train


@pytest.fixture
def split_tiles(tmp_path: Path):
    """Five small scenes (2 train, 1 val, 2 test), tiled and split; returns the params."""
    return prepare_tiny_pipeline(tmp_path, *TRAIN, size=(192, 160))[1]


def _train_one_thread(params, tmp_path: Path, out: Path) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train.threads=1 does in the CLI: the same arithmetic in both
    try:
        return train(params, tmp_path / "tiles", tmp_path / "split.json", out)
    finally:
        torch.set_num_threads(threads)


def _weights(path: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.allclose(tensor.float(), b[name].float(), atol=1e-6), name


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path, split_tiles):
    params = split_tiles
    models, log = tmp_path / "models", tmp_path / "train.log"
    paths = ["--tiles", str(tmp_path / "tiles"), "--split", str(tmp_path / "split.json")]
    paths += ["--out", str(models)]
    proc = _spawn(_cmd(tmp_path, "train", TRAIN, *paths), tmp_path, log)
    # The uninterrupted reference trains in this process while the CLI run starts up.
    reference = ThreadPoolExecutor(1).submit(_train_one_thread, params, tmp_path, tmp_path / "reference")
    last = models / "checkpoints" / "last.pt"
    _kill_when(proc, last.is_file, log)
    done = json.loads(torch.load(last, weights_only=True)["state"])["epoch"]
    assert 1 <= done < 6, done
    assert reference.result()["epochs_run"] == 6

    assert (models / "model.pt").is_file() and not (models / "train.json").exists()

    # Resume with train.resume=true: the stage function the CLI calls, with the CLI's thread count.
    resumed = _train_one_thread(tiny_params(tmp_path, *TRAIN, "train.resume=true"), tmp_path, models)
    assert resumed["epochs_run"] == 6
    assert (models / "history.csv").read_text() == (tmp_path / "reference/history.csv").read_text()
    _assert_same_weights(
        _weights(last, "model"), _weights(tmp_path / "reference/checkpoints/last.pt", "model")
    )
    a, meta_a = load_model(models / "model.pt")
    b, meta_b = load_model(tmp_path / "reference" / "model.pt")
    assert meta_a.epoch == meta_b.epoch
    _assert_same_weights(a.state_dict(), b.state_dict())
    np.testing.assert_array_equal(
        np.load(models / "val_confusion.npy"), np.load(tmp_path / "reference/val_confusion.npy")
    )
    assert not [p for p in models.rglob(".*") if p.name.endswith(".tmp")], "temp files left behind"

    # A truncated checkpoint is refused with one clear line; it is never loaded, training never starts.
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    broken = _run(_cmd(tmp_path, "train", [*TRAIN, "train.resume=true"], *paths), tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "Traceback" not in broken.stderr
    lines = broken.stderr.strip().splitlines()
    assert len(lines) == 1, broken.stderr
    assert lines[0].startswith(f"tilepipe train: error: {last}: checkpoint is truncated or corrupt (")
    assert "train.resume=false" in lines[0]
    assert "epoch 1/" not in broken.stdout
