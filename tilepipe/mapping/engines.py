"""Inference engines for full-scene maps: torch (the reference) or ONNX Runtime, with torch as fallback.

``engine_model(model, "onnxruntime")`` returns a module that runs the model's forward pass in an
ONNX Runtime CPU session instead of torch: the same inputs (float32 NCHW in [0, 1]), the same
logits to float32 precision, so ``mapping.blend`` and ``predict_scene`` use it unchanged. The model
is exported with torch.onnx's torch.export-based exporter on the first batch of each window shape
(the batch axis is dynamic; a U-Net sees a second shape only on scenes smaller than a window) into
a temporary folder, and run with as many intra-op threads as torch has.

Measured by ``make bench`` (benchmarks/engines.py, docs/benchmarks.md): on the 2-core development
machine ONNX Runtime gave the same maps (argmax identical everywhere, probabilities within 1e-7)
about 1.8-2.2x faster than torch eager on one thread for ``small_cnn``, ``resnet18`` and ``unet``
(measured with other jobs on the cores).
When ONNX Runtime is not installed, or the export or the session fails, the map is made by torch
and :func:`engine_model` says so in one line: torch stays the reference and the fallback.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tilepipe.fsutil import atomic_path

ENGINES = ("torch", "onnxruntime")


class OnnxRuntimeModel(nn.Module):
    """A model's forward pass in ONNX Runtime sessions, one per input shape (batch axis dynamic)."""

    def __init__(self, model: nn.Module, cache: tuple[Path | str, str] | None = None) -> None:
        super().__init__()
        self.reference = [model.eval()]  # a list: not registered as a submodule, never exported twice
        # (folder, the model file's SHA-256): exports kept for the next process; without it, a
        # temporary folder of this object's own (removed with it) under a name of its own
        self.temporary = tempfile.TemporaryDirectory(prefix="tilepipe-onnx-") if cache is None else None
        folder, key = (self.temporary.name, "model") if cache is None else cache
        self.cache = (Path(folder), key)
        self.sessions: dict[tuple[int, ...], Any] = {}
        self.fallback = False  # set when a session could not be made: torch maps the rest
        self.exporting = threading.Lock()  # scenes mapped on threads at once share the sessions

    @property
    def engine_name(self) -> str:
        """The engine that runs the forward passes now."""
        return "torch" if self.fallback else "onnxruntime"

    def session(self, x: torch.Tensor) -> Any:
        """The session for this input's channels, height and width (exported on first use)."""
        shape = tuple(x.shape[1:])
        with self.exporting:
            if shape not in self.sessions:
                self.sessions[shape] = self._export(x, shape)
            return self.sessions[shape]

    def _export(self, x: torch.Tensor, shape: tuple[int, ...]) -> Any:
        """Export the model for this window shape and open an ONNX Runtime session on it."""
        import onnxruntime as ort

        folder, key = self.cache
        path = folder / f"{key}-{_versions()}-model-{'x'.join(map(str, shape))}.onnx"
        if not path.is_file():
            with atomic_path(path) as partial:  # whole or not at all, for the next process
                self._write_onnx(x, partial)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # no spinning between runs: the reads and the blend run on the same cores right after each batch
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _write_onnx(self, x: torch.Tensor, path: Path) -> None:
        """The model exported to one ONNX file (weights inside), the batch axis dynamic."""
        batch = torch.export.Dim("batch", min=1, max=4096)
        with _quiet_export():
            torch.onnx.export(
                self.reference[0], (x[:1].contiguous(),), str(path), input_names=["x"],
                output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                external_data=False,
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the batch, as torch would give them (by torch itself once ONNX Runtime failed)."""
        if not self.fallback:
            try:
                session = self.session(x)
            except Exception as exc:  # noqa: BLE001 - the optional engine failing falls back to torch
                _say_fallback(exc)
                self.fallback = True
            else:
                return torch.from_numpy(session.run(None, {"x": x.detach().contiguous().numpy()})[0])
        return self.reference[0](x)


@contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter's notes (torchvision ops it skips, deprecations of torch's own) are not the user's."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _versions() -> str:
    """The versions of torch and ONNX Runtime: another exporter or runtime exports again."""
    import onnxruntime as ort

    return f"torch{torch.__version__}-ort{ort.__version__}".replace("+", "_")


def _say_fallback(exc: BaseException) -> None:
    reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    print(f"map engine: onnxruntime unavailable ({reason}); mapping with torch", file=sys.stderr)


def engine_model(
    model: nn.Module,
    engine: str,
    example: torch.Tensor | None = None,
    cache: tuple[Path | str, str] | None = None,
) -> nn.Module:
    """``model`` run by ``engine`` ("torch" or "onnxruntime"); torch, said in one line, when that fails.

    ``example``: a batch of the windows to come, to export and check the session at once (else
    the first batch does). ``cache``: (a folder, the model file's SHA-256): each export is kept
    there, named by that SHA-256, the window shape and the torch and ONNX Runtime versions, and
    the next process loads it instead of exporting again (several seconds each).
    """
    if engine not in ENGINES:
        raise ValueError(f"inference engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "torch":
        return model
    wrapped = OnnxRuntimeModel(model, cache)
    if example is not None:
        with torch.no_grad():
            wrapped(example)
    return model if wrapped.fallback else wrapped
