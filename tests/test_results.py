"""The README's headline numbers are the committed run's: generated from metrics/*.json, checked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tilepipe.errors import TilepipeError
from tilepipe.results import (
    check_readme,
    read_json,
    readme_block,
    results_markdown,
    seed_summary,
    with_results,
)

BIN = Path(sys.executable).parent


def committed_table() -> str:
    seeds = ROOT / "metrics" / "seeds.json"
    metrics = read_json(ROOT / "metrics" / "metrics.json")
    return results_markdown(metrics, read_json(seeds) if seeds.is_file() else None)


def test_the_readme_shows_the_committed_metrics():
    check_readme((ROOT / "README.md").read_text(), committed_table())


def test_one_changed_number_in_the_readme_is_caught():
    readme = (ROOT / "README.md").read_text()
    block = readme_block(readme)
    metrics = read_json(ROOT / "metrics" / "metrics.json")
    shown = f"{metrics['macro_f1']:.4f}"
    assert shown in block
    tampered = readme.replace(shown, f"{metrics['macro_f1'] + 0.01:.4f}", 1)
    with pytest.raises(TilepipeError, match="differs from metrics/metrics.json"):
        check_readme(tampered, committed_table())


def test_the_table_is_replaced_whole_and_nothing_else():
    text = "intro\n<!-- results:begin -->\nold\n<!-- results:end -->\noutro\n"
    expected = "intro\n<!-- results:begin -->\n| new |\n<!-- results:end -->\noutro\n"
    assert with_results(text, "| new |\n") == expected
    with pytest.raises(TilepipeError, match="has no results block"):
        readme_block("no markers here")


def test_seed_summary_is_mean_min_max():
    runs = [{"accuracy": 0.5, "macro_f1": 0.4}, {"accuracy": 0.7, "macro_f1": 0.6}, {"accuracy": 0.6}]
    summary = seed_summary(runs)
    assert summary["accuracy"] == {"mean": 0.6, "min": 0.5, "max": 0.7}
    assert summary["macro_f1"] == {"mean": 0.5, "min": 0.4, "max": 0.6}
    assert "miou" not in summary


def test_dvc_metrics_show_prints_the_committed_numbers():
    result = subprocess.run(
        [str(BIN / "dvc"), "metrics", "show", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    data = next(iter(shown.values()))["data"]
    committed = read_json(ROOT / "metrics" / "metrics.json")
    assert data["metrics/metrics.json"]["data"]["macro_f1"] == committed["macro_f1"]
    assert data["metrics/metrics.json"]["data"]["map_accuracy"] == committed["map_accuracy"]
