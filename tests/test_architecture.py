"""dvc.yaml against the code: every stage lists the modules it runs, and uses the wiring's paths.

The import-linter contracts and deptry run beside pytest in `make test` (`make lint`)."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import grimp
import pytest
import yaml

from tests.conftest import ROOT
from tilepipe import wiring


def stage_module_files(stage: str, graph: grimp.ImportGraph) -> set[str]:
    """Repository paths of the project modules ``tilepipe <stage>`` runs: the stage and all it imports."""
    module = f"tilepipe.stages.{stage}"
    modules = {module} | {m for m in graph.find_upstream_modules(module) if m.startswith("tilepipe")}
    files = set()
    for name in modules:
        origin = Path(importlib.util.find_spec(name).origin).resolve()
        if origin.name != "__init__.py" or origin.read_text().strip():
            files.add(origin.relative_to(ROOT).as_posix())
    return files


def covered(path: str, deps: list[str]) -> bool:
    """True when a dvc.yaml dep is the file or a folder holding it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def missing_code_deps(dvc_yaml: dict, graph: grimp.ImportGraph) -> dict[str, list[str]]:
    """Per stage, the project modules it imports that its ``deps`` do not list."""
    missing = {}
    for name, stage in dvc_yaml["stages"].items():
        words = shlex.split(stage["cmd"])
        assert words[:2] == ["tilepipe", name], f"stage {name}: cmd should start with `tilepipe {name}`"
        deps = [d for d in stage.get("deps", []) if isinstance(d, str)]
        lacking = sorted(f for f in stage_module_files(name, graph) if not covered(f, deps))
        if lacking:
            missing[name] = lacking
    return missing


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("tilepipe", cache_dir=None)


def test_every_stage_lists_the_code_it_runs(graph):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert missing_code_deps(dvc_yaml, graph) == {}, "add these to the stage's deps in dvc.yaml"


def test_a_dropped_code_dep_is_caught(graph):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc_yaml["stages"]["train"]["deps"].remove("tilepipe/ml/loops.py")
    assert missing_code_deps(dvc_yaml, graph) == {"train": ["tilepipe/ml/loops.py"]}


def test_stages_and_paths_are_the_wiring(graph):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert tuple(dvc_yaml["stages"]) == wiring.STAGES
    known = {str(value) for value in vars(wiring).values() if isinstance(value, Path)}
    for name, stage in dvc_yaml["stages"].items():
        words = shlex.split(stage["cmd"])
        paths = {value for flag, value in zip(words, words[1:], strict=False) if flag.startswith("--")}
        unknown = sorted(p for p in paths if not covered(p, sorted(known)))
        assert not unknown, f"stage {name}: {unknown} not in tilepipe/wiring.py"
    stage_modules = {m.rsplit(".", 1)[1] for m in graph.find_children("tilepipe.stages")}
    assert stage_modules == {*wiring.STAGES, "study", "cv", "map"}


def test_every_library_module_is_under_the_layering_contract(graph):
    """A new top-level module of tilepipe must be named in the contract that keeps the library low."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    library = next(c for c in contracts if c["name"].startswith("The library imports no stage"))
    entry_points = {"tilepipe.cli", "tilepipe.cli_args", "tilepipe.__main__"}
    entry_points |= {"tilepipe.stages", "tilepipe.flows"}
    assert graph.find_children("tilepipe") - entry_points == set(library["source_modules"])
