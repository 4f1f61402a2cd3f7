"""`tilepipe map` through the stack's credentials: scenes in its bucket, maps into it; a wrong key refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from tests.conftest import ROOT
from tests.services_stack import command_env
from tests.test_map import make_archive, make_model

pytestmark = pytest.mark.xdist_group("services")
BUCKET = "tilepipe-scenes"


def _tilepipe(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "tilepipe"), *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_map_reads_and_writes_the_bucket_with_the_exported_credentials(tmp_path, services):
    env = command_env(services)
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    folder = tmp_path / "archive"
    make_archive(folder, n=2)
    for i in range(2):
        client.upload_file(str(folder / f"s{i}.tif"), BUCKET, f"map-test/scenes/s{i}.tif")
    model = make_model(tmp_path / "model.pt")
    args = ["map", f"s3://{BUCKET}/map-test/scenes/", "--model", str(model),
            "--params", str(ROOT / "params.yaml"), "--out", f"s3://{BUCKET}/map-test/maps/"]  # fmt: skip

    done = _tilepipe(args, env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="map-test/maps/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    assert keys == [f"map-test/maps/{name}" for name in (
        "collection.json", "s0/s0.json", "s0/s0.tif", "s1/s1.json", "s1/s1.tif", "summary.csv")]  # fmt: skip

    secret = env["AWS_SECRET_ACCESS_KEY"]
    wrong = _tilepipe(args, {**env, "AWS_SECRET_ACCESS_KEY": "not-" + secret}, tmp_path)
    assert wrong.returncode != 0
    assert "Traceback" not in wrong.stderr
    assert secret not in wrong.stdout + wrong.stderr + done.stdout + done.stderr
