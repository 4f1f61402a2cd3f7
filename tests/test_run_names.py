"""MLflow run names a person can compare: the DVC experiment's name, else model, width and params hash."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, dvc_project
from tests.test_dvc_pipeline import TINY
from tilepipe.params import load_params
from tilepipe.tracking.runs import params_hash, training_run


def _run_of(params, split, **kwargs):
    with training_run(params, split, **kwargs) as run:
        run_id = run.info.run_id
    return MlflowClient().get_run(run_id)


def test_run_names_say_what_ran_and_point_at_the_dvc_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"members": {"train": {"a": None}, "val": {}, "test": {}}}))
    params = load_params(ROOT / "params.yaml")
    wider = load_params(ROOT / "params.yaml", ["train.width=64"])
    other_lr = load_params(ROOT / "params.yaml", ["train.lr=0.5"])

    plain = _run_of(params, split)
    digest = params_hash(params)
    assert plain.info.run_name == f"{params.train.model}-w{params.train.width}-{digest}"
    assert len(digest) == 8 and int(digest, 16) >= 0
    assert not any(tag.startswith("dvc_exp") for tag in plain.data.tags)
    assert _run_of(wider, split).info.run_name == f"{params.train.model}-w64-{params_hash(wider)}"
    assert params_hash(load_params(ROOT / "params.yaml")) == digest  # stable for the same params
    assert len({digest, params_hash(wider), params_hash(other_lr)}) == 3

    monkeypatch.setenv("DVC_EXP_NAME", "lofty-lamb")  # as `dvc exp run` exports to its stages
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    exp = _run_of(params, split)
    assert exp.info.run_name == "lofty-lamb"
    assert exp.data.tags["dvc_exp_name"] == "lofty-lamb" and exp.data.tags["dvc_exp_baseline_rev"] == "f" * 40
    named = _run_of(params, split, name="study-x")  # an explicit name (the study's) is kept, tags added
    assert named.info.run_name == "study-x" and named.data.tags["dvc_exp_name"] == "lofty-lamb"


@pytest.mark.xdist_group("dvc")
def test_a_dvc_experiment_and_its_mlflow_run_share_the_name(tmp_path):
    repo, env = dvc_project(tmp_path, TINY)
    env = {k: v for k, v in env.items() if not k.startswith("DVC_EXP_")}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True, text=True)
    exp_run = ["dvc", "exp", "run", "train", "--name", "tiny-lr", "-S", "train.lr=0.002"]
    result = subprocess.run(exp_run, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.run_name == "tiny-lr"
    assert run.data.tags["dvc_exp_name"] == "tiny-lr"
    assert run.data.tags["dvc_exp_baseline_rev"] == head.stdout.strip()
    assert run.data.params["train.lr"] == "0.002"
    show = subprocess.run(["dvc", "exp", "show", "--csv"], cwd=repo, env=env, capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(show.stdout)))
    assert any(row["Experiment"] == "tiny-lr" and row["train.lr"] == "0.002" for row in rows), show.stdout
