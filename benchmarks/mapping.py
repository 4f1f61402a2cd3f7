"""Where the time of many scenes mapped in one process goes: end-to-end megapixels/s against the model alone.

``mapping.predict``'s ``predict_scene`` (what ``tilepipe map`` runs per scene; ``maps`` measures
the command itself) called once per scene in one process (the model loaded once). The default
model (``small_cnn``, width of params.yaml, seeded weights; tile classification, 64 px windows at
every 32 px cell, batch ``predict.batch_size``) maps ``BENCH_MAP_SCENES`` (default 20) scenes of
1536-3072 px (3-band uint8 DEFLATE GeoTIFFs), with torch eager and with ONNX Runtime
(``mapping.engines``; its export timed apart).

Model-only time is the time inside the model's forward calls during the run: the same windows,
already in memory, no reading, blending or writing. The rest is split by timing, in the same run,
the scene reads (``SceneView.read``: decoding and scaling), the map writer (``MapWriter.add``)
and the COG conversion (``write_cog``); what is left is the blend (softmax, accumulation, argmax)
and the per-scene set-up. The fixed cost per scene: the same loop over 20, then 500 scenes of
128 px (9 windows each), mean milliseconds per scene.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, make_scene, run_measured

SIZES = (1536, 2048, 2560, 3072)


def _timed(timers: dict[str, float], key: str, fn):
    """``fn`` adding its wall time to ``timers[key]``."""

    def wrapped(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timers[key] = timers.get(key, 0.0) + time.perf_counter() - started

    return wrapped


def measure(scenes: list[str], engine: str) -> dict[str, Any]:
    """Map every scene with ``predict_scene``; total, model, read, write and COG seconds."""
    import rasterio
    import torch

    from benchmarks.engines import _model
    from tilepipe.mapping import predict, scene, writer
    from tilepipe.mapping.engines import engine_model
    from tilepipe.ml.checkpoint import ModelMeta
    from tilepipe.params import load_params

    params = load_params("params.yaml")
    names = [c.name for c in params.data.classes]
    meta = ModelMeta(task="classification", model="small_cnn", width=params.train.width,
                     bands=["red", "green", "blue"], scale={"uint8": [0, 255]}, classes=names,
                     tile_size=params.tile.size)  # fmt: skip
    timers: dict[str, float] = {}
    started = time.perf_counter()
    example = torch.rand(params.predict.batch_size, 3, params.tile.size, params.tile.size)
    model = engine_model(_model("small_cnn", params.train.width, len(names)), engine, example)
    timers["engine_build"] = time.perf_counter() - started
    model.forward = _timed(timers, "model", model.forward)
    scene.SceneView.read = _timed(timers, "read", scene.SceneView.read)
    writer.MapWriter.add = _timed(timers, "write", writer.MapWriter.add)
    predict.write_cog = _timed(timers, "cog", predict.write_cog)
    out = WORK / "mapping" / f"out-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    pixels = windows = 0
    started = time.perf_counter()
    per_scene = []
    for path in scenes:
        one = time.perf_counter()
        summary = predict.predict_scene(params, model, meta, path, out / Path(path).name)
        per_scene.append(time.perf_counter() - one)
        windows += summary["windows"]
        with rasterio.open(path) as src:
            pixels += src.width * src.height
    timers["total"] = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    used = type(model).__name__  # OnnxRuntimeModel, or the torch module when ONNX Runtime fell back
    return {"timers": timers, "pixels": pixels, "windows": windows, "per_scene_s": per_scene, "ran_by": used}


def _child(scenes: list[Path], engine: str) -> dict[str, Any]:
    code = (
        "import json, sys\nfrom benchmarks.mapping import measure\n"
        f"print(json.dumps(measure({[str(s) for s in scenes]!r}, {engine!r})))"
    )
    child = run_measured(code, env={"TQDM_DISABLE": "1"})
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(child.rss_mb, 1)
    return result


def _figures(tag: str, run: dict[str, Any]) -> dict[str, Any]:
    t = run["timers"]
    total, model = t["total"], t.get("model", 0.0)
    rest = total - model - t.get("read", 0) - t.get("write", 0) - t.get("cog", 0)
    mpx = run["pixels"] / 1e6
    return {
        f"{tag}_end_to_end_mpx_s": round(mpx / total, 3),
        f"{tag}_model_only_mpx_s": round(mpx / model, 3) if model else None,
        f"{tag}_end_to_end_vs_model_only": round(model / total, 3),
        f"{tag}_share_model": round(model / total, 3),
        f"{tag}_share_read": round(t.get("read", 0) / total, 3),
        f"{tag}_share_write": round(t.get("write", 0) / total, 3),
        f"{tag}_share_cog": round(t.get("cog", 0) / total, 3),
        f"{tag}_share_blend_and_setup": round(rest / total, 3),
        f"{tag}_engine_build_s": round(t["engine_build"], 2),
        f"{tag}_peak_rss_mb": run["peak_rss_mb"],
        f"{tag}_ran_by": run["ran_by"],
    }


def run() -> dict[str, Any]:
    """End-to-end vs model-only over many scenes (torch, ONNX Runtime); the fixed cost per scene."""
    count = int(os.environ.get("BENCH_MAP_SCENES", "20"))
    folder = WORK / "mapping"
    scenes = [make_scene(folder / f"s{i:03d}.tif", SIZES[i % len(SIZES)], seed=i) for i in range(count)]
    tiny = [make_scene(folder / f"tiny{i:03d}.tif", 128, seed=i, block=128) for i in range(500)]
    torch_run, onnx_run = _child(scenes, "torch"), _child(scenes, "onnxruntime")
    few, many = _child(tiny[:20], "torch"), _child(tiny, "torch")
    few_ms = 1000 * sum(few["per_scene_s"]) / 20
    many_ms = 1000 * sum(many["per_scene_s"]) / len(tiny)
    return {
        "scenes": count,
        "megapixels": round(torch_run["pixels"] / 1e6, 1),
        "windows": torch_run["windows"],
        **_figures("torch", torch_run),
        **_figures("onnxruntime", onnx_run),
        "per_scene_ms_20": round(few_ms, 1),
        "per_scene_ms_500": round(many_ms, 1),
        "per_scene_500_vs_20": round(many_ms / few_ms, 3),
        "targets": {
            "torch_end_to_end_vs_model_only": ">= 0.6",
            "onnxruntime_end_to_end_vs_model_only": ">= 0.6",
            "per_scene_500_vs_20": "<= 1.1",
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
