"""Safety audit of the source tree: no unsafe deserialisation, no shell, servers bound to 127.0.0.1.

The checks walk the syntax tree of every Python source (not the text), so strings and comments
that mention a pattern are not flagged, and a call split over lines is still found.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NOT_SOURCES, ROOT, tiny_overrides
from tilepipe.flows.settings import prefect_settings

SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}


def sources() -> dict[str, str]:
    """Every Python source git would see (tracked or not ignored), minus pipeline outputs."""
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return {
        n: (ROOT / n).read_text()
        for n in names
        if n.endswith(".py") and not n.startswith(NOT_SOURCES) and (ROOT / n).is_file()
    }


def _name(node: ast.expr) -> str:
    """Dotted name of a call's function: torch.load, yaml.load, subprocess.run, os.system."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _true(call: ast.Call, keyword: str) -> bool:
    return any(
        k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def violations(code: str) -> list[str]:
    """Forbidden calls in one module's source, as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if not isinstance(node, ast.Call):
            continue
        name, where = _name(node.func), f"{node.lineno}"
        if name.endswith("torch.load") and not _true(node, "weights_only"):
            found.append(f"{where}: torch.load without weights_only=True")
        if name in {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"}:
            found.append(f"{where}: {name} (use yaml.safe_load)")
        if name in {"pickle.load", "pickle.loads", "os.system", "os.popen", "eval", "exec"}:
            found.append(f"{where}: {name}")
        if _true(node, "shell"):
            found.append(f"{where}: shell=True")
        if _true(node, "allow_pickle"):
            found.append(f"{where}: allow_pickle=True")
        if name.split(".")[-1] in SUBPROCESS and name.startswith(("subprocess.", "sp.")) and node.args:
            if isinstance(node.args[0], ast.Constant | ast.JoinedStr | ast.BinOp):
                found.append(f"{where}: {name} with a command string (pass an argument list)")
    return found


def test_the_audit_catches_each_pattern():
    bad = "\n".join(
        [
            "torch.load(path)",
            "torch.load(path, weights_only=False)",
            "yaml.load(text)",
            "subprocess.run('ls', shell=True)",
            "subprocess.run(f'dvc {args}')",
            "os.system('rm x')",
            "np.load(path, allow_pickle=True)",
            "pickle.loads(blob)",
        ]
    )
    assert len(violations(bad)) == 9  # the shell=True string call counts twice
    ok = ["torch.load(p, map_location='cpu', weights_only=True)", "yaml.safe_load(t)", "model.eval()"]
    assert violations("\n".join([*ok, "subprocess.run(['dvc', 'status'])"])) == []


def test_no_unsafe_call_in_the_source_tree():
    files = sources()
    assert {"stages/train.py", "flows/pipeline.py", "tilepipe/ml/checkpoint.py"} <= set(files)
    found = [f"{name}:{v}" for name, code in files.items() for v in violations(code)]
    assert not found, "\n".join(found)


def test_servers_bind_127_0_0_1_by_default():
    makefile = (ROOT / "Makefile").read_text()
    ui = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert ui and "--host 127.0.0.1" in ui.group(1), "make ui must bind the MLflow UI to 127.0.0.1"
    serve = re.search(r"^serve:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert serve and "http://127.0.0.1:" in serve.group(1)
    assert "0.0.0.0" not in makefile  # noqa: S104 - the pattern searched for
    for name, code in sources().items():
        if name.startswith(("tilepipe/", "stages/", "flows/")):
            assert "0.0.0.0" not in code, name  # noqa: S104
    readme = (ROOT / "README.md").read_text()
    assert "prefect server start --host 127.0.0.1" in readme


@pytest.mark.skipif("PREFECT_SERVER_API_HOST" in os.environ, reason="the environment chooses the host")
def test_prefect_server_defaults_to_localhost():
    from prefect.settings import PREFECT_SERVER_API_HOST

    with prefect_settings():
        assert PREFECT_SERVER_API_HOST.value() == "127.0.0.1"


@pytest.mark.slow  # a training, its MLflow model, two `tilepipe predict` processes
def test_a_model_only_pickled_in_mlflow_is_loaded_with_trust_pickle_only(prepared, monkeypatch):
    """A run without its weights/model.pt (logged by an older tilepipe, or by anyone with write access to
    the server) has only the pickled MLflow model: `tilepipe predict` refuses to unpickle it, in one line,
    unless told --trust-pickle."""
    from mlflow import MlflowClient

    from tilepipe.stages.train import train

    tmp_path, params = prepared
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    train(params, tmp_path / "tiles", tmp_path / "split.json", tmp_path / "models")
    run_id = json.loads((tmp_path / "models" / "run.json").read_text())["run_id"]
    artifacts = MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")
    (Path(artifacts) / "weights" / "model.pt").unlink()
    with open(tmp_path / "catalog.csv", newline="") as fh:
        scene = tmp_path / next(csv.DictReader(fh))["image"]
    sets = [x for o in tiny_overrides(tmp_path) for x in ("--set", o)]
    predict = [str(Path(sys.executable).parent / "tilepipe"), "predict", str(scene), "map.tif",
               "--model", run_id, "--params", str(ROOT / "params.yaml"), *sets]  # fmt: skip

    refused = subprocess.run(predict, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert f"run {run_id} has no weights/model.pt, only a pickled MLflow model" in lines[0]
    assert lines[0].endswith("pass --trust-pickle to load it only if you trust that server")
    assert not (tmp_path / "map.tif").exists()

    trusted = subprocess.run([*predict, "--trust-pickle"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert (tmp_path / "map.tif").is_file() and (tmp_path / "map.json").is_file()
