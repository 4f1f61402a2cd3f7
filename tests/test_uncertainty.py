"""Scene-bootstrap intervals: the resampling unit is the scene, and the figures match summarize()."""

import numpy as np
import pytest

from tilepipe.ml.metrics import summarize
from tilepipe.ml.uncertainty import (
    across_values,
    batch_scores,
    draw_counts,
    paired_difference,
    scene_intervals,
    shown,
    with_intervals,
)

CLASSES = ["a", "b", "c"]


def scenes(seed: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cms = rng.integers(0, 40, size=(n, 3, 3))
    cms[:, np.arange(3), np.arange(3)] += rng.integers(20, 200, size=(n, 3))
    return cms


def test_batch_scores_equal_summarize_for_every_matrix():
    for cm in scenes(1, 20):
        cm[2] = 0 if cm.sum() % 2 else cm[2]  # some matrices without class c: left out of the means
        got, want = batch_scores(cm), summarize(cm, CLASSES)
        for key in ("accuracy", "macro_f1", "miou"):
            assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_the_interval_is_a_bootstrap_over_scenes_not_tiles():
    per_scene = scenes(2)
    counts = draw_counts(len(per_scene), samples=300, seed=5)
    drawn = [sum(int(k) * per_scene[s] for s, k in enumerate(row)) for row in counts]
    by_loop = sorted(summarize(cm, CLASSES)["macro_f1"] for cm in drawn)
    got = scene_intervals(per_scene, CLASSES, samples=300, seed=5)["macro_f1"]
    assert got[0] == pytest.approx(np.percentile(by_loop, 2.5), abs=1e-4)
    assert got[1] == pytest.approx(np.percentile(by_loop, 97.5), abs=1e-4)
    point = summarize(per_scene.sum(axis=0), CLASSES)["macro_f1"]
    assert got[0] < point < got[1]


def test_scenes_that_disagree_widen_the_interval():
    agree = np.stack([scenes(3, 1)[0]] * 6)
    disagree = scenes(4)
    narrow, wide = (scene_intervals(x, CLASSES)["accuracy"] for x in (agree, disagree))
    assert narrow[1] - narrow[0] == 0  # the same scene six times: no spread to find
    assert wide[1] - wide[0] > 0.02


def test_one_scene_has_no_interval_and_says_why():
    assert scene_intervals(scenes(5, 1), CLASSES) is None
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "miou": 0.3, "per_class": {"a": {"f1": 0.2}}}
    with_intervals(metrics, None)
    assert metrics["macro_f1_ci"] is None and metrics["per_class"]["a"]["f1_ci"] is None
    assert "one test scene" in metrics["ci"]
    assert shown(metrics, "macro_f1") == "0.400"


def test_paired_difference_cancels_what_the_scenes_share():
    old = scenes(6, 8)
    better = old.copy()
    better[:, np.arange(3), np.arange(3)] += 15  # a little better on every scene
    diff, (low, high) = paired_difference(better, old, "macro_f1")
    assert diff > 0 and 0 < low <= diff <= high
    same, interval = paired_difference(old, old, "macro_f1")
    assert same == 0 and interval == [0.0, 0.0]
    assert paired_difference(better[:1], old[:1], "accuracy")[1] is None
    with pytest.raises(ValueError, match="not the same scenes"):
        paired_difference(better[:3], old, "accuracy")


def test_across_values_uses_student_t():
    summary = across_values([0.80, 0.85, 0.90])
    half = 4.302653 * 0.05 / np.sqrt(3)  # t(0.975, 2 dof)
    assert summary["mean"] == 0.85 and summary["std"] == 0.05
    assert summary["ci"] == pytest.approx([0.85 - half, 0.85 + half], abs=1e-4)
    assert across_values([0.7])["ci"] is None
