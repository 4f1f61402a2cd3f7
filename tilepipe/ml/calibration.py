"""Calibrated confidence: one temperature fitted on the val scenes, and expected calibration error.

A network's softmax is often over- or under-confident. Temperature scaling divides the logits by
one number T > 0 fitted on held-out scenes (the val split, never trained on) to minimise their
negative log-likelihood: probabilities change, the argmax (the map) does not. The expected
calibration error (ECE) measures what is left: the gap between the top-class probability and
the accuracy, averaged over 15 equal-width confidence bins weighted by their share of samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tilepipe.ml.checkpoint import ModelMeta

ECE_BINS = 15
T_RANGE = (0.05, 20.0)  # the temperatures searched
LOG_T_RANGE = (math.log(T_RANGE[0]), math.log(T_RANGE[1]))
LOG_T_TOLERANCE = 1e-5
GOLDEN = (math.sqrt(5) - 1) / 2


class Calibrated(nn.Module):
    """A model whose logits are divided by its temperature (softmax of it: calibrated probabilities)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's logits divided by the temperature."""
        return self.model(x) / self.temperature


def calibrated(model: nn.Module, meta: ModelMeta) -> nn.Module:
    """``model`` with ``meta.temperature`` applied to its logits (once: a calibrated model is kept)."""
    if isinstance(model, Calibrated) or meta.temperature == 1.0:
        return model
    return Calibrated(model, meta.temperature).eval()


def flat_samples(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, classes) float64 logits and labels: the tiles, or a segmentation batch's labelled pixels."""
    n_classes = logits.shape[1]
    if logits.dim() > 2:  # (batch, classes, height, width) -> (pixels, classes)
        logits = logits.movedim(1, -1).reshape(-1, n_classes)
        targets = targets.reshape(-1)
    keep = (targets >= 0) & (targets < n_classes)
    return logits[keep].double(), targets[keep].long()


def at_range_end(temperature: float) -> bool:
    """True if a fitted T is (within 1%) at an end of ``T_RANGE``: the true optimum may lie beyond."""
    return not T_RANGE[0] * 1.01 < temperature < T_RANGE[1] / 1.01


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under softmax(logits / temperature)."""
    return float(nn.functional.cross_entropy(logits / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in ``T_RANGE`` minimising the NLL of softmax(logits / T); deterministic.

    The NLL is convex in 1 / T, so unimodal in log T: a golden-section search on log T finds the
    minimum to ``LOG_T_TOLERANCE`` (about 30 evaluations).
    """
    logits, targets = logits.double(), targets.long()
    if len(targets) == 0:
        return 1.0
    lo, hi = LOG_T_RANGE
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = nll(logits, targets, math.exp(a)), nll(logits, targets, math.exp(b))
    while hi - lo > LOG_T_TOLERANCE:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = nll(logits, targets, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = nll(logits, targets, math.exp(b))
    return math.exp((lo + hi) / 2)


class CalibrationBins:
    """Expected calibration error, accumulated batch by batch in equal-width confidence bins.

    Bin i holds the samples whose top-class probability is in (i / bins, (i + 1) / bins].
    """

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = np.zeros(bins, dtype=np.int64)
        self.confidence = np.zeros(bins, dtype=np.float64)
        self.correct = np.zeros(bins, dtype=np.float64)

    def add(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        """Add samples: their top-class probability and whether the top class was right."""
        confidence = np.asarray(confidence, dtype=np.float64).ravel()
        which = np.clip(np.ceil(confidence * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.count += np.bincount(which, minlength=self.bins)
        self.confidence += np.bincount(which, weights=confidence, minlength=self.bins)
        right = np.asarray(correct, dtype=np.float64).ravel()
        self.correct += np.bincount(which, weights=right, minlength=self.bins)

    def add_logits(self, logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> None:
        """Add a batch of logits (tiles or pixels) and labels, softmax taken at ``temperature``."""
        flat, labels = flat_samples(logits, targets)
        top, chosen = torch.softmax(flat / temperature, dim=1).max(dim=1)
        self.add(top.numpy(), (chosen == labels).numpy())

    def ece(self) -> float:
        """Sum over bins of |accuracy - mean confidence| weighted by the bin's share of samples."""
        total = self.count.sum()
        if total == 0:
            return 0.0
        gaps = np.abs(self.correct - self.confidence)  # count x |accuracy - confidence| per bin
        return float(gaps.sum() / total)
