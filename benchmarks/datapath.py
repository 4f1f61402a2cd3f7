"""Data path: training images/s fed from the tile store vs the same batches held in memory.

Both sides run tilepipe's own training step (tilepipe.ml.loops.train_epoch) on the default model, batch
size and data (the built-in scenes, default params, built once under benchmarks/.work/default).
The in-memory side replays batches the store-fed loader produced before, so the tensors are the
same; the two sides alternate step by step.
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path

from benchmarks.common import WORK, run_measured

BUILD = """
from pathlib import Path
from tilepipe.params import load_params
from tilepipe.stages.synthesize import synthesize
from tilepipe.stages.ingest import ingest
from tilepipe.stages.tile import tile
from tilepipe.stages.split import split
root = Path({root!r})
p = load_params("params.yaml")
synthesize(p.synthesize, root / "synthetic")
ingest(p, root / "synthetic" / "catalog.csv", root / "scenes.json")
tile(p, root / "scenes.json", root / "tiles")
split(p, root / "scenes.json", root / "tiles", root / "split.json")
"""


def default_data() -> tuple[Path, Path]:
    """(tiles dir, split.json) of the built-in data with default params; built on first use (~1-2 min)."""
    root = WORK / "default"
    if not (root / "split.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        run_measured(BUILD.format(root=str(root)))
    return root / "tiles", root / "split.json"


class Batches:
    """A loader stand-in: the first ``count`` batches of ``source`` (or a list replayed)."""

    def __init__(self, source, count: int) -> None:
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        # islice stops without pulling one more: the store side's iterator is shared across steps,
        # and a loop that pulled to find the end would gather (and drop) a second batch per step
        yield from islice(self.source, self.count)


class Timed:
    """Wraps a batch source and adds up the seconds spent waiting for its batches."""

    def __init__(self, source) -> None:
        self.source, self.seconds = source, 0.0

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        batches = iter(self.source)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch


def setup(tiles: Path, split_json: Path, overrides: list[str] | None = None):
    """Params, train loader, model, optimiser, loss and device: `tilepipe train`'s own pieces."""
    import torch

    from tilepipe.ml.training import load_training_data, make_trainer
    from tilepipe.params import load_params

    p = load_params("params.yaml", overrides)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    data = load_training_data(p, tiles, split_json)
    t = make_trainer(p, data)
    return p, data.stores, data.refs["train"], t.loader, t.model, t.optimizer, t.loss_fn, t.device


def measure(batches: int = 80) -> dict:
    """Images/s of the training step fed from the store and from memory, alternating every batch.

    This machine's speed drifts by 10-15% from one few-second stretch to the next, which swamped
    the difference when whole rounds alternated; alternating single steps cancels the drift.
    """
    import torch

    from tilepipe.ml.loops import keep_freed_memory, train_epoch

    keep_freed_memory()  # both sides are tilepipe's step, as `tilepipe train` runs it
    p, _, _, loader, model, optimizer, loss_fn, device = setup(*default_data())
    loader.sampler.set_epoch(1)
    held = list(Batches(loader, batches))  # the very tensors the store-fed loader delivers
    args = (model, None, loss_fn, optimizer, device, p.train.precision, "bench")
    train_epoch(*args[:1], Batches(held, 3), *args[2:])  # warm-up
    loader.sampler.set_epoch(2)
    fresh = iter(loader)  # the store-fed side: the next epoch's batches, gathered as they are needed
    seconds = {"store": 0.0, "memory": 0.0}
    seen = {"store": 0, "memory": 0}
    fetch = 0.0  # of the store side's seconds, those spent gathering batches
    for i in range(batches):
        for side, source in (("memory", [held[i]]), ("store", fresh)):
            timed = Timed(Batches(source, 1))
            out = train_epoch(*args[:1], timed, *args[2:])
            seconds[side] += out["train_seconds"]
            seen[side] += out["tiles_seen"]
            fetch += timed.seconds if side == "store" else 0.0
    rate = {side: seen[side] / seconds[side] for side in seconds}
    return {
        "store_images_s": rate["store"],
        "memory_images_s": rate["memory"],
        "gather_ms_per_batch": 1000 * fetch / batches,
        "gather_share_pct": 100 * fetch / seconds["store"],
        "threads": torch.get_num_threads(),
        "batch_size": p.train.batch_size,
        "batches": batches,
    }


def run() -> dict:
    """Store-fed vs in-memory training images/s in one child process; overhead in %."""
    default_data()
    measured = run_measured(
        "import json\nfrom benchmarks.datapath import measure\nprint(json.dumps(measure()))"
    )
    got = json.loads(measured.stdout.strip().splitlines()[-1])
    return {
        "train_images_s_from_store": round(got["store_images_s"], 1),
        "train_images_s_from_memory": round(got["memory_images_s"], 1),
        "store_overhead_pct": round(100 * (got["memory_images_s"] / got["store_images_s"] - 1), 1),
        "torch_threads": got["threads"],
        "batch_size": got["batch_size"],
        "gather_ms_per_batch": round(got["gather_ms_per_batch"], 2),
        "gather_share_pct": round(got["gather_share_pct"], 1),
        "batches_per_side": got["batches"],
        "peak_rss_mb": round(measured.rss_mb, 1),
        "targets": {"store_overhead_pct": "<= 5"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
