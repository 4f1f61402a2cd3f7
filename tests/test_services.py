"""`tilepipe services`: the stack comes up once, `up` again starts nothing, `down` stops exactly its
processes; train, evaluate, register and load from a fresh process through the MLflow server on
PostgreSQL and S3; two trainings at once; the server away for 10 s, and gone for good."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, TRAIN, tiny_overrides
from tests.services_stack import command_env, stack_env
from tilepipe import cli
from tilepipe.services import credentials, parts, postgres
from tilepipe.services import stack as services_stack
from tilepipe.services.procs import Proc, alive, start_time, stop

pytestmark = pytest.mark.xdist_group("services")
TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr")


def _sets(tmp_path: Path, name: str, *extra: str) -> list[str]:
    own = [f"track.experiment={name}", f"track.model_name={name}"]  # each test its own runs and model
    return [x for o in [*tiny_overrides(tmp_path), *TRAIN, *own, *extra] for x in ("--set", o)]


def _train_cmd(tmp_path: Path, name: str, out: str, *extra: str) -> list[str]:
    paths = ["--tiles", str(tmp_path / "tiles"), "--split", str(tmp_path / "split.json")]
    return [TILEPIPE, "train", "--params", str(ROOT / "params.yaml"), *_sets(tmp_path, name, *extra),
            *paths, "--out", str(tmp_path / out)]  # fmt: skip


def _env(services: services_stack.Stack, **extra: str) -> dict[str, str]:
    return command_env(services, **extra)


def _s3(services: services_stack.Stack):
    env = services.env
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def _epochs(client: MlflowClient, run_id: str, metric: str = "val_loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, metric)]


def test_up_again_starts_nothing_and_status_answers(services, capsys):
    before = services_stack.load(services.home).procs  # another test may have restarted a server
    assert cli.main(["services", "up", "--dir", str(services.home)]) == 0
    out = capsys.readouterr().out
    assert "already running, nothing started" in out
    assert services.note() in out.splitlines()[0]  # as root: PostgreSQL's own user, said first
    assert f"export MLFLOW_TRACKING_URI={services.env['MLFLOW_TRACKING_URI']}\n" in out
    assert services_stack.load(services.home).procs == before, "the same processes"
    assert cli.main(["services", "status", "--dir", str(services.home)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(services_stack.ORDER)
    assert all(line.endswith(" answers") for line in lines), lines
    s3 = _s3(services)
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} >= set(parts.BUCKETS)
    # Prefect's tables are in the stack's PostgreSQL (its server would not start without it)
    psql = [postgres.client("psql"), "-h", "127.0.0.1", "-p", str(services.ports.postgres), "-U", "prefect"]
    query = "SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'"
    env = {**os.environ, "PGPASSWORD": credentials.load(services.home).prefect_db}
    found = subprocess.run([*psql, "-d", "prefect", "-tAc", query], capture_output=True, text=True, env=env)
    assert found.stdout.strip() == "1"


def test_down_stops_only_the_recorded_process(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        proc = Proc("s3", sleeper.pid, start_time(sleeper.pid), 1, "http://x", str(tmp_path / "log"))
        impostor = dataclasses.replace(proc, started=str(int(proc.started) + 1))  # the pid, reused later
        ports = {"postgres": 1, "s3": 2, "mlflow": 3, "prefect": 4}
        state = {"ports": ports, "procs": {"s3": impostor.to_dict()}}
        (tmp_path / "state.json").write_text(json.dumps(state))
        assert services_stack.down(tmp_path) == [] and sleeper.poll() is None, "not ours: left alone"
        state["procs"]["s3"] = proc.to_dict()
        (tmp_path / "state.json").write_text(json.dumps(state))
        assert services_stack.down(tmp_path) == ["s3"]
        assert sleeper.wait(timeout=10) is not None and not alive(proc)
        assert not (tmp_path / "state.json").exists() and services_stack.status(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_trainings_at_once_then_evaluate_register_and_load_the_champion(services, prepared, monkeypatch):
    tmp_path, _ = prepared
    name = "svc-register"
    procs = [
        subprocess.Popen(_train_cmd(tmp_path, name, out), cwd=tmp_path, env=_env(services),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for out in ("a", "b")
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    runs = [json.loads((tmp_path / out / "run.json").read_text()) for out in ("a", "b")]
    assert runs[0]["run_id"] != runs[1]["run_id"]
    assert runs[0]["tracking_uri"] == services.env["MLFLOW_TRACKING_URI"]
    for key, value in services.env.items():  # the client logs in with the exported credentials
        monkeypatch.setenv(key, value)
    client = MlflowClient(services.env["MLFLOW_TRACKING_URI"])
    for run in runs:
        assert client.get_run(run["run_id"]).info.status == "FINISHED"
        for metric in EPOCH_METRICS:
            assert _epochs(client, run["run_id"], metric) == [1, 2, 3], metric
        assert {a.path for a in client.list_artifacts(run["run_id"])} >= {"training", "weights"}

    monkeypatch.chdir(tmp_path)
    evaluate = ["evaluate", "--params", str(ROOT / "params.yaml"), *_sets(tmp_path, name)]
    evaluate += ["--model-dir", str(tmp_path / "a"), "--tiles", str(tmp_path / "tiles")]
    evaluate += ["--split", str(tmp_path / "split.json"), "--out", str(tmp_path / "metrics")]
    assert cli.main(evaluate) == 0
    assert "test_macro_f1" in client.get_run(runs[0]["run_id"]).data.metrics
    assert client.get_model_version_by_alias(name, "champion").run_id == runs[0]["run_id"]
    # the artifacts went through the server into the bucket
    listed = _s3(services).list_objects_v2(Bucket="tilepipe-mlflow", Prefix="mlflow/")["Contents"]
    keys = [o["Key"] for o in listed]
    assert any(k.endswith("evaluation/metrics.json") for k in keys) and any("MLmodel" in k for k in keys)
    load = (
        "import mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        "print(model.predict(np.zeros((2, 3, 16, 16), np.float32)).shape)\n"
    )
    fresh = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=_env(services),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.strip().splitlines()[-1] == "(2, 5)"


EPOCHS = 8


def _start_training(tmp_path: Path, env: dict, name: str, out: str) -> subprocess.Popen:
    extra = (f"train.epochs={EPOCHS}", "train.early_stopping.patience=100")
    return subprocess.Popen(_train_cmd(tmp_path, name, out, *extra), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_first_epoch(proc: subprocess.Popen) -> None:
    """Return once the training printed its first epoch (its run is open, its model on disk)."""
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            return
    pytest.fail(f"training ended before its first epoch: {proc.wait()} {proc.stderr.read()[-3000:]}")


def _crash_mlflow(home: Path) -> None:
    proc = services_stack.load(home).procs["mlflow"]
    stop(dataclasses.replace(proc, stop_signal="SIGKILL"))  # a crash: no goodbye to the clients


def test_server_away_for_10_s_loses_no_epoch_and_gone_for_good_is_one_line(services, prepared):
    """Two trainings when the server crashes: one with MLflow's retries (backoff 1 s instead of 2, to
    keep the test short) outlives a 10 s outage; one allowed 2 retries gives up, model kept."""
    tmp_path, _ = prepared
    kept_env = _env(services, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    kept = _start_training(tmp_path, kept_env, "svc-kept", "kept")
    gone_env = _env(services, MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    gone = _start_training(tmp_path, gone_env, "svc-gone", "gone")
    _wait_first_epoch(kept)
    _wait_first_epoch(gone)
    _crash_mlflow(services.home)
    crashed = time.monotonic()
    try:
        _, err = gone.communicate(timeout=600)
        failed = time.monotonic() - crashed
        time.sleep(max(0.0, 10 - failed))
    finally:
        _, started = services_stack.up(services.home)
    back = time.monotonic()
    assert started == ["mlflow"], "only the missing server is started again, on its port"
    _, kept_err = kept.communicate(timeout=600)
    print(f"gave up {failed:.1f} s after the crash (2 retries, backoff 1); server back after "
          f"{back - crashed:.1f} s; the other training ended {time.monotonic() - back:.1f} s after that")

    assert gone.returncode == 1, err
    lines = [line for line in err.strip().splitlines() if " INFO mlflow" not in line]  # "Creating experiment"
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    uri = services.env["MLFLOW_TRACKING_URI"]
    assert lines[0].startswith(f"tilepipe train: error: MLflow tracking server {uri} stopped answering")
    assert "after 2 retries" in lines[0] and str(tmp_path / "gone") in lines[0]
    assert (tmp_path / "gone" / "model.pt").is_file()
    assert (tmp_path / "gone" / "checkpoints" / "last.pt").is_file()

    assert kept.returncode == 0, kept_err[-3000:]
    run_id = json.loads((tmp_path / "kept" / "run.json").read_text())["run_id"]
    with stack_env(services):
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        for metric in EPOCH_METRICS:
            assert _epochs(client, run_id, metric) == list(range(1, EPOCHS + 1)), metric


def test_study_parent_and_child_runs_on_the_server(services, tmp_path, monkeypatch):
    from tests.conftest import prepare_tiny_pipeline
    from tests.test_study import SPLITS, TINY, study_cli

    prepare_tiny_pipeline(tmp_path, *TINY, splits=tuple(SPLITS), size=(160, 160))
    monkeypatch.chdir(tmp_path)
    for key, value in services.env.items():
        monkeypatch.setenv(key, value)
    assert study_cli(tmp_path, "--sizes", "1", "--repeats", "1", extra=("track.experiment=svc-study",)) == 0
    client = MlflowClient(services.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("svc-study").experiment_id])
    parents = [r for r in runs if r.data.tags.get("study") == "scene-scaling"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(c.data.tags["study.kind"] for c in children) == ["scenes", "trap"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert _epochs(client, child.info.run_id) == [1, 2]
        assert "test_macro_f1" in child.data.metrics
    assert [m.step for m in client.get_metric_history(parents[0].info.run_id, "heldout_macro_f1")] == [1]
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")} == {
        "study/study.csv", "study/study.json", "study/study.png"
    }
