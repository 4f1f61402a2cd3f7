"""An S3 outage in the middle of tiling: the server is stopped and started again while a flow tiles a
scene from it; GDAL's retries and the flow's task retries absorb it, and no partial shard is kept."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prefect import flow
from rasterio.transform import from_origin

from tests.conftest import tiny_params, write_catalog, write_raster
from tests.prefect_server import free_port
from tests.s3_server import S3Server
from tilepipe.flows.fanout import run_each
from tilepipe.flows.pipeline import tile_task
from tilepipe.geo.scenes import read_scene_records
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile_one
from tilepipe.tiles.store import HOLD_SCENE, RELEASE_FILE

pytestmark = [pytest.mark.xdist_group("prefect"), pytest.mark.usefixtures("prefect_api")]
BUCKET = "outage"


@flow(name="tile-remote-scenes")
def tile_flow(scenes: list, params) -> list:
    """The pipeline flow's tile step alone: one task per scene, with its retries."""
    return run_each(tile_task, [(s.scene_id, {"scene": s, "params": params}) for s in scenes], 1)


def big_scene(folder: Path) -> list[dict]:
    """A 4096 x 1024 px scene (four 1024 px reads, several 1 MB shards) and its labels."""
    classes = (np.arange(4096)[None, :] * 5 // 4096 + 1).repeat(1024, axis=0).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 8, (3, 1024, 4096), dtype=np.uint8)
    transform = from_origin(500000, 4000000, 1.0, 1.0)
    names = ["red", "green", "blue"]
    write_raster(folder / "big.tif", classes * 40 + noise, "EPSG:32633", transform, descriptions=names)
    write_raster(folder / "big_labels.tif", classes, "EPSG:32633", transform, nodata=0)
    return [{"scene_id": "big", "image": "big.tif", "labels": "big_labels.tif"}]


def put(server: S3Server, folder: Path) -> None:
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for name in ("big.tif", "big_labels.tif"):
        client.upload_file(str(folder / name), BUCKET, name)


def test_an_s3_restart_mid_tiling_is_absorbed(tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    rows = big_scene(local)
    server = S3Server(free_port(), tmp_path / "moto.log", auth=False)
    server.start()
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        put(server, local)
        remote = [
            {**r, "image": f"s3://{BUCKET}/big.tif", "labels": f"s3://{BUCKET}/big_labels.tif"} for r in rows
        ]
        catalog = write_catalog(tmp_path, remote)
        sets = ["tile.size=64", "tile.stride=64", "tile.shard_mb=1", "tile.workers=1"]
        params = tiny_params(tmp_path, f"data.catalog={catalog}", *sets)
        ingest(params, catalog, tmp_path / "scenes.json")
        scenes = read_scene_records(tmp_path / "scenes.json")

        release = tmp_path / "release"
        monkeypatch.setenv(HOLD_SCENE, "big")
        monkeypatch.setenv(RELEASE_FILE, str(release))
        outage = threading.Thread(target=_outage, args=(server, local, tmp_path / "data" / "tiles", release))
        outage.start()
        monkeypatch.chdir(tmp_path)
        try:
            tile_flow(scenes, params)  # raises if the scene fails for good
        finally:
            outage.join(timeout=180)  # before stopping: the thread may start the server again
    finally:
        server.stop()

    local_params = tiny_params(tmp_path, *sets)
    local_scene = scenes[0].__class__(**{**scenes[0].to_dict(), "image": str(local / "big.tif"),
                                         "labels": str(local / "big_labels.tif")})  # fmt: skip
    monkeypatch.delenv(HOLD_SCENE)
    tile_one(local_scene, local_params, tmp_path / "local-tiles")
    tiles, reference = tmp_path / "data" / "tiles" / "big", tmp_path / "local-tiles" / "big"
    shards = sorted(p.name for p in tiles.iterdir())
    assert shards == sorted(p.name for p in reference.iterdir()) and len(shards) > 4
    for name in shards:
        if name != "index.json":
            assert (tiles / name).read_bytes() == (reference / name).read_bytes(), name
    index, expected = (json.loads((d / "index.json").read_text()) for d in (tiles, reference))
    assert index == expected
    assert not [p for p in (tmp_path / "data" / "tiles").iterdir() if p.name.startswith(".")]  # no leftovers


def _outage(server: S3Server, local: Path, tiles: Path, release: Path) -> None:
    """When the scene has written its first shard: stop the server, let tiling go on against nothing
    for 3 s, then start it again on the same port with the same objects."""
    deadline = time.monotonic() + 120
    while not any(tiles.glob(".big.*/held")) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    release.touch()
    time.sleep(3)
    server.start()
    put(server, local)
