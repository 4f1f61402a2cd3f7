"""Model-only map throughput of torch eager, torch.compile and ONNX Runtime, and whether their maps agree.

For each of ``small_cnn``, ``resnet18`` (tile classifiers: windows of ``tile.size`` px, batches of
``predict.batch_size``, as ``tilepipe predict`` runs them) and ``unet`` (segmentation: windows of
``predict.window`` px, as many per forward pass as ``mapping.blend.FORWARD_PIXELS`` allows), with
``train.width`` of params.yaml, in a fresh process per model: the same windows, already in memory
(no reading, no blending, no writing), through ``mapping.blend``'s softmax of

* ``eager``: torch as ``tilepipe predict`` runs it today (NCHW, ``no_grad``) - the reference;
* ``eager_cl``: the same with model and input in channels_last (as training runs on the CPU);
* ``compile``: ``torch.compile`` (inductor, CPU; its compile time apart);
* ``onnxruntime``: the library's engine (``mapping.engines``: the model exported to ONNX, an ONNX
  Runtime CPU session without spinning, the softmax in numpy), as ``tilepipe map`` runs it.

Each engine runs on one thread and on all cores (torch threads; ONNX Runtime's intra-op threads),
``BENCH_ENGINE_ROUNDS`` times each (default 3), the engines interleaved, and the best run counts:
one thread shows the engines' own work, all cores adds how well each uses them (and, on a shared
machine, how badly each suffers when its threads wait for a descheduled one). Equality with
eager: argmax identical on >= 99.99 % of outputs (pixels of the U-Net,
windows of the classifiers) and softmax probabilities within 1e-4. The weights are the models'
seeded random initialisation with batch-norm statistics set away from their defaults (a trained
model's are not 0 and 1): close class scores make the argmax check harder, not easier.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import run_measured

MODELS = ("small_cnn", "resnet18", "unet")
ENGINES = ("eager", "eager_cl", "compile", "onnxruntime")
WINDOW_COUNT = {"small_cnn": 512, "resnet18": 128, "unet": 8}  # about a second per engine, quiet
AGREE, PROB_TOL, SPEEDUP = 0.9999, 1e-4, 1.3


def _model(name: str, width: int, classes: int, seed: int = 0):
    """The saved form (``Normalized``) of an architecture, seeded, batch-norm statistics perturbed."""
    import torch

    from tilepipe.ml.models import Normalized, build_model

    torch.manual_seed(seed)
    net = build_model(name, 3, classes, width)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return Normalized(net, [0.4, 0.45, 0.5], [0.2, 0.21, 0.22]).eval()


def _onnx(model, example: np.ndarray, folder: Path):
    """A forward callable of the library's ONNX Runtime engine (``mapping.engines``), as maps run it.

    One ``OnnxRuntimeModel`` per thread count (its session takes ``torch.get_num_threads()`` when
    made), the export kept in ``folder`` so the second loads the first's; made and checked now on
    ``example``, so the export is the build time.
    """
    import torch

    from tilepipe.mapping.engines import OnnxRuntimeModel

    engines: dict[int, OnnxRuntimeModel] = {}

    def forward(x):
        threads = torch.get_num_threads()
        if threads not in engines:
            engines[threads] = OnnxRuntimeModel(model, (folder, "bench"))
        logits = engines[threads](x)
        if engines[threads].fallback:
            raise RuntimeError("ONNX Runtime could not run the model (see the line above)")
        return logits

    with torch.no_grad():
        forward(torch.from_numpy(example))
    return forward


def _softmax_of(forward, batches: list[np.ndarray], step: int, engine: str) -> np.ndarray:
    """``mapping.blend._softmax`` with any forward callable (logits of a torch tensor)."""
    import torch

    from tilepipe.mapping.blend import class_softmax

    parts = []
    with torch.no_grad():
        for batch in batches:
            for start in range(0, len(batch), step):
                logits = forward(torch.from_numpy(batch[start : start + step])).float()
                parts.append(class_softmax(logits, "onnxruntime" if engine == "onnxruntime" else "torch"))
    return np.concatenate(parts)


def _engines(model, example: np.ndarray, folder: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """Each engine's forward callable, and the seconds it took to make it (export, compile)."""
    import torch

    made, seconds = {"eager": model}, {}
    cl = _model_copy(model).to(memory_format=torch.channels_last)

    def eager_cl(x):
        return cl(x.contiguous(memory_format=torch.channels_last))

    made["eager_cl"] = eager_cl
    builders = {
        "compile": lambda: _compiled(model, example),
        "onnxruntime": lambda: _onnx(model, example, folder),
    }
    for name, build in builders.items():
        started = time.perf_counter()
        try:
            made[name] = build()
        except Exception as exc:  # noqa: BLE001 - an engine that does not work here is a finding
            made[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        seconds[name] = round(time.perf_counter() - started, 2)
    return made, seconds


def _model_copy(model):
    import copy

    return copy.deepcopy(model)


def _compiled(model, example: np.ndarray):
    """``torch.compile`` of the model, compiled (and checked to run) on one batch of the real shape."""
    import torch

    compiled = torch.compile(_model_copy(model), dynamic=False)
    with torch.no_grad():
        compiled(torch.from_numpy(example))
    return compiled


def measure(name: str, rounds: int) -> dict[str, Any]:
    """Windows/s of every engine on 1 thread and on all cores for one model; its agreement with eager."""
    import torch

    from tilepipe.mapping.blend import FORWARD_PIXELS
    from tilepipe.params import load_params

    params = load_params("params.yaml")
    size = params.predict.window if name == "unet" else params.tile.size
    step = max(1, FORWARD_PIXELS // (size * size))
    model = _model(name, params.train.width, len(params.data.classes))
    windows = np.random.default_rng(0).random((WINDOW_COUNT[name], 3, size, size), dtype=np.float32)
    batch = params.predict.batch_size
    batches = [windows[i : i + batch] for i in range(0, len(windows), batch)]
    out: dict[str, Any] = {"windows": len(windows), "window_px": size, "per_forward": min(step, batch)}
    with tempfile.TemporaryDirectory() as folder:
        made, build_s = _engines(model, windows[: min(step, batch)], Path(folder))
        usable = {k: f for k, f in made.items() if not isinstance(f, str)}
        out.update({f"{k}_error": f for k, f in made.items() if isinstance(f, str)})
        out.update({f"{k}_build_s": s for k, s in build_s.items() if k in usable})
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {k: [] for k in usable}
            outputs = {k: _softmax_of(f, batches[:2], step, k) for k, f in usable.items()}  # warm-up
            for _ in range(rounds):
                for engine, forward in usable.items():
                    started = time.perf_counter()
                    outputs[engine] = _softmax_of(forward, batches, step, engine)
                    times[engine].append(time.perf_counter() - started)
            _figures(out, f"t{threads}", len(windows) * size * size, times, outputs)
    return out


def _figures(out: dict[str, Any], tag: str, pixels: int, times: dict, outputs: dict) -> None:
    """Per engine at one thread count: windows/s, Mpx/s, speed over eager; the worst agreement so far."""
    reference, eager = outputs["eager"], min(times["eager"])
    for engine, runs in times.items():
        best = min(runs)
        out[f"{engine}_{tag}_windows_s"] = round(out["windows"] / best, 1)
        out[f"{engine}_{tag}_mpx_s"] = round(pixels / best / 1e6, 3)
        out[f"{engine}_{tag}_vs_eager"] = round(eager / best, 3)
        out[f"{engine}_{tag}_runs_s"] = [round(t, 3) for t in runs]
        if engine == "eager":
            continue
        probs = outputs[engine]
        agree = float(np.mean(probs.argmax(axis=1) == reference.argmax(axis=1)))
        diff = float(np.abs(probs - reference).max())
        out[f"{engine}_argmax_agree"] = min(agree, out.get(f"{engine}_argmax_agree", 1.0))
        out[f"{engine}_max_prob_diff"] = max(diff, out.get(f"{engine}_max_prob_diff", 0.0))


def _verdicts(name: str, one: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Flatten one model's figures under ``<model>_``; targets; the engine a map would use.

    An engine qualifies when it is >= 1.3x eager on all cores and on one thread, and equal.
    """
    def kept(key: str) -> bool:  # eager's own speed-up over itself and its Mpx/s say nothing new
        if key.endswith("_runs_s"):
            return False
        return not key.startswith("eager_t") or key.endswith("_windows_s")

    flat = {f"{name}_{k}": v for k, v in one.items() if kept(k)}
    targets, passing = {}, []
    tags = sorted({k.split("_")[-3] for k in one if k.endswith("_vs_eager")})
    for engine in ENGINES[1:]:
        if f"{engine}_argmax_agree" not in one:
            continue
        speed = [one[f"{engine}_{t}_vs_eager"] for t in tags]
        targets.update({f"{name}_{engine}_{t}_vs_eager": f">= {SPEEDUP}" for t in tags})
        targets[f"{name}_{engine}_argmax_agree"] = f">= {AGREE}"
        targets[f"{name}_{engine}_max_prob_diff"] = f"<= {PROB_TOL:.4f}"
        same = one[f"{engine}_argmax_agree"] >= AGREE and one[f"{engine}_max_prob_diff"] <= PROB_TOL
        if same and min(speed) >= SPEEDUP:
            passing.append((min(speed), engine))
    flat[f"{name}_engine_for_maps"] = max(passing)[1] if passing else "eager"
    return flat, targets


def run() -> dict[str, Any]:
    """Every model in its own process; the figures, targets and the engine each would map with."""
    rounds = max(1, int(os.environ.get("BENCH_ENGINE_ROUNDS", "3")))
    results: dict[str, Any] = {"threads": os.cpu_count(), "targets": {}, "runs_s": {}}
    for name in MODELS:
        child = run_measured(
            "import json\nfrom benchmarks.engines import measure\n"
            f"print(json.dumps(measure({name!r}, {rounds})))"
        )
        one = json.loads(child.stdout.strip().splitlines()[-1])
        flat, targets = _verdicts(name, one)
        results.update(flat)
        results[f"{name}_peak_rss_mb"] = round(child.rss_mb, 1)
        results["targets"].update(targets)
        results["runs_s"][name] = {k: v for k, v in one.items() if k.endswith("_runs_s")}
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
