"""Smooth random fields, land-cover layout and spectral model behind ``tilepipe.synth.scenes``.

Everything here is evaluated on demand at ground coordinates (metres from the scene origin,
x to the east/right and y down) from a hash of integer lattice points, so any window of any
scene can be computed on its own with memory bounded by the window, never by the scene.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BANDS = ("blue", "green", "red", "nir")

# Fixed signature library: (name, reflectance blue/green/red/nir, texture kind), in class order.
LIBRARY: tuple[tuple[str, tuple[float, float, float, float]], ...] = (
    ("water", (0.055, 0.050, 0.030, 0.020)),
    ("forest", (0.036, 0.066, 0.042, 0.300)),
    ("cropland", (0.052, 0.094, 0.072, 0.370)),
    ("urban", (0.105, 0.115, 0.125, 0.190)),
    ("bare", (0.085, 0.125, 0.170, 0.250)),
)
SOIL = np.array([0.080, 0.115, 0.150, 0.220], np.float32)  # harvested / ploughed fields
TINT = np.array([-0.3, 0.45, -0.6, 0.45], np.float32)  # per-band response to "greenness"
ABSENT = np.float32(-10.0)  # class bias of a land cover a scene lacks: its score never wins
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B1)

Noise = Callable[[float, int], np.ndarray]


def hash_uniform(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Hash integer lattice coordinates (any broadcastable shapes) to uniform floats in [0, 1)."""
    h = np.asarray(ix, np.int64).astype(np.uint64) * _M1
    h = h ^ (np.asarray(iy, np.int64).astype(np.uint64) * _M2)
    h ^= np.uint64(seed & 0xFFFFFFFF) * _M3
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h ^= h >> np.uint64(shift)
        h *= np.uint64(mult)
    h ^= h >> np.uint64(31)
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


def _axis(v: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
    f = np.asarray(v, np.float64) / cell
    i = np.floor(f)
    t = (f - i).astype(np.float32)
    i = i.astype(np.int64)
    lo = int(i.min()) if i.size else 0
    return i - lo, t * t * (3 - 2 * t), lo


def grid_noise(xs: np.ndarray, ys: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Value noise in [0, 1] on the grid ``ys`` x ``xs`` (1-d ground coordinates): (len(ys), len(xs))."""
    ix, tx, ox = _axis(xs, cell)
    iy, ty, oy = _axis(ys, cell)
    lat = hash_uniform(np.arange(ix.max() + 2)[None, :] + ox, np.arange(iy.max() + 2)[:, None] + oy, seed)
    rows = lat[iy] * (1 - ty)[:, None] + lat[iy + 1] * ty[:, None]
    return rows[:, ix] * (1 - tx) + rows[:, ix + 1] * tx


def point_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Value noise in [0, 1] at arbitrary ground points ``x``, ``y`` (same shape)."""
    ix, tx, ox = _axis(x, cell)
    iy, ty, oy = _axis(y, cell)
    lat = hash_uniform(np.arange(ix.max() + 2)[None, :] + ox, np.arange(iy.max() + 2)[:, None] + oy, seed)
    top = lat[iy, ix] * (1 - tx) + lat[iy, ix + 1] * tx
    bottom = lat[iy + 1, ix] * (1 - tx) + lat[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bottom * ty


@dataclass(frozen=True)
class Look:
    """Everything random about one scene's landscape and appearance (a few dozen numbers)."""

    seed: int
    gsd: float
    cell: float  # land-cover blob scale, metres
    bias: np.ndarray  # (k,) per-class abundance bias
    sig: np.ndarray  # (k, 4) per-scene class reflectance
    gain: np.ndarray  # (4,) sensor / atmosphere gain
    offset: np.ndarray  # (4,) haze / path radiance
    sigma: float  # per-pixel noise, reflectance units
    vary: float  # within-class brightness variation
    field: tuple[float, float]  # cropland field system angle (rad) and size (m)
    blocks: tuple[float, float, float]  # urban street grid angle, block period (m), aspect


def make_look(
    rng: np.random.Generator, n_classes: int, gsd: float, sigma: float, absent: tuple[int, ...] = ()
) -> Look:
    """Draw one scene's landscape and appearance: class make-up, season, atmosphere, sensor.

    Scenes differ the way places and acquisitions do, so one scene cannot stand for the rest:
    a place lacks the land covers in ``absent`` (a desert has no forest, a city no cropland)
    and has its own abundances, vegetation state, haze, illumination and band gains.
    """
    sig = np.array([s for _, s in LIBRARY[:n_classes]], np.float32)
    sig *= np.exp(rng.normal(0.0, 0.07, sig.shape)).astype(np.float32)  # per-class jitter
    season = rng.uniform(-1.0, 1.0)  # greener or browner vegetation
    for k in (1, 2)[: max(0, n_classes - 1)]:
        sig[k] *= 1 + 0.15 * season * TINT
    if n_classes > 2:  # cropland partly harvested in some scenes
        sig[2] += rng.uniform(0.0, 0.25) * (SOIL - sig[2])
    level = rng.uniform(0.9, 1.12)
    gain = (level * np.exp(rng.normal(0.0, 0.05, 4))).astype(np.float32)
    offset = (rng.uniform(0.0, 1.0) * np.array([0.02, 0.014, 0.01, 0.004])).astype(np.float32)
    cell = max(rng.uniform(150.0, 400.0), rng.uniform(1.6, 2.4) * 64 * gsd)
    bias = rng.normal(0.0, 0.05, n_classes).astype(np.float32)
    bias[list(absent)] = ABSENT
    return Look(
        seed=int(rng.integers(2**31)),
        gsd=gsd,
        cell=cell,
        bias=bias,
        sig=sig,
        gain=gain,
        offset=offset,
        sigma=sigma * rng.uniform(0.8, 1.25),
        vary=rng.uniform(0.12, 0.25),
        field=(rng.uniform(0, np.pi), rng.uniform(60.0, 160.0)),
        blocks=(rng.uniform(0, np.pi / 2), rng.uniform(16.0, 30.0), rng.uniform(0.8, 1.6)),
    )


def _classes(look: Look, noise: Noise) -> np.ndarray:
    best = score = None
    for k, b in enumerate(look.bias):
        s = 0.65 * noise(look.cell, look.seed + 11 * k) + 0.35 * noise(
            look.cell / 2.7, look.seed + 11 * k + 1
        )
        s += b
        if best is None:
            best, score = np.zeros(s.shape, np.uint8), s
        else:
            better = s > score
            best[better], score = k, np.maximum(s, score)
    assert best is not None
    return best


def grid_classes(look: Look, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Class index (0..k-1) on the ground grid ``ys`` x ``xs``."""
    return _classes(look, lambda cell, seed: grid_noise(xs, ys, cell, seed))


def point_classes(look: Look, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Class index (0..k-1) at arbitrary ground points."""
    return _classes(look, lambda cell, seed: point_noise(x, y, cell, seed))


def _aa(scale: float, gsd: float) -> float:
    """Fraction of a pattern's contrast that survives at this pixel size (crude anti-aliasing)."""
    return float(np.clip(scale / (2.0 * gsd), 0.0, 1.0))


def _texture(look: Look, k: int, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Multiplicative texture of class ``k`` (and, for fields, a mix towards bare soil)."""
    g, s = look.gsd, look.seed + 101 * (k + 1)
    X, Y = xs[None, :].astype(np.float32), ys[:, None].astype(np.float32)

    def nz(cell: float, off: int) -> np.ndarray:
        cell = max(cell, g)
        return 2 * grid_noise(xs, ys, cell, s + off) - 1

    if k == 0:  # water: calm, faint waves and turbidity
        a = np.float32(_aa(9.0, g))
        wave = np.sin((X * 0.6 + Y * 0.8) * np.float32(2 * np.pi / 9.0) + 3 * nz(40.0, 1))
        return 1 + 0.05 * a * wave + 0.10 * nz(90.0, 2), None
    if k == 1:  # forest: crowns and gaps
        crowns = np.tanh(2.5 * nz(4.5, 1))
        return 1 + 0.45 * _aa(4.5, g) * crowns + 0.15 * nz(30.0, 2), None
    if k == 2:  # cropland: fields with rows in per-field direction, varying crop stage
        ang, size = look.field
        ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        fu, fv = np.floor((X * ca + Y * sa) / size), np.floor((Y * ca - X * sa) / (0.7 * size))
        h1, h2 = hash_uniform(fu, fv, s), hash_uniform(fu, fv, s + 1)
        theta = ang + np.where(h1 < 0.5, 0.0, np.pi / 2).astype(np.float32) + 0.2 * h2
        period = np.float32(4.0) + 8 * h2
        rows = np.sin((X * np.cos(theta) + Y * np.sin(theta)) * (2 * np.pi) / period)
        a = np.clip(period / (2 * g), 0, 1)
        return 1 + 0.18 * a * rows + 0.3 * (h1 - 0.5) + 0.05 * nz(6.0, 3), h2**3 * 0.8
    if k == 3:  # urban: street grid, buildings with varied roofs and cast shadows
        ang, per, aspect = look.blocks
        ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        u, v = (X * ca + Y * sa) / per, (Y * ca - X * sa) / (per * aspect)
        fu, fv = u - np.floor(u), v - np.floor(v)
        roof = 0.6 + 0.9 * hash_uniform(np.floor(u), np.floor(v), s)
        house = (fu < 0.62) & (fv < 0.7)
        shadow = (fu >= 0.62) & (fu < 0.75) & (fv < 0.7)
        pattern = np.where(house, roof, np.where(shadow, 0.45, 0.8)).astype(np.float32)
        a = np.float32(_aa(per * 0.6, g))
        return a * pattern + (1 - a) * (1 + 0.3 * nz(per, 4)) + 0.08 * nz(60.0, 5), None
    # bare soil: medium-frequency roughness and patches
    return 1 + 0.22 * _aa(3.0, g) * nz(3.0, 1) + 0.18 * nz(25.0, 2), None


def reflectance(
    look: Look, cls: np.ndarray, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Top-of-atmosphere-like reflectance (4, H, W) for class map ``cls`` on grid ``ys`` x ``xs``."""
    slow = 4 * look.cell
    bright = 1 + look.vary * (2 * grid_noise(xs, ys, slow, look.seed + 7) - 1)
    tint = 0.6 * (2 * grid_noise(xs, ys, slow * 0.7, look.seed + 8) - 1)
    mult = np.empty(cls.shape, np.float32)
    mix = np.zeros(cls.shape, np.float32)
    for k in np.unique(cls):
        tex, soil = _texture(look, int(k), xs, ys)
        np.copyto(mult, tex, where=cls == k)
        if soil is not None:
            np.copyto(mix, soil, where=cls == k)
    mult *= bright
    tint *= np.where(np.isin(np.arange(len(look.bias)), (1, 2)), 0.5, 0.2).astype(np.float32)[cls]
    out = np.empty((4, *cls.shape), np.float32)
    for b in range(4):
        base = look.sig[:, b][cls]
        base += mix * (SOIL[b] - base)
        out[b] = base * mult * (1 + TINT[b] * tint)
    out += rng.standard_normal(out.shape, np.float32) * np.float32(look.sigma)
    out *= look.gain[:, None, None]
    out += look.offset[:, None, None]
    return out


def _cloud_noise(x: np.ndarray, y: np.ndarray, cell: float, seed: int) -> np.ndarray:
    return 0.7 * grid_noise(x, y, cell, seed) + 0.3 * grid_noise(x, y, cell / 3, seed + 1)


def make_clouds(rng: np.random.Generator, width: float, height: float) -> tuple[float, int, float]:
    """Cloud blob scale (m), seed and threshold for a drawn cloud fraction of a scene (in m)."""
    cell, seed = rng.uniform(0.12, 0.22) * min(width, height), int(rng.integers(2**31))
    sample = _cloud_noise(np.linspace(0, width, 96), np.linspace(0, height, 96), cell, seed)
    return cell, seed, float(np.quantile(sample, 1 - rng.uniform(0.04, 0.11)))


def clouds(spec: tuple[float, int, float], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Cloud mask on the ground grid ``ys`` x ``xs``."""
    cell, seed, threshold = spec
    return _cloud_noise(xs, ys, cell, seed) > threshold


def footprint(
    spec: tuple[float, float], width: int, height: int, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Inside a swath footprint: the scene rectangle rotated by ``spec`` = (angle, scale)."""
    ang, scale = spec
    dx, dy = cols[None, :] + 0.5 - width / 2, rows[:, None] + 0.5 - height / 2
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = dy * np.cos(ang) - dx * np.sin(ang)
    return (np.abs(u) <= scale * width / 2) & (np.abs(v) <= scale * height / 2)
