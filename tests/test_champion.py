"""The champion decision, every branch, without MLflow: a paired scene bootstrap of the difference."""

import numpy as np
import pytest

from tilepipe.ml.uncertainty import batch_scores
from tilepipe.tracking.champion import Rule, Scored, decide

SPLIT = "a" * 64
CLASSES = ["water", "forest", "cropland"]


def matrices(seed: int, n: int = 6) -> np.ndarray:
    """Per-scene confusion matrices of a fair model: scenes differ in size and in how hard they are."""
    rng = np.random.default_rng(seed)
    cms = rng.integers(0, 25, size=(n, 3, 3))
    cms[:, np.arange(3), np.arange(3)] += rng.integers(60, 200, size=(n, 3))
    return cms


def doc(cms: np.ndarray, classes: list[str] = CLASSES) -> dict:
    """What evaluate writes as scene_confusion.json."""
    return {"classes": classes, "unit": "tile", "scenes": {f"s{i}": cm.tolist() for i, cm in enumerate(cms)}}


def score(cms: np.ndarray, metric: str = "macro_f1") -> float:
    return round(float(batch_scores(cms.sum(axis=0))[metric]), 4)


def scored(version: int, cms, split, task: str, points: float | None) -> Scored:
    """A version with per-scene matrices (its score from them), or, ``cms`` None, a point score only."""
    if cms is None:
        return Scored(version=version, task=task, split_sha256=split, score=points)
    return Scored(version=version, task=task, split_sha256=split, score=score(cms), scenes=doc(cms))


def new(cms=None, split: str = SPLIT, task: str = "classification", points: float | None = None) -> Scored:
    return scored(3, cms, split, task, points)


def champion(cms=None, split: str | None = SPLIT, task: str = "classification", points: float | None = 0.8):
    return scored(2, cms, split, task, points)


def shifted(cms: np.ndarray, scenes: list[int], tiles: int) -> np.ndarray:
    """Move ``tiles`` tiles per class from a wrong cell to the right one (negative: back) on ``scenes``."""
    out = cms.copy()
    for s in scenes:
        for k in range(3):
            wrong = (k + 1) % 3
            step = min(tiles, out[s, k, wrong]) if tiles > 0 else -min(-tiles, out[s, k, k])
            out[s, k, k] += step
            out[s, k, wrong] -= step
    return out


OLD = matrices(1)


def test_the_first_version_becomes_champion():
    d = decide(new(OLD), None)
    assert d.promote and d.reason == "first version" and d.difference is None


def test_a_clearly_better_version_takes_the_alias_and_says_by_how_much():
    better = shifted(OLD, list(range(6)), 30)  # better on every test scene
    d = decide(new(better), champion(OLD))
    assert d.promote
    assert d.difference == pytest.approx(score(better) - score(OLD), abs=1e-4) and d.difference > 0.05
    low, high = d.interval
    assert 0 < low <= d.difference <= high
    assert d.reason == (
        f"beats champion v2: macro_f1 {d.difference:+.4f}, 90% interval [{low:+.4f}, {high:+.4f}] "
        "over 6 test scenes, above 0"
    )


def test_a_noise_level_gain_keeps_the_champion():
    # much better on two scenes, a little worse on four: a higher pooled score, but the scenes disagree
    mixed = shifted(shifted(OLD, [0, 1], 40), [2, 3, 4, 5], -3)
    d = decide(new(mixed), champion(OLD))
    assert score(mixed) > score(OLD), "the old rule (higher point score) would have promoted it"
    assert not d.promote and d.difference > 0
    low, high = d.interval
    assert low <= 0 < high
    assert d.reason.startswith("does not beat champion v2 (within noise): macro_f1 +")
    assert d.reason.endswith("reaches 0: kept")


def test_a_worse_or_equal_version_keeps_the_champion():
    worse = shifted(OLD, list(range(6)), -20)
    d = decide(new(worse), champion(OLD))
    assert not d.promote and d.difference < 0 and d.interval[1] < 0
    assert d.reason.startswith("does not beat champion v2: macro_f1 -") and "(within noise)" not in d.reason
    same = decide(new(OLD), champion(OLD))
    assert not same.promote and same.difference == 0 and same.interval == [0.0, 0.0]


def test_the_margin_and_the_confidence_are_the_params():
    better = shifted(OLD, list(range(6)), 30)
    d = decide(new(better), champion(OLD))
    assert not decide(new(better), champion(OLD), Rule(margin=d.interval[0] + 0.001)).promote
    assert decide(new(better), champion(OLD), Rule(margin=d.interval[0] - 0.001)).promote
    wide = decide(new(better), champion(OLD), Rule(confidence=0.99)).interval
    assert wide[0] <= d.interval[0] and wide[1] >= d.interval[1]
    acc = decide(new(better), champion(OLD), Rule(metric="accuracy"))
    assert acc.reason.startswith("beats champion v2: accuracy +")
    assert acc.difference == pytest.approx(score(better, "accuracy") - score(OLD, "accuracy"), abs=1e-4)


def test_a_champion_scored_on_another_test_split_is_kept_and_says_why():
    d = decide(new(shifted(OLD, list(range(6)), 30)), champion(OLD, split="b" * 64))
    assert not d.promote and d.reason == "champion v2 was scored on another test split: not comparable, kept"


def test_a_champion_of_another_task_is_kept():
    d = decide(new(OLD, task="classification"), champion(OLD, task="segmentation"))
    assert not d.promote and d.reason == "champion v2 is a segmentation model: kept"


def test_other_scenes_or_classes_under_the_same_split_are_not_compared():
    fewer = Scored(3, "classification", SPLIT, 0.99, doc(OLD[:5]))
    assert "other scenes or classes: not comparable, kept" in decide(fewer, champion(OLD)).reason
    renamed = Scored(3, "classification", SPLIT, 0.99, doc(OLD, ["a", "b", "c"]))
    assert not decide(renamed, champion(OLD)).promote


def test_one_test_scene_has_no_interval_so_the_champion_stays():
    d = decide(new(shifted(OLD[:1], [0], 50)), champion(OLD[:1]))
    assert not d.promote and d.difference > 0 and d.interval is None
    assert "one test scene" in d.reason and d.reason.endswith(": kept")


def test_a_champion_from_before_the_scene_matrices_is_compared_on_its_point_score():
    d = decide(new(points=0.9), champion(points=0.8))
    assert d.promote and d.reason == (
        "champion v2 has no per-scene scores, so compared on the point score: "
        "beats champion v2 (0.9000 vs 0.8000: +0.1000, margin 0)"
    )
    assert decide(new(OLD), champion(points=score(OLD) - 0.01)).promote  # the new one has them; the old not
    kept = decide(new(points=0.8), champion(points=0.8))
    assert not kept.promote and kept.reason.endswith("(0.8000 vs 0.8000: +0.0000, margin 0): kept")
    assert not decide(new(points=0.9), champion(points=0.8), Rule(margin=0.2)).promote


def test_a_champion_without_scores_or_matrices_is_not_comparable():
    d = decide(new(points=0.99), champion(points=None))
    assert not d.promote and "not comparable" in d.reason
