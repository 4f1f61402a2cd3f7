"""The inner loops: one training epoch and scoring a loader, with optional mixed precision."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import time
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tilepipe.ml.metrics import confusion

Precision = Literal["fp32", "bf16", "amp"]


def pick_device(precision: Precision) -> torch.device:
    """CUDA when asked for AMP and present, else the CPU."""
    return torch.device("cuda" if precision == "amp" and torch.cuda.is_available() else "cpu")


@functools.cache
def native_bf16(device_type: str) -> bool:
    """True unless this is a CPU without native bf16 (AVX512-BF16 / AMX), where oneDNN emulates it.

    Emulated bf16 makes a training step several times slower than fp32, so bf16 then runs as fp32.
    """
    return device_type != "cpu" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _channels_last(device: torch.device, precision: Precision) -> bool:
    """channels_last (NHWC) on the CPU, fp32 or bf16: oneDNN convolutions then skip a reorder per call."""
    return device.type == "cpu" or precision == "bf16"


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the OS after every step.

    A training step frees and re-allocates tens of MB of activations; by default glibc unmaps or
    trims such blocks, and the next step faults them in again, zeroed: 20-35 thousand page faults
    per step of the default model here, and 10-25% of its time. Memory stays at the step's peak,
    which it reaches every step anyway. Linux/glibc only; returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU, fp16 AMP on CUDA, or nothing for fp32."""
    if precision == "bf16" and native_bf16(device.type):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """Move a model to its device, channels_last on CPUs (see ``_channels_last``)."""
    model = model.to(device)
    if precision == "bf16" and not native_bf16(device.type):
        print("tilepipe: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 runs as fp32", flush=True)
    return model.to(memory_format=torch.channels_last) if _channels_last(device, precision) else model


def _inputs(x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if x.dim() == 4 and _channels_last(device, precision):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward and one optimiser step, through the gradient scaler when there is one (amp)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def epoch_stats(total_loss: float, seen: int, seconds: float) -> dict[str, float]:
    """An epoch's mean training loss, tiles seen, seconds and tiles/s."""
    return {
        "train_loss": total_loss / max(seen, 1),
        "tiles_seen": seen,
        "train_seconds": seconds,
        "tiles_per_second": seen / max(seconds, 1e-9),
    }


def train_epoch(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision,
    desc: str,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, tiles seen, seconds and tiles/s."""
    model.train()
    total_loss, seen = 0.0, 0
    started = time.perf_counter()
    bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())
    for x, y in loader:
        x, y = _inputs(x, device, precision), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = loss_fn(model(x), y)
        optimizer_step(loss, optimizer, scaler)
        total_loss += float(loss.detach()) * len(x)
        seen += len(x)
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", tiles_s=f"{seen / max(elapsed, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - started
    return epoch_stats(total_loss, seen, seconds)


@torch.no_grad()
def predict_batches(
    model: nn.Module, loader, device: torch.device, precision: Precision
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (logits as float32, targets) per batch in eval mode."""
    model.eval()
    for x, y in loader:
        with autocast(device, precision):
            logits = model(_inputs(x, device, precision))
        yield logits.float().cpu(), y


def score(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    n_classes: int,
    device: torch.device,
    precision: Precision,
) -> tuple[np.ndarray, float]:
    """Confusion matrix and mean loss of ``model`` over ``loader`` (tiles or pixels)."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    total, count = 0.0, 0
    for logits, y in predict_batches(model, loader, device, precision):
        total += float(loss_fn(logits, y)) * len(y)
        count += len(y)
        cm += confusion(y.numpy(), logits.argmax(dim=1).numpy(), n_classes)
    return cm, total / max(count, 1)
