"""The champion decision, apart from MLflow: does a newly registered version take the alias.

A version is compared with the champion only when both were scored on the same test split and
solve the same task; otherwise the champion is kept and the decision says why.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TASK = "classification"  # versions registered before the task tag existed


@dataclass(frozen=True)
class Scored:
    """What the decision needs of a model version: its number, task, test split and score."""

    version: int | str
    task: str
    split_sha256: str | None
    score: float | None


@dataclass(frozen=True)
class Decision:
    """Whether the new version becomes champion, and the reason in words."""

    promote: bool
    reason: str


def decide(new: Scored, champion: Scored | None) -> Decision:
    """Promote the first version, or one that beats the champion on the same split and task."""
    if champion is None:
        return Decision(True, "first version")
    v = champion.version
    if champion.task != new.task:
        return Decision(False, f"champion v{v} is a {champion.task} model: kept")
    if champion.split_sha256 != new.split_sha256 or champion.score is None:
        return Decision(False, f"champion v{v} was scored on another test split: not comparable, kept")
    assert new.score is not None
    if new.score > champion.score:
        return Decision(True, f"beats champion v{v} ({new.score:.4f} > {champion.score:.4f})")
    return Decision(False, f"does not beat champion v{v} ({new.score:.4f} <= {champion.score:.4f})")
