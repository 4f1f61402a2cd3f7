import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tilepipe.errors import TilepipeError
from tilepipe.params import apply_overrides, flatten, load_params, parse_override


def test_project_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.data.catalog.name == "catalog.csv"
    assert params.bands.input == ["red", "green", "blue"]
    assert params.data.class_names[0] == "water"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tile.size=0", "tile.size"),
        ("tile.stride=0", "tile.stride"),
        ("tile.sizee=3", "tile.sizee"),
        ("bogus=1", "bogus"),
        ("split.ratios={train: 0.5, val: 0.2, test: 0.2}", "split.ratios"),
        ("ingest.on_error=maybe", "ingest.on_error"),
        ("data.background=lava", "data"),
        ("bands.scale.uint8=[10, 5]", "bands.scale"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(TilepipeError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert str(err.value).startswith(f"--set {override}: {key}"), err.value


def test_a_bad_value_in_the_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  size: 64", "  size: sixty-four"))
    with pytest.raises(TilepipeError) as err:
        load_params(path, ["tile.stride=32"])
    assert str(err.value).startswith(f"{path}: tile.size: Input should be a valid integer"), err.value


def test_overrides_use_dvc_exp_syntax():
    params = load_params(ROOT / "params.yaml", ["tile.size=128", "tile.gsd=2.5", "bands.input=[nir, red]"])
    assert params.tile.size == 128
    assert params.tile.gsd == 2.5
    assert params.bands.input == ["nir", "red"]


def test_override_without_equals_is_rejected():
    with pytest.raises(TilepipeError, match="KEY=VALUE"):
        parse_override("tile.size")


def test_apply_overrides_does_not_mutate_input():
    raw = {"tile": {"size": 1}}
    out = apply_overrides(raw, ["tile.size=2"])
    assert raw["tile"]["size"] == 1 and out["tile"]["size"] == 2


def test_flatten_for_trackers():
    flat = flatten(load_params(ROOT / "params.yaml"))
    assert flat["tile.size"] == "64"
    assert "split.ratios.train" in flat


def test_cli_reports_bad_param_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tilepipe", "split", "--set", "tile.size=-4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tile.size" in lines[0]
    assert "Traceback" not in result.stderr
