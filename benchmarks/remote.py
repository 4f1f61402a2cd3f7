"""Tiling a scene from object storage against the same file on local disk, and the remote run's memory.

One 8192 px uint8 RGB scene (tiled, DEFLATE) is uploaded to an S3-compatible server started here
on 127.0.0.1 (moto, the server the tests use); ``tile`` (default params, one worker) runs once on
the ``s3://`` copy and once on the local file, each in a fresh process. The remote read goes
through GDAL's /vsis3/ with range requests: its peak RSS staying near the local run's (and far
below the scene's size) shows the scene is not downloaded whole. moto is a Python server on the
same two cores, so the ratio is a floor for a real object store on its own machines.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import WORK, make_labels, make_scene, run_measured

SIZE = 8192
BUCKET = "bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}

INGEST = """
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.ingest import ingest
ingest(load_params("params.yaml"), Path({catalog!r}), Path({scenes!r}))
"""

TILE = """
import time
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.tile import tile
t = time.perf_counter()
tile(load_params("params.yaml", ["tile.workers=1"]), Path({scenes!r}), Path({out!r}))
print(time.perf_counter() - t)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    moto = Path(sys.executable).parent / "moto_server"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")


def _tile(folder: Path, catalog: Path, env: dict[str, str]) -> tuple[float, int, float]:
    scenes, out = folder / f"{catalog.stem}.json", folder / f"tiles-{catalog.stem}"
    run_measured(INGEST.format(catalog=str(catalog), scenes=str(scenes)), env=env)
    shutil.rmtree(out, ignore_errors=True)
    measured = run_measured(TILE.format(scenes=str(scenes), out=str(out)), env=env)
    seconds = float(measured.stdout.split()[-1])
    tiles = json.loads((out / "big" / "index.json").read_text())["tile_count"]
    shutil.rmtree(out, ignore_errors=True)
    return seconds, tiles, measured.rss_mb


def run() -> dict:
    """Tiles/s of the s3:// scene and of the local one (one run each), their ratio, peak RSS of each."""
    import boto3

    folder = WORK / "remote"
    folder.mkdir(parents=True, exist_ok=True)
    scene = make_scene(folder / "big.tif", SIZE)
    make_labels(folder / "big_labels.tif", SIZE)
    (folder / "local.csv").write_text("scene_id,image,labels\nbig,big.tif,big_labels.tif\n")
    (folder / "s3.csv").write_text(
        f"scene_id,image,labels\nbig,s3://{BUCKET}/big.tif,s3://{BUCKET}/big_labels.tif\n"
    )
    proc, endpoint = _start_moto(folder / "moto.log")
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{k.lower(): v for k, v in CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"},
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        for name in ("big.tif", "big_labels.tif"):
            client.upload_file(str(folder / name), BUCKET, name)
        remote_s, tiles, remote_rss = _tile(folder, folder / "s3.csv", env)
        local_s, local_tiles, local_rss = _tile(
            folder, folder / "local.csv", {k: "" for k in ("AWS_ENDPOINT_URL",)}
        )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert tiles == local_tiles, (tiles, local_tiles)
    return {
        "scene_px": SIZE,
        "scene_file_mb": round(scene.stat().st_size / 2**20, 1),
        "tiles": tiles,
        "local_tiles_per_s": round(tiles / local_s, 1),
        "s3_tiles_per_s": round(tiles / remote_s, 1),
        "s3_vs_local_throughput": round(local_s / remote_s, 2),
        "local_peak_rss_mb": round(local_rss, 1),
        "s3_peak_rss_mb": round(remote_rss, 1),
        "targets": {"s3_peak_rss_mb": f"< {round(local_rss + 200)}"},
        "notes": "one run each; moto (a Python S3 server) shares the 2 cores with tiling",
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    print(json.dumps(run(), indent=1))
