"""Shared benchmark helpers: big test scenes written by windows, peak RSS of a child process."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from tilepipe.fsutil import write_text

WORK = Path(__file__).resolve().parent / ".work"
ROOT = Path(__file__).resolve().parents[1]
# CPU features that decide which kernels torch, oneDNN and ONNX Runtime can use
EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def make_scene(path: Path, size: int, bands: int = 3, seed: int = 0, block: int = 512) -> Path:
    """A size x size uint8 scene (tiled, DEFLATE) with smooth structure and noise, written by strips."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.tif")
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": bands,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 5000000, 1.0, 1.0),
        "nodata": 0,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
        "NUM_THREADS": "ALL_CPUS",
    }
    rng = np.random.default_rng(seed)
    x = np.arange(size, dtype=np.float32)
    with rasterio.open(tmp, "w", **profile) as dst:
        for b in range(bands):
            dst.set_band_description(b + 1, ("red", "green", "blue", "nir")[b])
        for row in range(0, size, block):
            h = min(block, size - row)
            y = np.arange(row, row + h, dtype=np.float32)[:, None]
            base = 120 + 60 * np.sin(x[None, :] / 97.0) * np.cos(y / 131.0)
            strip = np.empty((bands, h, size), dtype=np.uint8)
            for b in range(bands):
                noise = rng.integers(0, 24, size=(h, size), dtype=np.uint8)
                strip[b] = np.clip(base + 10 * b, 1, 230).astype(np.uint8) + noise
            dst.write(strip, window=Window(0, row, size, h))
    tmp.rename(path)
    return path


def make_flat_scene(path: Path, size: int, diagonal: int | None = None, block: int = 512) -> Path:
    """A cheap, highly compressible size x size uint8 RGB scene: 64 px squares of a few values.

    With ``diagonal``, only a band of that many px around the main diagonal is valid (the rest is
    nodata): every row and column still holds data, but a model has little to run on.
    """
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.tif")
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 1.0, 1.0), "nodata": 0,
        "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
        "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS",
    }  # fmt: skip
    x = np.arange(size)
    with rasterio.open(tmp, "w", **profile) as dst:
        for b in range(3):
            dst.set_band_description(b + 1, ("red", "green", "blue")[b])
        for row in range(0, size, block):
            y = np.arange(row, min(row + block, size))[:, None]
            base = (40 + 30 * ((x[None, :] // 64 + y // 64) % 5)).astype(np.uint8)
            if diagonal is not None:
                base[np.abs(x[None, :] - y) > diagonal // 2] = 0
            strip = np.stack([base + 10 * b * (base > 0) for b in range(3)]).astype(np.uint8)
            dst.write(strip, window=Window(0, row, size, len(y)))
    tmp.rename(path)
    return path


def make_labels(path: Path, size: int, factor: int = 4) -> Path:
    """A coarser label raster (class values 1..5 in bands of columns) covering a scene."""
    if path.is_file():
        return path
    n = size // factor
    cls = ((np.arange(n)[None, :] * 5 // n) + 1).astype(np.uint8).repeat(n, axis=0)
    profile = {
        "driver": "GTiff",
        "width": n,
        "height": n,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500000, 5000000, float(factor), float(factor)),
        "nodata": 0,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(cls[None])
    return path


class Measured(NamedTuple):
    """What a benchmark child process took: wall and CPU seconds, peak RSS, and what it printed."""

    seconds: float
    rss_mb: float
    stdout: str
    cpu_seconds: float


# The child reports its own high-water RSS (VmHWM of its address space) on exit. The rusage of
# wait4 cannot be used: Linux carries the RSS peak of the process that called exec over into the
# new program's ru_maxrss, so every child would report at least this (large) parent's peak.
_PEAK_PROBE = """
import atexit as _atexit, sys as _sys
def _report_peak():
    for _line in open("/proc/self/status"):
        if _line.startswith("VmHWM:"):
            _sys.stderr.write("\\n__peak_rss_kb__ " + _line.split()[1] + "\\n")
_atexit.register(_report_peak)
"""


def run_measured(
    code: str, env: dict | None = None, python: str | Path = sys.executable, cwd: Path = ROOT
) -> Measured:
    """Run python code in a fresh process; returns wall seconds, its own peak RSS in MB, stdout, CPU s.

    The peak is the child's own address space (not its subprocesses': tile workers report apart).
    Dirty pages are flushed first, so writeback of what was just generated (GBs of scenes and
    tiles) does not run beside the child (a data-path run right after building the default data
    measured 10.5% overhead, the same measurement alone -1.5%).
    """
    os.sync()
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), "-c", _PEAK_PROBE + code],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{out}\n{err}")
    peaks = [line.split()[1] for line in err.splitlines() if line.startswith("__peak_rss_kb__ ")]
    rss_mb = int(peaks[-1]) / 1024 if peaks else float("nan")
    return Measured(seconds, rss_mb, out, _children_cpu() - cpu_before)


def _children_cpu() -> float:
    """CPU seconds of every child reaped so far (RUSAGE_CHILDREN is cumulative)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    for line in lines:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine() -> dict:
    """The machine's description recorded beside every figure: CPU, cores, memory, library versions."""
    import mlflow
    import prefect
    import torch

    from benchmarks.report import machine_id

    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    described = {
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "cpu_extensions": " ".join(f for f in EXTENSIONS if f in flags) or "none of note",
        "hypervisor": "yes (a VM)" if "hypervisor" in flags else "none seen",
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "dask": _version("dask"),
        "mlflow": mlflow.__version__,
        "prefect": prefect.__version__,
    }
    return {"id": os.environ.get("BENCH_MACHINE_ID") or machine_id(described), **described}


def commit() -> str:
    """The checkout's commit (short), ``-dirty`` when tracked files differ from it."""
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def load() -> dict:
    """The machine's load averages (1, 5, 15 min) when a measurement starts: over 0.5 means contention."""
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}


def save(results: dict, path: Path) -> None:
    """Write a machine's results file (atomically: a killed run leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=1) + "\n")
