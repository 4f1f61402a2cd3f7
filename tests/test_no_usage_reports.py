"""Nothing outside the project: the tools tilepipe runs write no ids under ~ and send no usage reports.

ONNX Runtime (the map engine) writes a device id under ~/.cache/Microsoft and MLflow an installation
id under ~/.config/mlflow unless told not to; DVC writes ~/.config/iterative for its analytics.
Real processes with HOME (and the XDG folders) pointed at an empty folder must leave it empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.test_map import make_archive, make_model

BIN = Path(sys.executable).parent
ANALYTICS = ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "ORT_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS")


def clean_env(home: Path) -> dict[str, str]:
    """This environment with an empty HOME and none of the switches set: tilepipe must set them."""
    env = {k: v for k, v in os.environ.items() if k not in ANALYTICS and not k.startswith("XDG_")}
    return {**env, "HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home.parent / 'mlflow.db'}"}


def test_a_map_run_logged_to_mlflow_writes_nothing_under_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    catalog = make_archive(tmp_path / "archive", n=1)
    model = make_model(tmp_path / "model.pt")
    cmd = [str(BIN / "tilepipe"), "map", str(catalog), "--model", str(model), "--out", str(tmp_path / "maps"),
           "--params", str(ROOT / "params.yaml"), "--set", "train.threads=1"]  # fmt: skip
    done = subprocess.run(cmd, env=clean_env(home), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "1 mapped (s0)" in done.stdout
    item = (tmp_path / "maps" / "s0" / "s0.json").read_text()
    assert '"tilepipe:engine": "onnxruntime"' in item  # ONNX Runtime did run
    assert (home.parent / "mlflow.db").is_file()  # and so did MLflow
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []


def test_dvc_in_the_project_writes_nothing_under_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    done = subprocess.run([str(BIN / "dvc"), "config", "--list"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
