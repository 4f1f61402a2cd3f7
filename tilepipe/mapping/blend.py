"""Sliding-window inference over a whole scene in strips, with a rolling accumulator.

Both generators read the scene one strip of window rows at a time and yield finished output
rows as soon as no later window can touch them, so memory grows with the scene's width and
the window size, never with its area.

* Segmentation (U-Net): windows on a lattice of multiples of 8 px (the U-Net's three 2x2
  max-pools then see the same partitions as a pass over the whole scene), the last window
  clamped to the far edge. Each window's softmax is blended with weight 1 in its core and 0
  in a ``margin`` band along its inner edges, so with ``margin`` at least the receptive-field
  radius the map equals one forward pass over the whole scene (for models.UNet on the 8 px
  lattice: :data:`UNET_EXACT_MARGIN`).
* Classification (tile classifier): output cells of ``tile_size // 2`` px; a tile-sized window
  at every cell position, its softmax added to the 2 x 2 cells it covers, then averaged. Window
  rows are read in column blocks, so only the per-cell accumulators grow with the width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from rasterio.windows import Window
from torch import nn

NODATA = 255  # class value of nodata pixels / cells in predicted maps
ALIGN = 8  # the U-Net pools three times by 2
# models.UNet (any width): an output pixel depends on input pixels up to 51 px away. With windows on
# the 8 px lattice the reach depends on a pixel's phase mod 8, and a margin of 46 px already keeps
# every core pixel's inputs inside its window. Both are measured in tests/test_predict.py.
UNET_RECEPTIVE_RADIUS = 51
UNET_EXACT_MARGIN = 46
FORWARD_PIXELS = 4 * 256 * 256  # per forward pass; e.g. 4 windows of 256 px, or 256 tiles of 32 px
EMIT_COLUMNS = 2048  # finished rows are averaged this many columns at a time
READ_COLUMNS = 2048  # classification reads a window row this many px (plus one window's overlap) at a time
ONE = np.ones(1, dtype=np.float32)

Reader = Callable[[Window], tuple[np.ndarray, np.ndarray]]  # window -> (float32 bands in [0, 1], valid)


@dataclass(frozen=True)
class Strip:
    """Finished output rows: ``classes`` (rows, width) uint8, ``probs`` (classes, rows, width) or None.

    ``confidence`` (rows, width) float32: the top class's probability, 0 where ``classes`` is NODATA.
    """

    row: int
    classes: np.ndarray
    probs: np.ndarray | None
    confidence: np.ndarray | None = None


def ceil_to(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def axis_positions(length: int, size: int, stride: int, align: int = ALIGN) -> list[int]:
    """Window starts along one axis: multiples of ``stride`` (itself aligned), the last at the far edge.

    ``size`` is a multiple of ``align``; the last start is ``ceil(length, align) - size``, so it is
    aligned too and the window reaches the edge (with less than ``align`` px of padding).
    """
    last = max(ceil_to(length, align) - size, 0)
    positions = list(range(0, last, stride))
    return [*positions, last]


def axis_weights(size: int, margin: int, first: bool, last: bool) -> np.ndarray:
    """1 in the core, 0 in the ``margin`` band of each inner edge (an edge not on the scene border)."""
    weight = np.ones(size, dtype=np.float32)
    if not first:
        weight[:margin] = 0
    if not last:
        weight[size - margin :] = 0
    return weight


def _softmax(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    """Softmax over classes of the model's logits for a batch, as float32 numpy.

    The forward pass sees at most :data:`FORWARD_PIXELS` pixels at a time: a U-Net's activations
    (tens of channels at full resolution) dominate peak memory, and the batch size alone does not
    bound them when windows are large.
    """
    step = max(1, FORWARD_PIXELS // (batch.shape[-1] * batch.shape[-2]))
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch), step):
            logits = model(torch.from_numpy(batch[start : start + step])).float()
            parts.append(class_softmax(logits, getattr(model, "engine_name", "torch")))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def class_softmax(logits: torch.Tensor, engine: str = "torch") -> np.ndarray:
    """Softmax over the class axis (1) as float32 numpy: by torch for torch's logits, else by numpy.

    Logits from ONNX Runtime stay out of torch: a torch op here wakes torch's OpenMP threads, which
    then spin on the cores ONNX Runtime's own threads need next (``small_cnn`` on 2 cores: 1291
    windows/s with torch's softmax in the main thread, 2355 with numpy's). For torch's logits
    torch's softmax (without ``out=``: ~15x slower on small batches) keeps the reference's bytes.
    """
    if engine == "torch":
        return torch.softmax(logits, dim=1).numpy()
    values = logits.numpy()  # ONNX Runtime's own output array: changed in place
    values -= values.max(axis=1, keepdims=True)
    np.exp(values, out=values)
    values /= values.sum(axis=1, keepdims=True)
    return values


def _finish(
    acc: np.ndarray, wy: np.ndarray, wx: np.ndarray, valid: np.ndarray, with_probs: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Average accumulated probabilities (weights ``wy`` x ``wx``); argmax (NODATA if invalid) and its value.

    Works through the columns in chunks so no temporary is the size of the whole strip.
    """
    n, rows, cols = acc.shape
    classes = np.empty((rows, cols), dtype=np.uint8)
    probs = np.empty((n, rows, cols), dtype=np.float32) if with_probs else None
    confidence = np.empty((rows, cols), dtype=np.float32)
    for c0 in range(0, cols, EMIT_COLUMNS):
        part = slice(c0, c0 + EMIT_COLUMNS)
        weight = wy[:, None] * wx[None, part]
        ok = valid[:, part] & (weight > 0)
        mean = acc[:, :, part] / np.where(ok, weight, 1)
        chosen = mean.argmax(axis=0).astype(np.uint8)
        chosen[~ok] = NODATA
        classes[:, part] = chosen
        confidence[:, part] = np.where(ok, mean.max(axis=0), 0)
        if probs is not None:
            mean[:, ~ok] = 0
            probs[:, :, part] = mean
    return classes, probs, confidence


def segment_plan(height: int, width: int, window: int, margin: int) -> tuple[int, int, list[int], list[int]]:
    """(window rows, window cols, row starts, column starts) of the U-Net's windows over a grid."""
    wh, ww = min(window, ceil_to(height, ALIGN)), min(window, ceil_to(width, ALIGN))
    stride = (window - 2 * margin) // ALIGN * ALIGN
    if stride < ALIGN:
        raise ValueError(f"window {window} - 2 x margin {margin} leaves a stride under {ALIGN} px")
    return wh, ww, axis_positions(height, wh, stride), axis_positions(width, ww, stride)


def segment_strips(
    model: nn.Module,
    read: Reader,
    height: int,
    width: int,
    n_classes: int,
    window: int,
    margin: int,
    batch_size: int,
    progress: Callable[[int], object] = lambda n: None,
    with_probs: bool = True,
) -> Iterator[Strip]:
    """Blend U-Net windows over a ``height`` x ``width`` grid; yield finished rows top to bottom.

    Each batch reads only the columns its windows cover, so besides the accumulator (classes x
    window x width float32) memory is per batch, not per scene row.
    """
    wh, ww, rows, cols = segment_plan(height, width, window, margin)
    span = cols[-1] + ww
    row_w = [axis_weights(wh, margin, i == 0, i == len(rows) - 1) for i in range(len(rows))]
    col_w = [axis_weights(ww, margin, i == 0, i == len(cols) - 1) for i in range(len(cols))]
    # Summed weights are separable: a valid pixel lies only in windows that were run (a window
    # is skipped only when all its pixels are invalid), so its weight is wy[row] * wx[col].
    wy = np.zeros(rows[-1] + wh, dtype=np.float32)
    for y, w in zip(rows, row_w, strict=True):
        wy[y : y + wh] += w
    wx = np.zeros(span, dtype=np.float32)
    for x, w in zip(cols, col_w, strict=True):
        wx[x : x + ww] += w
    acc = np.zeros((n_classes, wh, span), dtype=np.float32)
    valid = np.zeros((wh, span), dtype=bool)
    top = 0
    for r, y in enumerate(rows):
        if y > top:  # rows above y are final: no later window reaches them
            yield from _emit_rows(acc, wy[top:y], wx, valid, top, height, width, with_probs)
            _roll(y - top, acc, valid)
            top = y
        for start in range(0, len(cols), batch_size):
            group = range(start, min(start + batch_size, len(cols)))
            x0 = cols[group[0]]
            image, ok = read(Window(x0, y, cols[group[-1]] + ww - x0, wh))
            valid[:, x0 : x0 + ok.shape[1]] = ok  # overlapping reads agree on shared pixels
            todo = [i for i in group if ok[:, cols[i] - x0 : cols[i] - x0 + ww].any()]
            progress(len(group) - len(todo))
            if not todo:
                continue
            batch = np.stack([image[:, :, cols[i] - x0 : cols[i] - x0 + ww] for i in todo])
            del image
            for i, p in zip(todo, _softmax(model, batch), strict=True):
                acc[:, :, cols[i] : cols[i] + ww] += p * (row_w[r][:, None] * col_w[i][None, :])
            progress(len(todo))
    yield from _emit_rows(acc, wy[top : top + wh], wx, valid, top, height, width, with_probs)


def _emit_rows(acc, wy, wx, valid, top: int, height: int, width: int, with_probs: bool) -> Iterator[Strip]:
    count = min(len(wy), height - top)
    if count <= 0:
        return
    finished = _finish(acc[:, :count, :width], wy[:count], wx[:width], valid[:count, :width], with_probs)
    yield Strip(top, *finished)


def _roll(shift: int, *buffers: np.ndarray) -> None:
    """Move each buffer's rows up by ``shift`` (the row axis is the second to last) and clear the tail."""
    for buf in buffers:
        keep = buf.shape[-2] - shift
        buf[..., :keep, :] = buf[..., shift:, :]
        buf[..., keep:, :] = 0


def cell_grid_shape(height: int, width: int, tile_size: int) -> tuple[int, int, int]:
    """(cell size in px, cell rows, cell columns) of a classification map; cells are tile_size // 2."""
    cell = max(tile_size // 2, 1)
    return cell, math.ceil(height / cell), math.ceil(width / cell)


def classify_strips(
    model: nn.Module,
    read: Reader,
    height: int,
    width: int,
    n_classes: int,
    tile_size: int,
    batch_size: int,
    progress: Callable[[int], object] = lambda n: None,
    with_probs: bool = True,
    read_columns: int = READ_COLUMNS,
) -> Iterator[Strip]:
    """Tile-classifier windows at every cell position; yield finished cell rows top to bottom.

    Each window row is read in blocks of ``read_columns // cell`` window columns (overlapping by
    ``tile_size - cell`` px), so reads do not grow with the scene's width; the batches are the
    same as for one full-width read (the model sees the same windows in the same groups).
    """
    cell, n_rows, n_cols = cell_grid_shape(height, width, tile_size)
    w_rows, w_cols = max(n_rows - 1, 1), max(n_cols - 1, 1)
    per_read = max(read_columns // cell, 1)
    acc = np.zeros((n_classes, 2, n_cols + 1), dtype=np.float32)
    count = np.zeros((2, n_cols + 1), dtype=np.float32)
    cell_ok = np.zeros((2, n_cols), dtype=bool)  # cells at least half valid, this window row's two
    for i in range(w_rows):
        last = i == w_rows - 1
        pending: list[tuple[int, np.ndarray]] = []
        for j0 in range(0, w_cols, per_read):
            j1 = min(j0 + per_read, w_cols)
            c1 = j1 if j1 < w_cols else n_cols  # the last read also covers the cells past the windows
            x0 = j0 * cell
            span = max((j1 - 1) * cell + tile_size, c1 * cell) - x0
            image, ok = read(Window(x0, i * cell, span, max(tile_size, 2 * cell)))
            for dy in (0, 1) if last else (0,):
                frac = ok[dy * cell : (dy + 1) * cell, : (c1 - j0) * cell].reshape(cell, c1 - j0, cell)
                cell_ok[dy, j0:c1] = frac.mean(axis=(0, 2)) >= 0.5
            starts = np.arange(j1 - j0) * cell
            seen = np.concatenate([[0], np.cumsum(ok[:tile_size].any(axis=0))])  # columns with data so far
            todo = np.flatnonzero(seen[starts + tile_size] > seen[starts])
            progress(j1 - j0 - len(todo))
            pending += [(j0 + j, image[:, :tile_size, j * cell : j * cell + tile_size]) for j in todo]
            while len(pending) >= batch_size:
                _add_windows(model, pending[:batch_size], acc, count, progress)
                del pending[:batch_size]
        if pending:
            _add_windows(model, pending, acc, count, progress)
        for dy in (0, 1) if last else (0,):
            if i + dy < n_rows:
                finished = _finish(
                    acc[:, dy : dy + 1, :n_cols], ONE, count[dy, :n_cols], cell_ok[dy][None], with_probs
                )
                yield Strip(i + dy, *finished)
        _roll(1, acc, count)


def _add_windows(
    model: nn.Module,
    windows: list[tuple[int, np.ndarray]],
    acc: np.ndarray,
    count: np.ndarray,
    progress: Callable[[int], object],
) -> None:
    """Add each (window column, tile) softmax to the 2 x 2 cells the window covers."""
    cols = np.asarray([j for j, _ in windows])
    probs = _softmax(model, np.stack([tile for _, tile in windows]))
    for dy in (0, 1):
        for dx in (0, 1):  # columns within a batch are distinct, so fancy += is safe
            acc[:, dy, cols + dx] += probs.T
            count[dy, cols + dx] += 1
    progress(len(cols))
