"""The DVC remote in an S3 bucket (dvc-s3) of the services stack: push from one clone, pull into a
second where `dvc repro` has nothing to do, and a tile shard deleted in the bucket is reported."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import dvc_project
from tests.test_dvc_pipeline import TINY
from tests.test_services import _s3

pytestmark = pytest.mark.xdist_group("services")
BUCKET, PREFIX = "tilepipe-dvc", "test-remote"


def _run(args, cwd, env, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _shard_object(repo: Path) -> tuple[str, str, str]:
    """A tile shard of data/tiles (not an index), its object key in the remote, and data/tiles' .dir key."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dir_md5 = next(o["md5"] for o in lock["stages"]["tile"]["outs"] if o["path"] == "data/tiles")
    manifest = repo / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    entries = json.loads(manifest.read_text())
    shard = next(e for e in entries if not e["relpath"].endswith(".json"))
    key = f"{PREFIX}/files/md5/{shard['md5'][:2]}/{shard['md5'][2:]}"
    return shard["relpath"], key, f"{PREFIX}/files/md5/{dir_md5[:2]}/{dir_md5[2:]}"


def test_push_to_the_bucket_pull_into_a_clone_and_a_deleted_shard_is_reported(services, tmp_path):
    repo, env = dvc_project(tmp_path, TINY)
    env = {**env, **services.env}
    env.pop("MLFLOW_TRACKING_URI")  # the pipeline's runs go to the project's SQLite store here
    git = ["git", "-c", "init.defaultBranch=main"]
    # as docs/team-setup.md says: the bucket in the committed config, the endpoint of an
    # S3-compatible store in the clone's own config (or AWS_ENDPOINT_URL, as the stack exports)
    _run(["dvc", "remote", "add", "-d", "bucket", f"s3://{BUCKET}/{PREFIX}"], repo, env)
    endpoint = ["dvc", "remote", "modify", "--local", "bucket", "endpointurl", env["AWS_ENDPOINT_URL"]]
    _run(endpoint, repo, env)
    _run(["dvc", "repro"], repo, env)
    _run(["dvc", "push"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "pipeline run, remote in a bucket"], repo, env)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    _run(["dvc", "pull"], clone, env)  # the endpoint from AWS_ENDPOINT_URL alone
    second = _run(["dvc", "repro"], clone, env)
    assert "Running stage" not in second.stdout, second.stdout
    status = _run(["dvc", "status"], clone, env)
    assert "up to date" in status.stdout, status.stdout
    assert "are in sync" in _run(["dvc", "status", "-c"], clone, env).stdout

    relpath, key, dir_key = _shard_object(repo)
    _s3(services).delete_object(Bucket=BUCKET, Key=key)
    third = tmp_path / "third"
    _run(["git", "clone", "-q", str(repo), str(third)], tmp_path, env)
    pull = _run(["dvc", "pull"], third, env, check=False)  # a fresh clone: reported, exit 1
    assert pull.returncode == 1, pull.stdout + pull.stderr
    assert "The specified key does not exist" in pull.stderr, pull.stderr
    assert "files failed to download" in pull.stderr, pull.stderr  # 2 if another file has its bytes
    assert not (third / "data" / "tiles" / relpath).exists()
    cloud = _run(["dvc", "status", "-c"], third, env)
    assert f"deleted:            data/tiles/{relpath}" in cloud.stdout, cloud.stdout

    # The clone that pushed holds the shard: DVC takes a directory whose .dir object is in the bucket
    # as whole there, so its `dvc status -c` and `dvc push` see nothing to do. Without the .dir
    # object, both see the missing shard and the push repairs the bucket (docs/team-setup.md).
    assert "are in sync" in _run(["dvc", "status", "-c"], repo, env).stdout
    _s3(services).delete_object(Bucket=BUCKET, Key=dir_key)
    cloud = _run(["dvc", "status", "-c"], repo, env)
    assert f"new:                data/tiles/{relpath}" in cloud.stdout, cloud.stdout
    _run(["dvc", "push"], repo, env)
    _run(["dvc", "pull"], third, env)
    shard = Path("data") / "tiles" / relpath
    assert (third / shard).read_bytes() == (repo / shard).read_bytes()


def test_end_to_end_on_the_stack(services, tmp_path):
    """Scenes in the bucket, `dvc repro` with the tiles pushed to the bucket remote, the MLflow run on
    the server with its artifacts in the bucket, `tilepipe predict` with the server's champion."""
    import csv
    import os

    from mlflow import MlflowClient

    repo, env = dvc_project(tmp_path, TINY)
    env = {**env, **services.env}  # the tracking server, the S3 endpoint and its credentials
    _run(["dvc", "repro", "synthesize"], repo, env)
    s3 = _s3(services)
    scenes, prefix = repo / "data" / "synthetic", f"e2e-{tmp_path.name}"
    with open(scenes / "catalog.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for column in ("image", "labels"):
            s3.upload_file(str(scenes / row[column]), "tilepipe-scenes", f"{prefix}/{row[column]}")
            row[column] = f"s3://tilepipe-scenes/{prefix}/{row[column]}"
    (repo / "data" / "remote").mkdir()
    with open(repo / "data" / "remote" / "catalog.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(catalog="data/remote/catalog.csv", imagery="data/remote")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "remote", "add", "-d", "bucket", f"s3://{BUCKET}/{prefix}"], repo, env)
    _run(["dvc", "repro"], repo, env)
    _run(["dvc", "push"], repo, env)

    # The tiles are those of the same scenes read from local disk (the index's fingerprint aside).
    local_scenes = tmp_path / "local-scenes.json"
    _run(
        ["tilepipe", "ingest", "--catalog", str(scenes / "catalog.csv"), "--out", str(local_scenes)],
        repo,
        env,
    )
    _run(
        ["tilepipe", "tile", "--scenes", str(local_scenes), "--out", str(tmp_path / "local-tiles")], repo, env
    )
    remote_tiles = repo / "data" / "tiles"
    for path in sorted((tmp_path / "local-tiles").rglob("*.npy")):
        assert path.read_bytes() == (remote_tiles / path.relative_to(tmp_path / "local-tiles")).read_bytes()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/files/md5/")["Contents"]]
    assert len(keys) > 10  # tiles, model and the rest in the bucket remote

    old = {k: os.environ.get(k) for k in services.env}
    os.environ.update(services.env)
    try:
        client = MlflowClient(tracking_uri=services.env["MLFLOW_TRACKING_URI"])  # not one set earlier here
        name = params["track"]["model_name"]
        champion = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(champion.run_id)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:") or run.info.artifact_uri.startswith(
            "s3://"
        )
        stored = s3.list_objects_v2(Bucket="tilepipe-mlflow")["KeyCount"]
        assert stored > 0 and run.data.metrics["val_macro_f1"] >= 0
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    scene = rows[0]["image"]  # a scene in the bucket, mapped from there
    out = tmp_path / "map.tif"
    _run(["tilepipe", "predict", str(scene), str(out), "--model", f"models:/{name}@champion"], repo, env)
    assert out.is_file() and out.with_suffix(".json").is_file()  # the map and its STAC item
