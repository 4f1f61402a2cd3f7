"""`tilepipe map`: an archive mapped exactly once, from a CSV or STAC catalog, a folder or an s3:// prefix.

Real GeoTIFFs, a real model.pt, real processes (a killed run, two runs at once) and a real S3 server.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from tests.conftest import CLASSES, ROOT, cut_pixel_data, write_catalog, write_raster, write_scene
from tests.test_stac_out import validate_core
from tilepipe import cli
from tilepipe.mapping.archive import HOLD_MAP
from tilepipe.ml.checkpoint import ModelMeta, model_from_meta, save_model

PARAMS = str(ROOT / "params.yaml")
TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
SIZE = (200, 160)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run where a user's project would be: the caches under .tilepipe/ go to the test's folder."""
    monkeypatch.chdir(tmp_path)


def make_model(path: Path, seed: int = 0) -> Path:
    """A small CNN (seeded weights, not trained: what is mapped does not matter here) saved as model.pt."""
    torch.manual_seed(seed)
    meta = ModelMeta(task="classification", model="small_cnn", width=8, bands=["red", "green", "blue"],
                     scale={"uint8": [0, 255]}, classes=CLASSES, tile_size=16, mean=[0.4] * 3,
                     std=[0.3] * 3)  # fmt: skip
    model = model_from_meta(meta)
    for module in model.modules():  # batch norm statistics of an untrained net say nothing: make them vary
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    save_model(path, model.eval(), meta)
    return path


def make_archive(folder: Path, n: int = 3) -> Path:
    """n scenes s0..s<n-1> with a CSV catalog (labels named but never read: they do not exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        paths = write_scene(folder, f"s{i}", size=SIZE, seed=i)
        paths["labels"].unlink()
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": "none.tif"})
    return write_catalog(folder, rows)


def run_map(*args: str, sets: tuple[str, ...] = ()) -> int:
    overrides = [x for s in ("train.threads=1", *sets) for x in ("--set", s)]
    return cli.main(["map", *args, "--params", PARAMS, *overrides])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder but summary.csv (it holds the run's timings), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "summary.csv" and ".locks" not in p.parts}  # fmt: skip


def summary(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "summary.csv", newline="") as fh:
        return {row["scene_id"]: row for row in csv.DictReader(fh)}


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.glob("*/*.tif")}


def test_a_csv_catalog_is_mapped_once_and_only_what_changed_is_mapped_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    catalog = make_archive(tmp_path / "archive")
    model = make_model(tmp_path / "model.pt")
    out = tmp_path / "maps"
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 0
    first = capsys.readouterr().out
    assert "map: 3 scene(s) in" in first and "3 mapped (s0 s1 s2)" in first
    for i in range(3):
        with rasterio.open(out / f"s{i}" / f"s{i}.tif") as src:
            assert src.profile["driver"] == "GTiff" and src.count == 1 and (src.width, src.height) == (25, 20)
        item = json.loads((out / f"s{i}" / f"s{i}.json").read_text())
        validate_core(item, "item")
        assert item["assets"]["map"]["href"] == f"./s{i}.tif" and item["collection"] == "tilepipe-maps"
        assert item["properties"]["tilepipe:model_sha256"] == _sha(model)
    collection = json.loads((out / "collection.json").read_text())
    validate_core(collection, "collection")
    assert [link["href"] for link in collection["links"] if link["rel"] == "item"] == [
        "./s0/s0.json", "./s1/s1.json", "./s2/s2.json"
    ]  # fmt: skip
    rows = summary(out)
    assert {r["status"] for r in rows.values()} == {"mapped"}
    hectares = sum(float(rows["s0"][f"area_ha_{c}"]) for c in CLASSES)
    assert hectares == pytest.approx(200 * 160 / 1e4 / 0.9996**2, abs=1e-4)  # UTM: 1 m px are 1/k0^2 m^2
    assert float(rows["s0"]["nodata_fraction"]) == 0 and 0.2 <= float(rows["s0"]["mean_confidence"]) <= 1

    # Nothing changed: nothing is mapped, no file is rewritten, and the one line says so.
    before, files = inodes(out), tree(out)
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 0
    assert "3 current (s0 s1 s2); nothing changed, nothing mapped" in capsys.readouterr().out
    assert inodes(out) == before and tree(out) == files
    assert {r["status"] for r in summary(out).values()} == {"current"}

    # One scene changed: that one is mapped again, and only that one.
    write_scene(tmp_path / "archive", "s1", size=SIZE, seed=11)
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 0
    assert "1 mapped (s1), 2 current (s0 s2)" in capsys.readouterr().out
    now = inodes(out)
    assert now["s0.tif"] == before["s0.tif"] and now["s2.tif"] == before["s2.tif"]
    assert now["s1.tif"] != before["s1.tif"]

    # Another model, then a predict param that changes maps: every scene again.
    other = make_model(tmp_path / "other.pt", seed=1)
    assert run_map(str(catalog), "--model", str(other), "--out", str(out)) == 0
    assert "3 mapped (s0 s1 s2)" in capsys.readouterr().out
    smaller = ("predict.batch_size=4",)
    assert run_map(str(catalog), "--model", str(other), "--out", str(out), sets=smaller) == 0
    assert "3 mapped (s0 s1 s2)" in capsys.readouterr().out

    # The MLflow run of each mapping run, of kind map, in the fallback experiment (no training run).
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["tilepipe"], filter_string="tags.kind = 'map'")
    assert len(runs) == 5 and sorted(runs["metrics.scenes_mapped"]) == [0, 1, 3, 3, 3]
    assert set(runs["tags.model_sha256"]) == {_sha(model), _sha(other)}
    hectares = sum(runs[f"metrics.area_ha_{name}"] for name in CLASSES)
    assert hectares.round(3).tolist() == [9.608] * 5  # three scenes with a map in every run


def _sha(path: Path) -> str:
    from tilepipe.fsutil import file_sha256

    return file_sha256(path)


def test_the_collection_is_updated_not_rebuilt_when_scenes_arrive(tmp_path, capsys):
    catalog = make_archive(tmp_path / "archive", n=2)
    model = make_model(tmp_path / "model.pt")
    out = tmp_path / "maps"
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 0
    collection = json.loads((out / "collection.json").read_text())
    collection["license"] = "CC-BY-4.0"  # what a team adds by hand stays
    collection["keywords"] = ["land cover"]
    (out / "collection.json").write_text(json.dumps(collection))
    west = collection["extent"]["spatial"]["bbox"][0]
    # s2 arrives, 50 km further east
    write_scene(tmp_path / "archive", "s2", size=SIZE, seed=2, origin=(550000.0, 4000000.0))
    with open(catalog, "a") as fh:
        fh.write("s2,s2.tif,none.tif,,\n")
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 0
    assert "1 mapped (s2), 2 current (s0 s1)" in capsys.readouterr().out
    updated = json.loads((out / "collection.json").read_text())
    validate_core(updated, "collection")
    assert updated["license"] == "CC-BY-4.0" and updated["keywords"] == ["land cover"]
    assert [link["href"] for link in updated["links"] if link["rel"] == "item"] == [
        "./s0/s0.json", "./s1/s1.json", "./s2/s2.json"
    ]  # fmt: skip
    east = updated["extent"]["spatial"]["bbox"][0]
    assert east[0] == west[0] and east[2] > west[2] + 0.5  # grew east by about half a degree
    classes = pystac.Collection.from_dict(updated).summaries.get_list("classification:classes")
    assert [c["description"] for c in classes[:-1]] == CLASSES


def test_onnxruntime_maps_by_default_as_torch_does_and_another_engine_remaps(tmp_path, capsys):
    """map.engine: onnxruntime by default; torch (the reference) side by side gives the same maps."""
    catalog = make_archive(tmp_path / "archive", n=2)
    model = make_model(tmp_path / "model.pt")
    maps = {}
    for engine in ("onnxruntime", "torch"):
        out = tmp_path / engine
        chosen = () if engine == "onnxruntime" else ("--engine", "torch")  # the default, then the flag
        options = ("--probabilities", *chosen)
        assert run_map(str(catalog), "--model", str(model), "--out", str(out), *options) == 0
        for i in range(2):
            item = json.loads((out / f"s{i}" / f"s{i}.json").read_text())
            assert item["properties"]["tilepipe:engine"] == engine
            with rasterio.open(out / f"s{i}" / f"s{i}.tif") as src:
                maps[engine, i] = src.read().astype(np.int16)
    for i in range(2):
        reference, other = maps["torch", i], maps["onnxruntime", i]
        assert reference[1:].std() > 1, "probabilities that vary, or the comparison means little"
        assert np.mean(reference[0] == other[0]) >= 0.9999  # the class band
        assert np.abs(reference[1:] - other[1:]).max() <= 1  # probabilities x 255: within one step
    # the engine is part of a map's key: mapping the same folder with the other engine remaps it
    capsys.readouterr()
    out = tmp_path / "torch"
    assert run_map(str(catalog), "--model", str(model), "--out", str(out), "--probabilities") == 0
    assert "2 mapped (s0 s1)" in capsys.readouterr().out


def test_a_stac_catalog_and_a_folder_of_geotiffs(tmp_path, capsys):
    folder = tmp_path / "archive"
    (folder / "2024" / "03").mkdir(parents=True)
    image = write_scene(folder, "a", size=SIZE)["image"]
    image.rename(folder / "2024" / "03" / "a.tif")
    write_scene(folder, "b", size=SIZE, seed=1)
    for labels in folder.glob("*_labels.tif"):
        labels.unlink()
    model = make_model(tmp_path / "model.pt")
    out = folder / "maps"  # inside the archive: its own maps are never scenes
    assert run_map(str(folder), "--model", str(model), "--out", str(out)) == 0
    assert "2 mapped (2024_03_a b)" in capsys.readouterr().out
    assert run_map(str(folder), "--model", str(model), "--out", str(out)) == 0
    assert "2 current (2024_03_a b); nothing changed" in capsys.readouterr().out

    # STAC: bands named by the items (the files name none), time from the items, no labels asset.
    stac = tmp_path / "stac"
    stac.mkdir()
    features = []
    for i in range(2):
        data = np.random.default_rng(i).integers(1, 255, (3, SIZE[1], SIZE[0]), dtype=np.uint8)
        write_raster(stac / f"t{i}.tif", data[::-1], transform=from_origin(500000, 4000000, 1, 1))
        bands = [{"name": f"B{k}", "common_name": c} for k, c in ((3, "blue"), (2, "green"), (1, "red"))]
        features.append({
            "type": "Feature", "stac_version": "1.0.0", "stac_extensions": [], "id": f"t{i}",
            "geometry": {"type": "Point", "coordinates": [15.0, 36.1]}, "bbox": [15.0, 36.1, 15.0, 36.1],
            "properties": {"datetime": f"2024-0{i + 1}-15T10:30:00Z"}, "links": [],
            "assets": {"image": {"href": f"t{i}.tif", "roles": ["data"], "eo:bands": bands}},
        })  # fmt: skip
    (stac / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert run_map(str(stac / "items.json"), "--model", str(model), "--out", str(tmp_path / "stac-maps")) == 0
    item = json.loads((tmp_path / "stac-maps" / "t1" / "t1.json").read_text())
    assert item["properties"]["datetime"] == "2024-02-15T10:30:00Z"
    assert item["properties"]["tilepipe:datetime_source"] == "scene"


def test_bad_scenes_are_a_line_each_and_the_others_are_mapped(tmp_path, capsys):
    catalog = make_archive(tmp_path / "archive", n=2)
    folder = tmp_path / "archive"
    write_scene(folder, "cut", size=(800, 640), seed=5)
    cut_pixel_data(folder / "cut.tif", keep=0.5)
    two = np.full((2, 80, 96), 7, dtype=np.uint8)
    write_raster(folder / "twoband.tif", two, descriptions=["red", "green"])
    with open(catalog, "a") as fh:
        fh.write("cut,cut.tif,x,,\ntwoband,twoband.tif,x,,\ngone,gone.tif,x,,\n")
    model = make_model(tmp_path / "model.pt")
    out = tmp_path / "maps"
    assert run_map(str(catalog), "--model", str(model), "--out", str(out)) == 1
    captured = capsys.readouterr()
    assert "2 mapped (s0 s1), 3 failed (cut gone twoband)" in captured.out
    assert f"map: failed gone: {folder / 'gone.tif'}: file not found" in captured.out
    assert "map: failed twoband: " in captured.out and "lacks band(s) blue (has red, green)" in captured.out
    assert "map: failed cut: " in captured.out and "read or write failed" in captured.out
    assert captured.err.strip() == "tilepipe map: error: 3 of 5 scene(s) failed (see above and summary.csv)"
    assert "Traceback" not in captured.out + captured.err
    rows = summary(out)
    assert [rows[s]["status"] for s in ("cut", "gone", "s0", "s1", "twoband")] == [
        "failed", "failed", "mapped", "mapped", "failed"
    ]  # fmt: skip
    assert "lacks band(s) blue" in rows["twoband"]["problem"]
    assert sorted(p.name for p in out.iterdir()) == [".locks", "collection.json", "s0", "s1", "summary.csv"]


def _spawn(cmd: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _wait_for(check, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            pytest.fail(f"ended before the point (rc {proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"not there after {timeout} s:\n{log.read_text()}")
        time.sleep(0.05)


def _command(catalog: Path, model: Path, out: Path | str) -> list[str]:
    return [TILEPIPE, "map", str(catalog), "--model", str(model), "--out", str(out), "--params", PARAMS,
            "--set", "train.threads=1"]  # fmt: skip


def test_a_killed_run_leaves_nothing_half_and_the_rerun_ends_byte_identical(tmp_path):
    catalog = make_archive(tmp_path / "archive")
    model = make_model(tmp_path / "model.pt")
    reference = tmp_path / "reference"
    subprocess.run(_command(catalog, model, reference), check=True, capture_output=True, timeout=300)

    out, log = tmp_path / "maps", tmp_path / "map.log"
    # The kill's point is fixed: the seam stops s1 once its map and item are complete in the temp folder,
    # before they are renamed into place; s0 is done, s2 not started.
    proc = _spawn(_command(catalog, model, out), tmp_path, log, **{HOLD_MAP: "s1"})
    _wait_for(lambda: any(out.glob(".s1.*.tmp/held")), proc, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    held = next(out.glob(".s1.*.tmp"))
    assert sorted(p.name for p in held.iterdir()) == ["held", "s1.json", "s1.tif"]  # complete, not published
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["s0"]  # no s1, and no collection yet

    done = subprocess.run(_command(catalog, model, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 mapped (s1 s2), 1 current (s0)" in done.stdout
    assert not list(out.glob(".s1.*")), "the killed run's temp folder is gone"
    assert tree(out) == tree(reference)  # maps, items and collection, byte for byte


def test_two_runs_at_once_never_map_a_scene_twice(tmp_path):
    catalog = make_archive(tmp_path / "archive")
    model = make_model(tmp_path / "model.pt")
    out, log = tmp_path / "maps", tmp_path / "first.log"
    first = _spawn(_command(catalog, model, out), tmp_path, log, **{HOLD_MAP: "s1"})
    try:
        _wait_for(lambda: any(out.glob(".s1.*.tmp/held")), first, log)
        second = subprocess.run(_command(catalog, model, out), capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 mapped (s2), 1 current (s0), 1 busy (s1)" in second.stdout
    assert "map: [1/2] s1 busy: being mapped by another run right now" in second.stdout
    third = subprocess.run(_command(catalog, model, out), capture_output=True, text=True, timeout=300)
    assert "1 mapped (s1), 2 current (s0 s2)" in third.stdout


def test_an_s3_prefix_is_mapped_into_a_bucket(tmp_path, s3, capsys):
    client = s3.client()
    client.create_bucket(Bucket="archive")
    folder = tmp_path / "archive"
    make_archive(folder)
    for i in range(3):
        client.upload_file(str(folder / f"s{i}.tif"), "archive", f"scenes/2024/s{i}.tif")
    client.put_object(Bucket="archive", Key="scenes/readme.txt", Body=b"not a scene")
    model = make_model(tmp_path / "model.pt")
    out = "s3://archive/maps/"
    assert run_map("s3://archive/scenes/", "--model", str(model), "--out", out) == 0
    assert "3 mapped (2024_s0 2024_s1 2024_s2)" in capsys.readouterr().out
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="archive", Prefix="maps/")["Contents"])
    assert keys == ["maps/2024_s0/2024_s0.json", "maps/2024_s0/2024_s0.tif", "maps/2024_s1/2024_s1.json",
                    "maps/2024_s1/2024_s1.tif", "maps/2024_s2/2024_s2.json", "maps/2024_s2/2024_s2.tif",
                    "maps/collection.json", "maps/summary.csv"]  # fmt: skip
    collection = json.loads(client.get_object(Bucket="archive", Key="maps/collection.json")["Body"].read())
    validate_core(collection, "collection")
    item = json.loads(client.get_object(Bucket="archive", Key="maps/2024_s1/2024_s1.json")["Body"].read())
    assert [link["href"] for link in item["links"] if link["rel"] == "derived_from"] == [
        "s3://archive/scenes/2024/s1.tif"
    ]
    local = tmp_path / "local"
    assert run_map(str(folder / "catalog.csv"), "--model", str(model), "--out", str(local)) == 0
    mapped = client.get_object(Bucket="archive", Key="maps/2024_s1/2024_s1.tif")["Body"].read()
    assert mapped == (local / "s1" / "s1.tif").read_bytes()  # the same map as from the local file

    # Nothing new: nothing mapped. A scene replaced in the bucket (new ETag): that one only.
    assert run_map("s3://archive/scenes/", "--model", str(model), "--out", out) == 0
    assert "nothing changed, nothing mapped" in capsys.readouterr().out
    write_scene(folder, "s0", size=SIZE, seed=9)
    client.upload_file(str(folder / "s0.tif"), "archive", "scenes/2024/s0.tif")
    assert run_map("s3://archive/scenes/", "--model", str(model), "--out", out) == 0
    assert "1 mapped (2024_s0), 2 current (2024_s1 2024_s2)" in capsys.readouterr().out


def test_an_s3_outage_while_mapping_is_retried(tmp_path, monkeypatch, capsys):
    import threading

    import tilepipe.mapping.archive as archive
    import tilepipe.stages.map as stage
    from tests.prefect_server import free_port
    from tests.s3_server import S3Server

    folder, model, out = tmp_path / "archive", make_model(tmp_path / "model.pt"), tmp_path / "maps"
    make_archive(folder, n=2)
    server = S3Server(free_port(), tmp_path / "moto.log", auth=False)  # any key: it restarts on its port

    def put() -> None:
        server.client().create_bucket(Bucket="outage")
        for i in range(2):
            server.client().upload_file(str(folder / f"s{i}.tif"), "outage", f"scenes/s{i}.tif")

    def back_soon() -> None:  # up again, with its objects, well before the retry
        time.sleep(1)
        server.start()
        put()

    planned, restart = stage.plan, threading.Thread(target=back_soon)

    def plan_then_outage(*args, **kwargs):  # the scenes are listed, then the store goes away for a while
        jobs = planned(*args, **kwargs)
        server.stop()
        restart.start()
        return jobs

    server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        put()
        monkeypatch.setattr(stage, "plan", plan_then_outage)
        monkeypatch.setattr(archive, "RETRY_DELAYS_S", (8.0, 8.0, 8.0))  # moto restarts without its objects
        assert run_map("s3://outage/scenes/", "--model", str(model), "--out", str(out)) == 0
    finally:
        if restart.is_alive() or restart.ident is not None:
            restart.join(timeout=120)
        server.stop()
    printed = capsys.readouterr().out
    assert "map: s0: s3://outage/scenes/s0.tif: " in printed and "; trying again in 8 s" in printed
    assert "2 mapped (s0 s1)" in printed


def test_s3_locks_are_exclusive_and_a_dead_holders_lock_is_taken_over(s3):
    import socket

    from tilepipe.mapping.outputs import S3Store
    from tilepipe.services.procs import start_time

    s3.client().create_bucket(Bucket="locks")
    store = S3Store("s3://locks/maps/")
    with store.lock("s0") as first:
        assert first
        with store.lock("s0") as second:
            assert not second  # held by a live process (this one)
        with store.lock("s1") as other:
            assert other
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)  # fmt: skip
    holder = {"host": socket.gethostname(), "pid": int(gone.stdout), "started": "1"}
    holder["expires"] = time.time() + 600
    s3.client().put_object(Bucket="locks", Key="maps/.locks/s0", Body=json.dumps(holder).encode())
    with store.lock("s0") as taken:
        assert taken  # its holder has exited: a kill -9 leaves no lock behind for long
    alive = {**holder, "pid": os.getpid(), "started": start_time(os.getpid())}
    s3.client().put_object(Bucket="locks", Key="maps/.locks/s0", Body=json.dumps(alive).encode())
    with store.lock("s0") as refused:
        assert not refused
    elsewhere = {**holder, "host": "another-host", "expires": time.time() - 1}  # a lease that ran out
    s3.client().put_object(Bucket="locks", Key="maps/.locks/s0", Body=json.dumps(elsewhere).encode())
    with store.lock("s0") as expired:
        assert expired
    assert "Contents" not in s3.client().list_objects_v2(Bucket="locks", Prefix="maps/.locks/")
