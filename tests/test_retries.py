"""Which failures the flow retries: real errors of each kind, classified by the library, retried by the flow.

Every error here is made for real: a read-only bind mount, a full 64 kB tmpfs, an immutable (or
mode 0555) folder, a missing file, a GeoTIFF cut short, an EIO from the kernel, a port nobody
listens on, a server that never answers, and a real HTTP server in front of the S3 server that
answers 429 SlowDown or 500 (tests/throttle_proxy.py). The mounts need root (CAP_SYS_ADMIN);
without it those cases are skipped, saying so.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import rasterio
from prefect import flow

from tests.conftest import cut_pixel_data, tiny_params, write_catalog, write_scene
from tests.prefect_server import free_port
from tests.test_flows import flow_run_id, state_names, task_runs
from tests.throttle_proxy import ThrottlingProxy
from tilepipe.flows.fanout import run_each
from tilepipe.flows.pipeline import tile_task
from tilepipe.geo.raster_io import gdal_env
from tilepipe.geo.read_errors import NOT_RETRIED, RETRIED, failure_kind, is_retryable
from tilepipe.geo.remote import remote_stat
from tilepipe.geo.scenes import SceneRecord, read_scene_records
from tilepipe.params import load_params
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile_one

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
BUCKET = "retries"


@dataclasses.dataclass
class Ctx:
    """What a case needs: a scratch folder, an ingested local scene, its params, the S3 setup."""

    tmp: Path
    scene: SceneRecord
    params: object
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path

    def remote(self, refuse: int = 0, status: int = 429) -> ThrottlingProxy:
        """The S3 server behind the throttling proxy (the AWS variables point at the proxy)."""
        proxy = self.request.getfixturevalue("s3_proxy")
        proxy.throttle(refuse, status)
        self.monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        self.monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")  # GDAL's own retries would hide the answer
        return proxy

    def remote_scene(self) -> SceneRecord:
        """This scene with its image in the bucket under a fresh key (nothing of it cached by GDAL)."""
        self.request.getfixturevalue("s3_proxy")  # the bucket
        s3 = self.request.getfixturevalue("s3")
        key = f"{uuid.uuid4().hex[:8]}.tif"
        s3.client().upload_file(self.scene.image, BUCKET, key)
        return dataclasses.replace(self.scene, image=f"s3://{BUCKET}/{key}")


def caught(action: Callable[[], object]) -> BaseException:
    """The exception ``action`` raises."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the point
        return exc
    pytest.fail("no error was raised")


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """``mount <args> <target>`` for the block, or skip the test saying why it cannot mount."""
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """The folder bind-mounted read-only over itself: writes fail with EROFS, root's too."""
    with mounted(folder, "--bind", "-o", "ro", str(folder)):
        yield folder


@contextmanager
def full_disk(folder: Path) -> Iterator[Path]:
    """A 64 kB tmpfs on the folder: a scene's tiles do not fit (ENOSPC)."""
    with mounted(folder, "-t", "tmpfs", "-o", "size=64k", "tmpfs"):
        yield folder


@contextmanager
def forbidden(folder: Path) -> Iterator[Path]:
    """A folder this process may not write: mode 0555, or immutable (chattr +i) for root."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"root ignores modes and chattr +i fails here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def silent_server() -> socket.socket:
    """A socket that accepts connections (the kernel does) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


# ------------------------------------------------------------------------ each case: (make, kind)


def tile_into(ctx: Ctx, place: Callable[[Path], object]) -> BaseException:
    """The scene tiled into a folder prepared by ``place`` (a context manager)."""
    with place(ctx.folder("out")) as out:
        return caught(lambda: tile_one(ctx.scene, ctx.params, out))


def missing_image(ctx: Ctx) -> BaseException:
    Path(ctx.scene.image).unlink()  # gone between ingest and tiling
    return caught(lambda: tile_one(ctx.scene, ctx.params, ctx.tmp / "tiles"))


def damaged_pixels(ctx: Ctx, through_tilepipe: bool) -> BaseException:
    cut_pixel_data(Path(ctx.scene.image))
    if through_tilepipe:
        return caught(lambda: tile_one(ctx.scene, ctx.params, ctx.tmp / "tiles"))
    with rasterio.open(ctx.scene.image) as src:
        return caught(src.read)


def kernel_eio(ctx: Ctx) -> BaseException:
    fd = os.open("/proc/self/mem", os.O_RDONLY)  # page 0 is never mapped: the kernel says EIO
    try:
        return caught(lambda: os.pread(fd, 1, 0))
    finally:
        os.close(fd)


def refused(ctx: Ctx, how: str) -> BaseException:
    port = free_port()  # nothing listens there
    if how == "socket":
        return caught(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    ctx.remote()
    ctx.monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    if how == "gdal":
        with gdal_env():
            return caught(lambda: rasterio.open(f"s3://{BUCKET}/none.tif"))
    return caught(lambda: tile_one(ctx.remote_scene(), ctx.params, ctx.tmp / "tiles"))


def timed_out(ctx: Ctx, how: str) -> BaseException:
    with closing(silent_server()) as server:
        address = server.getsockname()
        if how == "socket":
            with socket.create_connection(address, timeout=5) as conn:
                conn.settimeout(0.5)
                return caught(lambda: conn.recv(1))
        ctx.remote()
        ctx.monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{address[0]}:{address[1]}")
        ctx.monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "1")
        with gdal_env():
            return caught(lambda: rasterio.open(f"s3://{BUCKET}/none.tif"))


def busy_store(ctx: Ctx, status: int, how: str) -> BaseException:
    if how == "gdal":  # the store's answer as GDAL reports it
        ctx.remote(refuse=1, status=status)
        with gdal_env():
            return caught(lambda: rasterio.open(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.tif"))
    if how == "stat":  # boto3's HEAD, its own retries spent on the throttling
        ctx.remote(refuse=100, status=status)
        return caught(lambda: remote_stat(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}.tif"))
    scene = ctx.remote_scene()  # the tile task: the first request throttled, the store answers after
    ctx.remote(refuse=1, status=status)
    return caught(lambda: tile_one(scene, ctx.params, ctx.tmp / "tiles"))


def missing_object(ctx: Ctx) -> BaseException:
    ctx.remote()
    return caught(lambda: remote_stat(f"s3://{BUCKET}/never-written.tif"))


CASES = {
    # retried
    "connection-refused": (lambda c: refused(c, "socket"), "connection"),
    "connection-refused-gdal": (lambda c: refused(c, "gdal"), "connection"),
    "connection-refused-tile": (lambda c: refused(c, "tile"), "store-unavailable"),
    "timeout": (lambda c: timed_out(c, "socket"), "timeout"),
    "timeout-gdal": (lambda c: timed_out(c, "gdal"), "timeout"),
    "429-gdal": (lambda c: busy_store(c, 429, "gdal"), "throttled"),
    "429-store": (lambda c: busy_store(c, 429, "stat"), "store-unavailable"),
    "429-tile": (lambda c: busy_store(c, 429, "tile"), "store-unavailable"),
    "500-gdal": (lambda c: busy_store(c, 500, "gdal"), "server-error"),
    "503-tile": (lambda c: busy_store(c, 503, "tile"), "store-unavailable"),
    "eio": (kernel_eio, "io-error"),
    # not retried
    "read-only-folder": (lambda c: tile_into(c, read_only), "read-only"),
    "permission-denied": (lambda c: tile_into(c, forbidden), "permission-denied"),
    "no-space-left": (lambda c: tile_into(c, full_disk), "no-space"),
    "missing-image": (missing_image, "bad-input"),
    "missing-file-gdal": (lambda c: caught(lambda: rasterio.open(c.tmp / "gone.tif")), "not-found"),
    "missing-object": (missing_object, "bad-input"),
    "damaged-pixels": (lambda c: damaged_pixels(c, True), "bad-input"),
    "damaged-pixels-gdal": (lambda c: damaged_pixels(c, False), "damaged-data"),
    "bad-params": (lambda c: caught(lambda: load_params(PARAMS, ["tile.size=-3"])), "bad-input"),
    "bug": (lambda c: caught(lambda: tile_one(c.scene, c.params, None)), "bug"),
}


@pytest.fixture(scope="module")
def s3_proxy(s3) -> Iterator[ThrottlingProxy]:
    """The throttling proxy in front of the session's S3 server, with the bucket of these tests."""
    s3.client().create_bucket(Bucket=BUCKET)
    with ThrottlingProxy(s3.endpoint) as proxy:
        yield proxy


@pytest.fixture
def ctx(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    """A 256 x 256 px scene ingested under tmp_path (its tiles need about 200 kB)."""
    write_scene(tmp_path, "s0", size=(256, 256))
    catalog = write_catalog(tmp_path, [{"scene_id": "s0", "image": "s0.tif", "labels": "s0_labels.tif"}])
    params = tiny_params(tmp_path, "tile.size=32", "tile.stride=32")
    ingest(params, catalog, tmp_path / "scenes.json")
    return Ctx(tmp_path, read_scene_records(tmp_path / "scenes.json")[0], params, request, monkeypatch)


@pytest.mark.xdist_group("s3")
@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_of_real_failure_is_classified(ctx: Ctx, case: str):
    make, kind = CASES[case]
    exc = make(ctx)
    assert failure_kind(exc) == kind, f"{type(exc).__name__}: {exc}"
    assert is_retryable(exc) == (kind in RETRIED)
    assert kind in RETRIED + NOT_RETRIED
    if kind in ("read-only", "no-space", "permission-denied"):
        assert exc.errno in (errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM)


def test_every_kind_is_in_the_docs_table():
    doc = (ROOT / "docs" / "orchestration.md").read_text()
    for kind in RETRIED + NOT_RETRIED:
        assert f"| `{kind}` |" in doc, kind


# --------------------------------------------------------------- the flow's tile task, retried or not


@flow(name="tile-scenes")
def tile_flow(scenes: list[SceneRecord], params, out_dir: Path) -> list:
    """The pipeline's tile task, one run per scene, with its retry condition."""
    calls = [(f"tile-{s.scene_id}", {"scene": s, "params": params, "out_dir": out_dir}) for s in scenes]
    return run_each(tile_task, calls, 1)


@pytest.mark.xdist_group("prefect")
@pytest.mark.usefixtures("prefect_api")
def test_the_flow_retries_a_throttled_read(ctx: Ctx, monkeypatch):
    scene = dataclasses.replace(ctx.remote_scene(), scene_id="throttled")
    proxy = ctx.remote(refuse=1, status=429)  # the first request: 429 SlowDown; then the store answers
    monkeypatch.chdir(ctx.tmp)
    state = tile_flow([scene], ctx.params, ctx.tmp / "data" / "tiles", return_state=True)
    assert state.is_completed(), state
    assert proxy.refused == 1
    run = task_runs(flow_run_id(state))["tile-throttled"]
    # GDAL may answer the first retry from its record of the 429 (measured: 1 or 2 retries)
    assert run.run_count in (2, 3) and state_names(run).count("AwaitingRetry") == run.run_count - 1
    assert (ctx.tmp / "data" / "tiles" / "throttled" / "index.json").is_file()


@pytest.mark.xdist_group("prefect")
@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("place", [read_only, full_disk], ids=["read-only-folder", "no-space-left"])
def test_the_flow_does_not_retry_a_full_or_read_only_disk(ctx: Ctx, monkeypatch, place):
    monkeypatch.chdir(ctx.tmp)
    with place(ctx.folder("out")) as out:
        state = tile_flow([ctx.scene], ctx.params, out, return_state=True)
    assert state.is_failed()
    with pytest.raises(OSError) as raised:
        state.result()
    assert raised.value.errno in (errno.EROFS, errno.ENOSPC)
    run = task_runs(flow_run_id(state))["tile-s0"]
    assert run.run_count == 1 and "AwaitingRetry" not in state_names(run)
