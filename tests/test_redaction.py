"""One redaction for every URI tilepipe shows: user info, passwords, tokens and query strings go, the
host (IPv6 in brackets), port and path stay; a malformed scene URI is one line, not a traceback."""

from __future__ import annotations

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
