"""The docs' benchmark figures are the committed results files': made by benchmarks/report.py, checked."""

import json
import re
import subprocess
import sys

import pytest

from benchmarks.common import save
from benchmarks.report import (
    BLOCK,
    DOCS,
    RESULTS_DIR,
    FiguresError,
    check,
    entry_table,
    machine_id,
    render,
    results_path,
    verdict,
)
from tests.conftest import ROOT

MACHINE = {
    "id": "amd-epyc-f25m17-2c-24g", "cpu_model": "AMD EPYC", "cpu_family_model": "25/17", "cores": 2,
    "memory_gib": 23.5, "torch": "2.13.0+cpu", "gdal": "3.9.3",
}  # fmt: skip


def results(**entry) -> dict:
    stamp = {"ran_at": "2026-12-07T08:00:00", "commit": "abc", "load_before": {"load_1m": 0.2}}
    return {"machine": MACHINE, "dask": {**stamp, **entry}}


def test_every_doc_shows_the_committed_results_files():
    blocks = 0
    for doc in DOCS:
        check(doc)
        blocks += len(BLOCK.findall(doc.read_text()))
    assert blocks >= 3, "the docs quote the committed results through figures blocks"
    assert sorted(p.name for p in RESULTS_DIR.glob("*.json")), "a reference machine's results are committed"


def test_one_changed_figure_in_a_doc_is_caught(tmp_path):
    doc = DOCS[0]
    text = doc.read_text()
    row = r"\| `[a-z0-9_]+` \| (-?[0-9]+\.[0-9]+) \|"
    number = next((m for b in BLOCK.finditer(text) if (m := re.search(row, b[0]))), None)
    assert number, "a figures block with a decimal figure"
    shown = number.group(0)
    tampered = tmp_path / doc.name
    tampered.write_text(text.replace(shown, shown.replace(number.group(1), number.group(1) + "1"), 1))
    with pytest.raises(FiguresError, match="figures differ from benchmarks/results"):
        check(tampered)


def test_a_verdict_is_computed_from_the_value_never_typed():
    assert verdict(4.8, ">= 5") == "misses"
    assert verdict(5.9, ">= 5") == "holds"
    assert verdict(0.00002, "<= 0.0001") == "holds"
    assert verdict("eager", ">= 1") == ""
    table = entry_table(results(grid_ratio=4.8, targets={"grid_ratio": ">= 5"}), "dask")
    assert "| `grid_ratio` | 4.8 | >= 5: **misses** |" in table


def test_the_caption_says_when_other_work_was_running():
    quiet = entry_table(results(x=1.0), "dask")
    busy_results = results(x=1.0)
    busy_results["dask"]["load_before"] = {"load_1m": 7.5}
    busy = entry_table(busy_results, "dask")
    assert "quiet" in quiet and "other work was running" not in quiet
    assert "**other work was running**" in busy and MACHINE["id"] in busy


def test_a_block_is_replaced_whole_and_picks_its_keys(tmp_path):
    save(results(a=1.5, b=2, c=3.25, runs_s={"x": [1]}), tmp_path / f"{MACHINE['id']}.json")
    text = f"intro\n<!-- figures {MACHINE['id']} dask c a -->\nold\n<!-- /figures -->\noutro\n"
    out = render(text, tmp_path)
    assert out.startswith("intro\n<!-- figures") and out.endswith("<!-- /figures -->\noutro\n")
    assert out.index("`c`") < out.index("`a`") and "`b`" not in out and "runs_s" not in out
    with pytest.raises(FiguresError, match="has no \\['nope'\\]"):
        render(text.replace("dask c a", "dask nope"), tmp_path)
    with pytest.raises(FiguresError, match="no results for machine 'elsewhere'"):
        render(text.replace(MACHINE["id"], "elsewhere"), tmp_path)


def test_another_machine_writes_beside_the_reference_not_over_it(tmp_path):
    reference = tmp_path / f"{MACHINE['id']}.json"
    save(results(a=1.0), reference)
    before = reference.read_bytes()
    xeon = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    other = {**MACHINE, "cpu_model": xeon, "cpu_family_model": "6/106"}
    other["id"] = machine_id(other)
    assert other["id"] == "intel-r-xeon-r-platinum-8375c-cpu-2-90ghz-f6m106-2c-24g"
    path = results_path(other, tmp_path)
    save({"machine": other, "dask": {"a": 2.0}}, path)
    assert path != reference and reference.read_bytes() == before
    assert json.loads(path.read_text())["dask"] == {"a": 2.0}


def test_report_check_runs_as_a_command():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
