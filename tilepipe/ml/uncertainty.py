"""How sure a held-out figure is: scene-level bootstrap intervals from per-scene confusion matrices.

Tiles (and pixels) of one scene are not independent samples: they share a place, a date and a
sensor. The unit of resampling is therefore the scene: draw the test scenes with replacement, sum
the drawn scenes' confusion matrices, recompute the metric; the 2.5th and 97.5th percentiles of
those recomputed values are the 95 % interval. With one scene there is nothing to resample, and
the interval is ``None`` (never a zero-width interval). Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONFIDENCE = 0.95
SAMPLES = 2000  # bootstrap draws; the interval's ends move by < 0.005 between seeds at this count
SEED = 0  # the draws are seeded: the same confusion matrices always give the same interval
METRICS = ("accuracy", "macro_f1", "miou")
CLASS_METRICS = ("precision", "recall", "f1", "iou")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def batch_scores(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of a stack of confusion matrices (..., K, K), as ``tilepipe.ml.metrics.summarize``."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(axis=-1), cms.sum(axis=-2)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    iou = _ratio(tp, support + predicted - tp)
    present = support > 0  # as summarize: classes absent from the reference are left out of means
    n_present = present.sum(axis=-1)
    total = cms.sum(axis=(-2, -1))
    return {
        "accuracy": _ratio(tp.sum(axis=-1), total),
        "macro_f1": _ratio((f1 * present).sum(axis=-1), n_present.astype(np.float64)),
        "miou": _ratio((iou * present).sum(axis=-1), n_present.astype(np.float64)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "iou": iou,
    }


def draw_counts(n_scenes: int, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each scene is drawn in each bootstrap sample: (samples, n_scenes)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_scenes, size=(samples, n_scenes))
    return np.stack([np.bincount(row, minlength=n_scenes) for row in picks])


def resampled(per_scene: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The summed confusion matrix of every bootstrap sample: (samples, K, K)."""
    return np.tensordot(counts, np.asarray(per_scene, dtype=np.int64), axes=(1, 0))


def _interval(values: np.ndarray, confidence: float) -> list[float]:
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return [round(float(lo), 4), round(float(hi), 4)]


def scene_intervals(
    per_scene: np.ndarray,
    classes: list[str],
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = SEED,
) -> dict[str, Any] | None:
    """95 % scene-bootstrap intervals of the headline and per-class metrics; ``None`` for one scene.

    Returns ``{"accuracy": [lo, hi], "macro_f1": ..., "miou": ..., "per_class": {name: {"f1": [lo, hi],
    ...}}}``.
    """
    per_scene = np.asarray(per_scene)
    if per_scene.shape[0] < 2:
        return None
    scores = batch_scores(resampled(per_scene, draw_counts(per_scene.shape[0], samples, seed)))
    out: dict[str, Any] = {key: _interval(scores[key], confidence) for key in METRICS}
    out["per_class"] = {
        name: {key: _interval(scores[key][:, i], confidence) for key in CLASS_METRICS}
        for i, name in enumerate(classes)
    }
    return out


def with_intervals(
    metrics: dict[str, Any], intervals: dict[str, Any] | None, prefix: str = ""
) -> dict[str, Any]:
    """Add ``<prefix><metric>_ci`` (and per class ``<metric>_ci``) to ``metrics``; ``None`` for one scene."""
    for key in ("accuracy", "macro_f1", "miou"):
        metrics[f"{prefix}{key}_ci"] = None if intervals is None else intervals[key]
    metrics[f"{prefix}ci"] = interval_note(intervals is not None)
    per_class = metrics.get(f"{prefix}per_class", {})
    for name, scores in per_class.items():
        for key in ("precision", "recall", "f1", "iou"):
            scores[f"{key}_ci"] = None if intervals is None else intervals["per_class"][name][key]
    return metrics


def interval_note(computed: bool) -> str:
    """How the ``_ci`` intervals were made, or why there are none."""
    if not computed:
        return "no interval: one test scene cannot be resampled (a scene bootstrap needs two or more)"
    return f"{CONFIDENCE:.0%} scene bootstrap ({SAMPLES} draws of the test scenes with replacement)"


def shown(metrics: dict[str, Any], key: str) -> str:
    """``0.862 [0.781, 0.921]``, or the figure alone when it has no interval."""
    interval = metrics.get(f"{key}_ci")
    figure = f"{metrics[key]:.3f}"
    return figure if not interval else f"{figure} [{interval[0]:.3f}, {interval[1]:.3f}]"


def paired_difference(
    new: np.ndarray,
    old: np.ndarray,
    metric: str,
    confidence: float = CONFIDENCE,
    samples: int = SAMPLES,
    seed: int = SEED,
) -> tuple[float, list[float] | None]:
    """``metric(new) - metric(old)`` on the same scenes, with a paired scene-bootstrap interval.

    ``new`` and ``old`` are per-scene confusion matrices (S, K, K) of two models on the same scenes,
    in the same order: each bootstrap sample draws the same scenes for both, so what the scenes
    share (an easy scene, a hard one) cancels out. The interval is ``None`` for one scene.
    """
    new, old = np.asarray(new), np.asarray(old)
    if new.shape != old.shape:
        raise ValueError(f"not the same scenes and classes: {new.shape} vs {old.shape}")
    difference = float(batch_scores(new.sum(axis=0))[metric] - batch_scores(old.sum(axis=0))[metric])
    if new.shape[0] < 2:
        return round(difference, 4), None
    counts = draw_counts(new.shape[0], samples, seed)
    deltas = batch_scores(resampled(new, counts))[metric] - batch_scores(resampled(old, counts))[metric]
    return round(difference, 4), _interval(deltas, confidence)


def across_values(values: list[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, standard deviation and a t interval of the mean of a few independent figures (folds, repeats)."""
    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    mean = float(data.mean()) if n else float("nan")
    std = float(data.std(ddof=1)) if n > 1 else None
    out: dict[str, Any] = {"n": n, "mean": round(mean, 4), "std": None if std is None else round(std, 4)}
    if n < 2 or std is None:
        out["ci"] = None
        return out
    half = _t_quantile(confidence, n - 1) * std / np.sqrt(n)
    out["ci"] = [round(float(mean - half), 4), round(float(mean + half), 4)]
    return out


def _t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student t quantile."""
    from scipy.stats import t  # here: scipy is slow to import and only the fold summaries need it

    return float(t.ppf(0.5 + confidence / 2, dof))
