"""Fine-tuning from pretrained weights: the first convolution fitted to the model, the body held still.

``adapt_first_conv``: a pretrained first convolution whose bands or kernel differ from the model's is
fitted to it. Its kernel is resampled by area (each pretrained tap spread over the new taps it
overlaps), so each kernel's sum, its response to a flat patch, is unchanged. Its input channels
are matched to the model's ``bands.input`` by name (a 3-channel network's are red, green, blue; a
13-channel one's Sentinel-2's B01-B12 with B8A, as SSL4EO's): a band it has is copied, any other
starts from the mean of its channels; then every channel is scaled by (its channels / the model's),
so a pixel whose bands are all equal gets about the pretrained response (exactly when no band is
copied: timm's rule for adapting an input convolution).

``frozen_body``: while active (``train.freeze_epochs``), only the head is trained: after each
backward the body's gradients are dropped before the optimiser step (so it neither moves nor decays
nor gathers momentum) and its batch-norm statistics stay as they are. Every parameter still gets a
gradient, so DistributedDataParallel's reduction is unchanged (no ``find_unused_parameters``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tilepipe.geo.bands import SENSOR_BANDS

FIRST_CONV = {"small_cnn": "features.0.0.weight", "resnet18": "stem.0.weight", "unet": "down.0.0.0.weight"}
# what trains while the body is frozen: the classifier head; for the U-Net its decoder and head
HEAD = {"small_cnn": ("head.",), "resnet18": ("head.",), "unet": ("up.", "merge.", "head.")}
RGB = ["red", "green", "blue"]
SENTINEL2_ALL = list(SENSOR_BANDS["sentinel-2"].values())  # B01 ... B08, B8A, B09 ... B12: SSL4EO's 13


def resnet_bands(channels: int) -> list[str] | None:
    """The bands of a ResNet-18's input channels: RGB (ImageNet, 3), Sentinel-2 (SSL4EO, 13), else None."""
    return {3: RGB, 13: SENTINEL2_ALL}.get(channels)


def adapt_first_conv(
    weight: torch.Tensor, source: list[str] | None, bands: list[str], shape: tuple[int, ...]
) -> tuple[torch.Tensor, str]:
    """A first-conv weight fitted to ``shape`` (out, bands, k, k) and the model's bands; and what was done."""
    done = []
    w = weight.float()
    (kh, kw), (sh, sw) = shape[2:], w.shape[2:]
    if (sh, sw) != (kh, kw):
        w = torch.einsum("ia,ocab,jb->ocij", _area(sh, kh), w, _area(sw, kw))
        done.append(f"{sh}x{sw} -> {kh}x{kw} kernel")
    names = [n.lower() for n in source] if source and len(source) == w.shape[1] else None
    if names != list(bands):
        mean = w.mean(dim=1)
        copied = [b for b in bands if names and b in names]
        channels = [w[:, names.index(b)] if b in copied else mean for b in bands]  # type: ignore[union-attr]
        ratio = w.shape[1] / len(bands)
        w = torch.stack(channels, dim=1) * ratio
        done.insert(
            0,
            f"{weight.shape[1]} -> {len(bands)} bands ({', '.join(copied) or 'none'} copied by name, "
            f"the rest their mean; x{ratio:.3g})",
        )
    return w.to(weight.dtype).contiguous(), ", ".join(done)


def _area(source: int, target: int) -> torch.Tensor:
    """(target, source): how much of each source tap lies in each target tap (both spanning the kernel).

    Each column sums to 1: every pretrained tap is spread over the new taps it overlaps, whole.
    """
    edges = torch.linspace(0, source, target + 1)
    taps = torch.arange(source, dtype=torch.float32)
    low = torch.maximum(edges[:-1, None], taps[None])
    high = torch.minimum(edges[1:, None], taps[None] + 1)
    return (high - low).clamp_min(0)


def _in_head(name: str, model: str) -> bool:
    return (name + ".").startswith(HEAD[model])


@contextmanager
def frozen_body(net: nn.Module, model: str, optimizer: torch.optim.Optimizer, active: bool) -> Iterator[None]:
    """While active, steps of ``optimizer`` train only the head of ``net``; batch norm in the body holds."""
    if not active:
        yield
        return
    body = [p for name, p in net.named_parameters() if not _in_head(name, model)]
    norms = [m for name, m in net.named_modules() if name and not _in_head(name, model) and _is_norm(m)]

    def drop_body_grads(*_: object) -> None:
        for p in body:
            p.grad = None

    def hold_statistics(*_: object) -> None:
        for m in norms:
            m.eval()

    handles = [
        optimizer.register_step_pre_hook(drop_body_grads),
        net.register_forward_pre_hook(hold_statistics),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
