"""Per-band statistics in one streaming pass: mean, standard deviation, 2nd and 98th percentiles.

Memory is fixed whatever the pixel count: per band a count, a mean and a sum of squared deviations
(float64, merged chunk by chunk with Chan et al.'s pairwise update, so the figures match a one-shot
NumPy computation to ~1e-12) and a histogram of ``HIST_BINS`` equal bins over [0, 1], the range
pixels have once ``bands.scale`` has mapped them. A percentile is read off the histogram as the
midpoint of the bin holding it, so it lies within half a bin (``PERCENTILE_ERROR``) of the exact
one, defined as NumPy's ``percentile(..., method="inverted_cdf")``: the smallest pixel value with at
least that share of the pixels at or below it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HIST_BINS = 16384  # 2**14 bins over [0, 1]: finer than uint16 data scaled by 10000
BIN_WIDTH = 1.0 / HIST_BINS
PERCENTILE_ERROR = BIN_WIDTH / 2  # a percentile is within this of the exact (inverted-CDF) one
PERCENTILES = (2, 98)
MIN_STD = 1e-3  # a constant band divides by this, not by zero


class BandAccumulator:
    """Running per-band count, mean, squared deviations and histogram of pixels in [0, 1]."""

    def __init__(self, bands: int) -> None:
        self.bands = bands
        self.count = 0
        self.mean = np.zeros(bands, dtype=np.float64)
        self.m2 = np.zeros(bands, dtype=np.float64)
        self.hist = np.zeros((bands, HIST_BINS), dtype=np.int64)

    def add(self, pixels: np.ndarray) -> None:
        """Add pixels given as (bands, n) values in [0, 1] (valid pixels only)."""
        n = pixels.shape[1]
        if n == 0:
            return
        values = pixels.astype(np.float64)
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        self._merge(n, mean, m2)
        bins = np.minimum((values * HIST_BINS).astype(np.int64), HIST_BINS - 1)
        np.maximum(bins, 0, out=bins)
        offsets = (np.arange(self.bands, dtype=np.int64) * HIST_BINS)[:, None]
        self.hist += np.bincount((bins + offsets).ravel(), minlength=self.bands * HIST_BINS).reshape(
            self.bands, HIST_BINS
        )

    def merge(self, other: BandAccumulator) -> None:
        """Add another accumulator's pixels to this one."""
        if other.count:
            self._merge(other.count, other.mean, other.m2)
            self.hist += other.hist

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def percentile(self, q: float) -> np.ndarray:
        """Per band, the midpoint of the bin holding the ``q``-th percentile (inverted CDF)."""
        rank = max(int(np.ceil(q / 100 * self.count)), 1)  # 1-based rank of the order statistic
        cumulative = np.cumsum(self.hist, axis=1)
        bins = np.array([np.searchsorted(row, rank) for row in cumulative])
        return (bins + 0.5) * BIN_WIDTH

    def result(self) -> dict[str, Any]:
        """``pixels``, and per band ``mean``, ``std`` (population), ``p2`` and ``p98``, as JSON lists."""
        if self.count == 0:
            raise ValueError("no valid pixel to compute statistics on")
        std = np.sqrt(self.m2 / self.count)
        out: dict[str, Any] = {"pixels": int(self.count), "mean": _listed(self.mean), "std": _listed(std)}
        for q in PERCENTILES:
            out[f"p{q}"] = _listed(self.percentile(q))
        return out


def _listed(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]


def method_note() -> dict[str, Any]:
    """How the figures are made, for the statistics file: what a reader needs to trust them."""
    return {
        "values": "pixels mapped onto [0, 1] by bands.scale, nodata and masked pixels excluded",
        "std": "population standard deviation (ddof 0), float64 streaming pairwise update",
        "percentiles": f"midpoint of the bin of a {HIST_BINS}-bin histogram over [0, 1] per band",
        "bin_width": BIN_WIDTH,
        "percentile_error": PERCENTILE_ERROR,
    }
