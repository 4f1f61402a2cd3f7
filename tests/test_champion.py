"""The champion decision, every branch, without MLflow."""

from tilepipe.tracking.champion import Scored, decide

SPLIT = "a" * 64


def new(score: float, split: str = SPLIT, task: str = "classification") -> Scored:
    return Scored(version=3, task=task, split_sha256=split, score=score)


def champion(score: float | None = 0.8, split: str | None = SPLIT, task: str = "classification") -> Scored:
    return Scored(version=2, task=task, split_sha256=split, score=score)


def test_the_first_version_becomes_champion():
    d = decide(new(0.1), None)
    assert d.promote and d.reason == "first version"


def test_a_better_score_on_the_same_split_replaces_the_champion():
    d = decide(new(0.9), champion(0.8))
    assert d.promote and d.reason == "beats champion v2 (0.9000 > 0.8000)"


def test_a_worse_or_equal_score_does_not():
    for score in (0.7, 0.8):
        d = decide(new(score), champion(0.8))
        assert not d.promote and d.reason == f"does not beat champion v2 ({score:.4f} <= 0.8000)"


def test_a_champion_scored_on_another_test_split_is_kept_and_says_why():
    d = decide(new(0.99), champion(0.1, split="b" * 64))
    assert not d.promote and d.reason == "champion v2 was scored on another test split: not comparable, kept"


def test_a_champion_without_a_recorded_score_is_not_comparable():
    d = decide(new(0.99), champion(None))
    assert not d.promote and "not comparable" in d.reason


def test_a_champion_of_another_task_is_kept():
    d = decide(new(0.99, task="classification"), champion(0.1, task="segmentation"))
    assert not d.promote and d.reason == "champion v2 is a segmentation model: kept"
