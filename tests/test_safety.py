"""Safety audit of the source tree: no unsafe deserialisation, no shell, servers bound to 127.0.0.1.

The checks walk the syntax tree of every Python source (not the text), so strings and comments
that mention a pattern are not flagged, and a call split over lines is still found.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

from tests.conftest import NOT_SOURCES, ROOT
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
