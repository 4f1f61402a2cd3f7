"""Pretrained weights from a local file (``train.init: PATH[#sha256=HEX]``), mapped onto tilepipe's models.

Nothing is downloaded. The file is a PyTorch state dict or a checkpoint holding one (``state_dict``,
``model``, ``model_state_dict``, ...: Lightning, timm, MoCo), read with ``weights_only=True``. Two
layouts are understood:

- **ResNet-18** as torchvision and timm name it (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
  ``downsample``, ``fc``; TorchGeo's SSL4EO weights are timm's), under any prefix (``model.``,
  ``backbone.``, ``module.encoder_q.``): onto ``resnet18`` (stem, blocks, shortcuts) or the U-Net's
  encoder (docs/pretrained.md has the table);
- **tilepipe**: a ``model.pt`` of this pipeline (or its bare ``state_dict``), onto the same architecture.

The first convolution is adapted to the model's bands and kernel (tilepipe/ml/finetune.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilepipe.errors import TilepipeError
from tilepipe.fsutil import file_sha256, input_problem
from tilepipe.ml.finetune import FIRST_CONV, adapt_first_conv, resnet_bands
from tilepipe.params import Params

INIT_SPEC = re.compile(r"(?P<path>.+?)(?:#sha256=(?P<sha>[0-9a-fA-F]{64}))?")
CONTAINERS = ("state_dict", "model_state_dict", "model", "net", "module", "weights")
RESNET_KEY = re.compile(
    r"conv1\.weight|bn1\.\w+|fc\..+"
    r"|layer[1-4]\.[01]\.(?:conv[12]\.weight|bn[12]\.\w+|downsample\.[01]\.\w+)"
)
# the U-Net's encoder from a ResNet-18: (ResNet conv, ResNet bn) -> tilepipe conv-BN block
_UNET_FROM_RESNET = {
    "down.0.0": ("conv1", "bn1"),
    "down.0.1": ("layer1.0.conv1", "layer1.0.bn1"),
    "down.1.0": ("layer2.0.conv1", "layer2.0.bn1"),
    "down.1.1": ("layer2.0.conv2", "layer2.0.bn2"),
    "down.2.0": ("layer3.0.conv1", "layer3.0.bn1"),
    "down.2.1": ("layer3.0.conv2", "layer3.0.bn2"),
    "bottom.0": ("layer4.0.conv1", "layer4.0.bn1"),
    "bottom.1": ("layer4.0.conv2", "layer4.0.bn2"),
}


@dataclass(frozen=True)
class InitSpec:
    """``train.init`` parsed: the file, and the SHA-256 it must have (or None)."""

    path: Path
    sha256: str | None

    @classmethod
    def parse(cls, text: str) -> InitSpec:
        """``PATH`` or ``PATH#sha256=HEX``."""
        match = INIT_SPEC.fullmatch(text.strip())
        if match is None:
            raise TilepipeError(f"train.init {text!r}: expected PATH or PATH#sha256=<64 hex digits>")
        sha = match["sha"].lower() if match["sha"] else None
        return cls(Path(match["path"]), sha)


@dataclass
class InitReport:
    """What loading the init file did, for the one-line report and the lineage."""

    file: str
    sha256: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    first_conv: str = ""

    def line(self) -> str:
        """``train.init FILE (sha256 ...): LAYOUT: N loaded, N missing (...), N unexpected (...)``."""

        def listed(names: list[str]) -> str:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            return f" ({shown})" if names else ""

        return (
            f"train.init {self.file} (sha256 {self.sha256[:12]}): {self.layout}: "
            f"{len(self.loaded)} loaded, {len(self.missing)} missing{listed(self.missing)}, "
            f"{len(self.unexpected)} unexpected{listed(self.unexpected)}"
            + (f"; first conv {self.first_conv}" if self.first_conv else "")
        )


def checked_file(spec: InitSpec) -> str:
    """The init file's SHA-256, after checking that it exists and matches the pinned hash."""
    if problem := input_problem(spec.path, missing="file not found (train.init reads a local file only)"):
        raise TilepipeError(f"train.init {spec.path}: {problem}")
    digest = file_sha256(spec.path)
    if spec.sha256 is not None and digest != spec.sha256:
        raise TilepipeError(f"train.init {spec.path}: SHA-256 is {digest}, not the {spec.sha256} pinned")
    return digest


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's state dict (out of a checkpoint's container if need be) and a tilepipe meta, if any."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TilepipeError(
            f"train.init {path}: not loadable as weights with weights_only=True ({problem[:200]})"
        ) from None
    meta = blob.get("meta") if isinstance(blob, dict) and isinstance(blob.get("meta"), dict) else None
    for _ in range(3):  # a state dict inside a checkpoint inside a wrapper
        if isinstance(blob, dict) and not _tensors(blob):
            inner = next((blob[k] for k in CONTAINERS if isinstance(blob.get(k), dict)), None)
            if inner is None:
                break
            blob = inner
    if not isinstance(blob, dict) or not _tensors(blob):
        raise TilepipeError(f"train.init {path}: holds no state dict (a mapping of names to tensors)")
    return {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}, meta


def _tensors(blob: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in blob.values())


def initialise(params: Params, net: nn.Module, show: bool = True) -> dict[str, str] | None:
    """Load ``train.init`` (if set) into a fresh ``net``; print the report line; the lineage for the meta."""
    tp = params.train
    if not tp.init:
        return None
    report = load_init(net, tp.model, params.bands.input, params.data.class_names, tp.init)
    if show:
        print(report.line(), flush=True)
    return {"init": report.file, "init_sha256": report.sha256}


def load_init(net: nn.Module, model: str, bands: list[str], classes: list[str], text: str) -> InitReport:
    """Load ``train.init`` into ``net`` (a fresh ``build_model``); one-line errors; the report."""
    spec = InitSpec.parse(text)
    digest = checked_file(spec)
    state, meta = read_state(spec.path)
    target = net.state_dict()
    report = InitReport(spec.path.name, digest, "")
    if meta and meta.get("model", model) != model:
        raise TilepipeError(f"train.init {spec.path}: a tilepipe {meta['model']} model, not {model}")
    own = _tilepipe_state(state, target, model)
    if own is not None:
        mapped, unexpected = own
        report.layout = f"tilepipe {model}"
        source_bands = list(meta["bands"]) if meta and meta.get("bands") else None
        if not (meta and list(meta.get("classes", [])) == list(classes)):
            unexpected += [k for k in mapped if k.startswith("head.")]
            mapped = {k: v for k, v in mapped.items() if not k.startswith("head.")}
    else:
        prefix = _resnet_prefix(state, spec.path)
        mapped, unexpected = _from_resnet(state, prefix, model, spec.path)
        report.layout = "ResNet-18 (torchvision/timm/TorchGeo)" + (f" under {prefix!r}" if prefix else "")
        source_bands = resnet_bands(state[prefix + "conv1.weight"].shape[1])
    first = FIRST_CONV[model]
    if first in mapped:
        mapped[first], report.first_conv = adapt_first_conv(
            mapped[first], source_bands, bands, tuple(target[first].shape)
        )
    width = f"{meta['width']}, the file's" if meta and "width" in meta else "64 for a ResNet-18"
    _check_shapes(mapped, target, spec.path, model, width)
    net.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    report.missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    report.unexpected = unexpected
    return report


def _tilepipe_state(state: dict, target: dict, model: str) -> tuple[dict, list[str]] | None:
    """A tilepipe layout (keys of ``target``, maybe under ``net.``): (mapped, unexpected), else None."""
    for prefix in ("net.", ""):
        if prefix + FIRST_CONV[model] in state:
            mapped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if set(mapped) <= set(target):
                return mapped, [k for k in state if not k.startswith(prefix)]
    return None


def _resnet_prefix(state: dict, path: Path) -> str:
    """The prefix of a ResNet-18's stem ``conv1.weight`` (the first in the file); else the one-line error."""
    for key in state:
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if (not prefix or prefix.endswith(".")) and not re.search(r"layer[1-4]\.\d+\.$", prefix):
                return prefix
    first = next(iter(state))
    raise TilepipeError(
        f"train.init {path}: cannot map key {first!r}: not a ResNet-18 (torchvision, timm, TorchGeo) "
        "or tilepipe layout"
    )


def _from_resnet(state: dict, prefix: str, model: str, path: Path) -> tuple[dict, list[str]]:
    """ResNet-18 tensors renamed onto ``model``: (mapped, unexpected); an unknown key is an error."""
    if model not in ("resnet18", "unet"):
        raise TilepipeError(
            f"train.init {path}: ResNet-18 weights map onto train.model resnet18 or unet, not {model}"
        )
    ours = _resnet_names() if model == "resnet18" else _unet_names()
    mapped, unexpected = {}, []
    for key, tensor in state.items():
        if not key.startswith(prefix):
            unexpected.append(key)  # another network in the same file (MoCo's key encoder, a queue)
            continue
        name = key[len(prefix) :]
        if not RESNET_KEY.fullmatch(name):
            raise TilepipeError(
                f"train.init {path}: cannot map key {key!r} onto {model} (not a ResNet-18 key)"
            )
        if name in ours:
            mapped[ours[name]] = tensor
        else:
            unexpected.append(key)
    return mapped, unexpected


def _bn(source: str, target: str) -> dict[str, str]:
    return {f"{source}.{p}": f"{target}.{p}" for p in _BN_PARTS}


_BN_PARTS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _resnet_names() -> dict[str, str]:
    """ResNet-18 key -> tilepipe resnet18 key (stem, blocks 0-7, shortcuts; fc is not mapped)."""
    names = {"conv1.weight": "stem.0.weight", **_bn("bn1", "stem.1")}
    for stage in range(1, 5):
        for block in range(2):
            ours = f"blocks.{2 * (stage - 1) + block}"
            theirs = f"layer{stage}.{block}"
            for i in (1, 2):
                names[f"{theirs}.conv{i}.weight"] = f"{ours}.conv{i}.weight"
                names.update(_bn(f"{theirs}.bn{i}", f"{ours}.bn{i}"))
            if stage > 1 and block == 0:  # where the width and stride change
                names[f"{theirs}.downsample.0.weight"] = f"{ours}.shortcut.0.weight"
                names.update(_bn(f"{theirs}.downsample.1", f"{ours}.shortcut.1"))
    return names


def _unet_names() -> dict[str, str]:
    """ResNet-18 key -> tilepipe U-Net encoder key (``_UNET_FROM_RESNET``)."""
    names = {}
    for ours, (conv, bn) in _UNET_FROM_RESNET.items():
        names[f"{conv}.weight"] = f"{ours}.0.weight"
        names.update(_bn(bn, f"{ours}.1"))
    return names


def _check_shapes(mapped: dict, target: dict, path: Path, model: str, width: str) -> None:
    """Every mapped tensor has the shape the model's parameter has; else one line saying which."""
    for key, tensor in mapped.items():
        want = tuple(target[key].shape)
        if tuple(tensor.shape) != want:
            raise TilepipeError(
                f"train.init {path}: {key} is {list(tensor.shape)} in the file but {list(want)} in {model} "
                f"(train.width must be the pretrained network's: {width})"
            )
