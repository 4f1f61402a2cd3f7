"""The champion decision, apart from MLflow: does a newly registered version take the alias.

A version is compared with the champion only when both were scored on the same test split and
solve the same task; otherwise the champion is kept and the decision says why. On the same
scenes the comparison is paired: a scene bootstrap of the difference in the champion metric
(``tilepipe.ml.uncertainty.paired_difference``), and the new version is promoted only when the
lower end of that interval is above ``track.champion_margin``. A gain the test scenes cannot tell
from noise keeps the champion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tilepipe.ml.uncertainty import paired_difference

DEFAULT_TASK = "classification"  # versions registered before the task tag existed


@dataclass(frozen=True)
class Scored:
    """What the decision needs of a model version: its number, task, test split and scores.

    ``scenes`` is its ``scene_confusion.json`` (``{"classes": [...], "scenes": {id: KxK}}``), or
    ``None`` for a version evaluated before per-scene matrices were kept.
    """

    version: int | str
    task: str
    split_sha256: str | None
    score: float | None
    scenes: dict[str, Any] | None = None


@dataclass(frozen=True)
class Rule:
    """``track.champion_metric``, ``track.champion_confidence`` and ``track.champion_margin``."""

    metric: str = "macro_f1"
    confidence: float = 0.9
    margin: float = 0.0


@dataclass(frozen=True)
class Decision:
    """Whether the new version becomes champion, the reason in words, and the paired difference."""

    promote: bool
    reason: str
    difference: float | None = None  # metric(new) - metric(champion) on the same test scenes
    interval: list[float] | None = None  # its scene-bootstrap interval at the rule's confidence


def decide(new: Scored, champion: Scored | None, rule: Rule | None = None) -> Decision:
    """Promote the first version, or one whose gain over the champion is real on the same split and task."""
    rule = rule or Rule()
    if champion is None:
        return Decision(True, "first version")
    v = champion.version
    if champion.task != new.task:
        return Decision(False, f"champion v{v} is a {champion.task} model: kept")
    if champion.split_sha256 != new.split_sha256 or (champion.score is None and champion.scenes is None):
        return Decision(False, f"champion v{v} was scored on another test split: not comparable, kept")
    if champion.scenes is None or new.scenes is None:
        return _by_point_score(new, champion, rule)
    pair = aligned(new.scenes, champion.scenes)
    if pair is None:
        return Decision(False, f"champion v{v} was scored on other scenes or classes: not comparable, kept")
    difference, interval = paired_difference(*pair, rule.metric, rule.confidence)
    return _by_interval(v, difference, interval, len(pair[0]), rule)


def aligned(new: dict[str, Any], old: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """Both versions' per-scene matrices in one scene order, or ``None`` if scenes or classes differ."""
    if new.get("classes") != old.get("classes") or set(new["scenes"]) != set(old["scenes"]):
        return None
    ids = sorted(new["scenes"])
    return np.asarray([new["scenes"][s] for s in ids]), np.asarray([old["scenes"][s] for s in ids])


def _by_interval(
    v: int | str, difference: float, interval: list[float] | None, n_scenes: int, rule: Rule
) -> Decision:
    """The paired rule: promote when the interval's lower end is above the margin."""
    gain = f"{rule.metric} {difference:+.4f}"
    if interval is None:
        reason = (
            f"does not beat champion v{v}: {gain} on one test scene, which has no interval "
            "(a scene bootstrap needs two or more): kept"
        )
        return Decision(False, reason, difference, None)
    lo, hi = interval
    band = f"{rule.confidence:.0%} interval [{lo:+.4f}, {hi:+.4f}] over {n_scenes} test scenes"
    if lo > rule.margin:
        reason = f"beats champion v{v}: {gain}, {band}, above {rule.margin:g}"
        return Decision(True, reason, difference, interval)
    noise = " (within noise)" if difference > rule.margin else ""
    reason = f"does not beat champion v{v}{noise}: {gain}, {band}, reaches {rule.margin:g}: kept"
    return Decision(False, reason, difference, interval)


def _by_point_score(new: Scored, champion: Scored, rule: Rule) -> Decision:
    """Versions without per-scene matrices (evaluated before they were kept): the point scores."""
    v = champion.version
    missing = f"champion v{v}" if champion.scenes is None else f"v{new.version}"
    note = f"{missing} has no per-scene scores, so compared on the point score"
    if new.score is None or champion.score is None:
        return Decision(False, f"{note}, which is missing: not comparable, kept")
    difference = round(new.score - champion.score, 4)
    scores = f"({new.score:.4f} vs {champion.score:.4f}: {difference:+.4f}, margin {rule.margin:g})"
    if difference > rule.margin:
        return Decision(True, f"{note}: beats champion v{v} {scores}", difference)
    return Decision(False, f"{note}: does not beat champion v{v} {scores}: kept", difference)
