"""One redaction for every URI tilepipe shows: user info, passwords, tokens and query strings go, the
host (IPv6 in brackets), port and path stay; a malformed scene URI is one line, not a traceback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_catalog
from tilepipe.errors import TilepipeError, bad_file
from tilepipe.geo.remote import check_remote, remote_stat, shown
from tilepipe.redaction import redact, redact_text

BIN = Path(sys.executable).parent
CASES = {
    "https://user:pw@host:8443/a/b.tif?X-Amz-Signature=abc": "https://host:8443/a/b.tif",
    "postgresql+psycopg2://mlflow:s3cret@127.0.0.1:5432/mlflow": "postgresql+psycopg2://127.0.0.1:5432/mlflow",
    "postgresql://user:pa/ss@db.example.org/mlflow": "postgresql://db.example.org/mlflow",  # unescaped /
    "https://ghp_token@github.com/org/repo.git": "https://github.com/org/repo.git",
    "http://[::1]:9000/bucket/a.tif": "http://[::1]:9000/bucket/a.tif",
    "http://u:p@[2001:db8::7]:9000/a.tif?token=t#frag": "http://[2001:db8::7]:9000/a.tif",
    "sqlite:////tmp/mlflow.db?password=pw": "sqlite:////tmp/mlflow.db",
    "s3://bucket/key@v2.tif": "s3://bucket/key@v2.tif",  # an @ in a key is not user info
    "s3:///k.tif": "s3:///k.tif",
    "http://[::1/broken": "http://[::1/broken",
    "models:/tilepipe-landcover@champion": "models:/tilepipe-landcover@champion",
    "/data/scenes/a@b.tif": "/data/scenes/a@b.tif",
}


@pytest.mark.parametrize("uri", list(CASES))
def test_redact_keeps_where_and_drops_who(uri):
    assert redact(uri) == CASES[uri]
    assert shown(uri) == CASES[uri]  # geo.remote's old name: the same function


def test_redact_text_redacts_every_uri_in_a_message():
    text = "POST http://admin:hunter2@127.0.0.1:5000/api?x=1 failed; db postgresql://u:pw@h/db is down"
    assert redact_text(text) == "POST http://127.0.0.1:5000/api failed; db postgresql://h/db is down"
    assert "hunter2" not in str(bad_file("https://a:hunter2@h/x.tif", "bad"))


@pytest.mark.parametrize(
    "uri, said",
    [
        ("s3:///k.tif", r"^s3:///k.tif: not a valid s3:// URI \(no bucket\)$"),
        ("https:///x.tif", r"^https:///x.tif: not a valid https:// URI \(no host\)$"),
        ("http://[::1/x.tif", r"^http://\[::1/x.tif: not a valid URI \(Invalid IPv6 URL\)$"),
        ("http://u:pw@h:port/x.tif", r"^http://h:port/x.tif: not a valid URI \(Port could not be cast"),
    ],
)
def test_a_malformed_remote_uri_is_one_line(uri, said):
    with pytest.raises(TilepipeError, match=said):
        check_remote(uri)
    with pytest.raises(TilepipeError, match=said):
        remote_stat(uri)


def test_ingest_of_a_catalog_naming_a_malformed_uri_exits_1_in_one_line(tmp_path):
    catalog = write_catalog(tmp_path, [{"scene_id": "a", "image": "s3:///k.tif", "labels": "s3:///k.tif"}])
    cmd = [str(BIN / "tilepipe"), "ingest", "--params", str(ROOT / "params.yaml"), "--catalog", str(catalog),
           "--out", str(tmp_path / "scenes.json"), "--set", "ingest.on_error=fail"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "s3:///k.tif: not a valid s3:// URI (no bucket)" in lines[0]
    assert not (tmp_path / "scenes.json").exists()


def _api(url: str, auth: tuple[str, str], body: dict | None = None, get: bool = False) -> str:
    import httpx

    call = httpx.get if get else httpx.post
    kwargs = {} if get else {"json": body or {}}
    answer = call(url, auth=auth, trust_env=False, timeout=60, **kwargs)
    assert answer.status_code == 200, (url, answer.status_code, answer.text[:300])
    return answer.text


def _server_records(env: dict[str, str], login: tuple[str, str]) -> dict[str, str]:
    """The MLflow runs (tags, params), registered models and versions, and the Prefect flow runs,
    artifacts and logs, as the servers return them: raw JSON text."""
    mlflow, prefect = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]
    experiments = _api(f"{mlflow}/api/2.0/mlflow/experiments/search", login, {"max_results": 1000})
    ids = [e["experiment_id"] for e in json.loads(experiments).get("experiments", [])]
    user, password = env["PREFECT_API_AUTH_STRING"].split(":", 1)
    return {
        "mlflow runs": _api(f"{mlflow}/api/2.0/mlflow/runs/search", login, {"experiment_ids": ids}),
        "mlflow models": _api(f"{mlflow}/api/2.0/mlflow/registered-models/search", login, get=True),
        "mlflow versions": _api(f"{mlflow}/api/2.0/mlflow/model-versions/search", login, get=True),
        **{
            f"prefect {kind}": _api(f"{prefect}/{kind}/filter", (user, password), {"limit": 200})
            for kind in ("flow_runs", "task_runs", "artifacts", "logs")
        },
    }


@pytest.mark.slow  # the whole tiny pipeline as a Prefect flow on the stack
@pytest.mark.xdist_group("services")
def test_a_flow_with_a_credentialed_tracking_uri_shows_no_secret_anywhere(services, tmp_path):
    """The tracking URI carries the MLflow password (``http://admin:PASSWORD@host:port``, as a team's
    ``https://user:token@...`` would); the flow runs on the stack's Prefect (auth string), MLflow and S3
    servers. Nothing it prints, writes, logs, tags or publishes holds any of the stack's secrets."""
    from tests.conftest import dvc_project
    from tests.test_dvc_pipeline import TINY
    from tilepipe.services import credentials

    repo, env = dvc_project(tmp_path, TINY)
    stack = services.env
    secrets = list(dataclasses.asdict(credentials.load(services.home)).values())
    password = stack["MLFLOW_TRACKING_PASSWORD"]
    plain = stack["MLFLOW_TRACKING_URI"]
    uri = plain.replace("http://", f"http://admin:{password}@")
    env = {**env, **stack, "MLFLOW_TRACKING_URI": uri, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key)  # the URI alone logs in
    flow = subprocess.run([str(BIN / "tilepipe"), "flow"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip
    assert flow.returncode == 0, (flow.stdout + flow.stderr)[-4000:]

    run = json.loads((repo / "models" / "run.json").read_text())
    assert run["tracking_uri"] == plain  # where the run is, without the login
    shown = {"stdout": flow.stdout, "stderr": flow.stderr}
    skip = (".git", ".dvc/cache", ".dvc/tmp")
    for path in repo.rglob("*"):  # run.json, dvc.lock, predictions/, metrics/, data/, params.yaml...
        relative = path.relative_to(repo).as_posix()
        if path.is_file() and not relative.startswith(skip):
            shown[relative] = path.read_bytes().decode("latin-1")
    assert {"dvc.lock", "models/run.json", "predictions/catalog.json"} <= set(shown)
    records = _server_records(stack, ("admin", password))
    assert run["run_id"] in records["mlflow runs"] and "tilepipe-metrics" in records["prefect artifacts"]
    shown.update(records)
    leaks = [
        (where, line.replace(s, "<SECRET>")[:300])
        for where, text in shown.items()
        for s in secrets
        for line in text.splitlines()
        if s in line
    ]
    assert not leaks, leaks
