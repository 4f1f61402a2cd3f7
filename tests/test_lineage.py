"""The git_dirty tag: code and params count, outputs dvc repro is rewriting do not."""

import json
import subprocess

from tilepipe.tracking.runs import lineage_tags


def _git(repo, *args):
    names = {"GIT_AUTHOR_NAME": "t", "GIT_COMMITTER_NAME": "t", "PATH": "/usr/bin:/bin"}
    env = {**names, "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def test_git_dirty_ignores_pipeline_outputs_but_not_code(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: tilepipe train\n    outs:\n      - models/model.pt\n"
        "      - models/history.csv:\n          cache: false\n"
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "history.csv").write_text("epoch\n1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "params.yaml").write_text("seed: 42\n")
    (tmp_path / "split.json").write_text(json.dumps({"members": {"train": {}, "val": {}, "test": {}}}))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "reference run")
    monkeypatch.chdir(tmp_path)
    assert lineage_tags(tmp_path / "split.json")["git_dirty"] == "False"

    (tmp_path / "models" / "history.csv").unlink()  # dvc repro removes a stage's outputs first
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # and rewrites the lock
    assert lineage_tags(tmp_path / "split.json")["git_dirty"] == "False"

    (tmp_path / "params.yaml").write_text("seed: 43\n")  # what was run is not what is committed
    assert lineage_tags(tmp_path / "split.json")["git_dirty"] == "True"
