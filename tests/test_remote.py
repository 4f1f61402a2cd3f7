"""Scenes in object storage (s3://) and on a web server (https:// and http://), read through GDAL's
virtual file systems from a real S3 server on 127.0.0.1 (moto): the same tiles as from local disk."""

import functools
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_params, write_catalog, write_geojson, write_scene
from tilepipe.errors import TilepipeError
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.xdist_group("s3")


def upload(s3, folder: Path, names: list[str]) -> str:
    """Upload files to a fresh bucket; returns its name."""
    bucket = f"scenes-{uuid.uuid4().hex[:8]}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for name in names:
        client.upload_file(str(folder / name), bucket, f"imagery/{name}")
    return bucket


def scenes_with_geojson(folder: Path) -> list[dict]:
    rows = []
    for i in range(3):
        paths = write_scene(folder, f"s{i}", seed=i)
        rows.append({"scene_id": f"s{i}", "image": paths["image"].name, "labels": paths["labels"].name})
    block = {"type": "Polygon", "coordinates": [[(500000, 4000000), (500096, 4000000), (500096, 3999920),
                                                 (500000, 3999920), (500000, 4000000)]]}  # fmt: skip
    write_geojson(folder / "s2.geojson", [(block, "forest")], crs="EPSG:32633")
    rows[2]["labels"] = "s2.geojson"
    return rows


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers ``Range: bytes=a-b`` as a web server or a CDN does."""

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not match or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        start, end = int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:x}"')
        self.end_headers()
        return io.BytesIO(data[start : end + 1])

    def log_message(self, *args):
        pass


def web_server(folder: Path) -> str:
    """Serve ``folder`` over HTTP on 127.0.0.1 from a thread of this process; returns its URL."""
    handler = functools.partial(RangeHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def tile_bytes(tiles: Path) -> dict[str, bytes]:
    """Every file of a tile folder; an index without its fingerprint (that of a remote scene is the
    store's ETag, size and time instead of the file's SHA-256)."""
    files = {}
    for path in sorted(p for p in tiles.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "index.json":
            index = json.loads(data)
            assert len(index.pop("fingerprint")) == 64
            data = json.dumps(index).encode()
        files[path.relative_to(tiles).as_posix()] = data
    return files


def test_scenes_in_a_bucket_tile_like_local_files(tmp_path, s3):
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    remote.mkdir()
    rows = scenes_with_geojson(local)
    write_catalog(local, rows)
    bucket = upload(s3, local, [f for r in rows for f in (r["image"], r["labels"])])
    uris = [
        {
            **r,
            "image": f"s3://{bucket}/imagery/{r['image']}",
            "labels": f"s3://{bucket}/imagery/{r['labels']}",
        }
        for r in rows
    ]
    url = f"{web_server(local)}/{rows[1]['image']}"
    uris[1]["image"] = url  # a web server's file: /vsicurl/ with range requests
    catalog = write_catalog(remote, uris)

    for folder, cat in ((local, local / "catalog.csv"), (remote, catalog)):
        params = tiny_params(folder, f"data.catalog={cat}")
        ingest(params, cat, folder / "scenes.json")
        tile(params, folder / "scenes.json", folder / "tiles")

    assert tile_bytes(remote / "tiles") == tile_bytes(local / "tiles")
    records = json.loads((remote / "scenes.json").read_text())["scenes"]
    assert records[0]["image"] == f"s3://{bucket}/imagery/s0.tif"
    assert records[0]["image_sha256"].startswith("etag:") and ";size:" in records[0]["image_sha256"]
    assert records[1]["image"] == url

    # Incremental: nothing changed in the bucket, nothing is tiled again.
    sets = ["tile.size=16", "tile.stride=16", "tile.max_nodata=0.5", "tile.workers=1"]
    cmd = [str(BIN / "tilepipe"), "tile", "--scenes", str(remote / "scenes.json")]
    cmd += ["--out", str(remote / "tiles")]
    cmd += ["--params", str(ROOT / "params.yaml"), *(x for s in sets for x in ("--set", s))]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "0 of 3 scene(s) to tile, 3 up to date" in again.stdout, again.stdout


@pytest.mark.parametrize("mistake", ["missing object", "missing bucket", "no endpoint", "wrong credentials"])
def test_a_remote_scene_that_cannot_be_read_is_one_line(tmp_path, s3, mistake, monkeypatch):
    rows = scenes_with_geojson(tmp_path)[:1]
    bucket = upload(s3, tmp_path, [rows[0]["image"], rows[0]["labels"]])
    image = f"s3://{bucket}/imagery/s0.tif"
    if mistake == "missing object":
        image = f"s3://{bucket}/imagery/gone.tif"
    elif mistake == "missing bucket":
        image = "s3://no-such-bucket/imagery/s0.tif"
    elif mistake == "no endpoint":
        from tests.prefect_server import free_port

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    catalog = write_catalog(
        tmp_path, [{**rows[0], "image": image, "labels": f"s3://{bucket}/imagery/s0_labels.tif"}]
    )
    env = {"AWS_SECRET_ACCESS_KEY": "wrong-secret"} if mistake == "wrong credentials" else {}
    cmd = [str(BIN / "tilepipe"), "ingest", "--catalog", str(catalog), "--out", str(tmp_path / "scenes.json"),
           "--params", str(ROOT / "params.yaml")]  # fmt: skip
    import os

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **env})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    expected = {
        "missing object": f"s3://{bucket}/imagery/gone.tif: object not found",
        "missing bucket": "s3://no-such-bucket/imagery/s0.tif: bucket not found",
        "no endpoint": "does not answer",
        "wrong credentials": "access denied",
    }[mistake]
    assert expected in lines[0], lines[0]
    assert (
        "wrong-secret" not in result.stderr and s3.credentials["AWS_SECRET_ACCESS_KEY"] not in result.stderr
    )
    assert not (tmp_path / "scenes.json").exists()


def test_a_key_changed_in_the_environment_is_the_key_used(tmp_path, s3, monkeypatch):
    """boto3's default session keeps the first credentials it found: a process that met a wrong (or
    an old, rotated) key first must still use the environment's key of now."""
    from tilepipe.geo.remote import remote_stat

    rows = scenes_with_geojson(tmp_path)[:1]
    bucket = upload(s3, tmp_path, [rows[0]["image"]])
    uri = f"s3://{bucket}/imagery/s0.tif"
    with monkeypatch.context() as wrong:
        wrong.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(TilepipeError, match="access denied"):
            remote_stat(uri)
    assert remote_stat(uri).size == (tmp_path / "s0.tif").stat().st_size


def test_uris_in_messages_carry_no_credentials():
    from tilepipe.geo.remote import shown

    assert shown("https://user:pw@host:8443/a/b.tif?X-Amz-Signature=abc") == "https://host:8443/a/b.tif"
    with pytest.raises(TilepipeError, match="^https://127.0.0.1:9/x.tif: the server does not answer"):
        from tilepipe.geo.remote import remote_stat

        remote_stat("https://127.0.0.1:9/x.tif?token=secret")
