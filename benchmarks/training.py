"""Training throughput: a seed-style plain fp32 loop vs tilepipe's training step, same model and data.

Both sides train the default model (params.yaml: small_cnn, batch 64, AdamW, cosine schedule,
weighted loss) from the same initial weights on the built-in data, for EPOCHS full epochs, on the
same batches in the same order with the same flips and rotations; then both are scored on the
held-out test scenes. They differ only in how a step is fed and computed:

* plain ("seed-style"): a per-tile ``Dataset`` (``__getitem__`` returns one float32 CHW tile),
  ``DataLoader`` with default collate and ``num_workers=2`` (one per core, the usual default),
  NCHW tensors, fp32, torch's default thread count;
* tilepipe: ``tilepipe.ml.training``'s path: one batched gather per shard (``TileBatches``), no loader
  workers (``train.workers: 0``: on 2 cores they take the cores training needs), channels_last
  on the CPU (``tilepipe.ml.loops.prepare``), ``train.precision`` fp32.

A held-out macro-F1 after an epoch or a few moves by several points with the seed (initial
weights and batch order) alone, so ``BENCH_TRAIN_SEEDS`` (default 1) repeats both sides for that
many seeds (``seed``, ``seed + 1``, ...) and the difference is taken between the means.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.common import run_measured
from benchmarks.datapath import default_data, setup

EPOCHS = int(os.environ.get("BENCH_TRAIN_EPOCHS", "1"))
SEEDS = int(os.environ.get("BENCH_TRAIN_SEEDS", "1"))
PLAIN_WORKERS = 2


class _PerTile:
    """The seed-style dataset: one float32 CHW tile and its class per ``__getitem__``."""

    def __init__(self, stores, ref) -> None:
        self.stores, self.ref = stores, ref

    def __len__(self) -> int:
        return len(self.ref.tile)

    def __getitem__(self, i: int):
        import torch

        store = self.stores[self.ref.scene_ids[self.ref.scene[i]]]
        image = store.image(int(self.ref.tile[i])).astype(np.float32)
        return torch.from_numpy(image), int(self.ref.target[i])


def _epoch_plain(model, stores, ref, p, optimizer, loss_fn, epoch: int) -> tuple[float, int]:
    """One epoch of the plain loop on the tilepipe sampler's batches, augmented identically."""
    import torch
    from torch.utils.data import DataLoader

    from tilepipe.ml.dataset import EpochBatchSampler, dihedral, dihedral_ops

    sampler = EpochBatchSampler(len(ref.tile), p.train.batch_size, p.seed, True)
    sampler.set_epoch(epoch)
    batches = [list(b[2]) for b in sampler]  # the same positions as tilepipe's epoch
    loader = DataLoader(_PerTile(stores, ref), batch_sampler=batches, num_workers=PLAIN_WORKERS)
    model.train()
    seen, started = 0, time.perf_counter()
    for (x, y), positions in zip(loader, batches, strict=True):
        if p.train.augment in ("geometric", "both"):
            turned, _ = dihedral(x.numpy(), None, dihedral_ops(p.seed, epoch, np.asarray(positions)))
            x = torch.from_numpy(turned)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(x)
    return time.perf_counter() - started, seen


def measure(side: str, epochs: int = EPOCHS, seed: int | None = None) -> dict:
    """Train ``epochs`` epochs on one side; images/s of the training epochs and test-split scores.

    ``seed`` replaces params.yaml's seed (initial weights, batch order, flips and turns).
    """
    import torch
    from torch import nn

    from tilepipe.ml.dataset import TileBatches, make_loader, open_stores, select_tiles, split_members
    from tilepipe.ml.loops import keep_freed_memory, score, train_epoch
    from tilepipe.ml.metrics import summarize

    tiles, split_json = default_data()
    overrides = None if seed is None else [f"seed={seed}"]
    p, stores, ref, loader, model, optimizer, loss_fn, device = setup(tiles, split_json, overrides)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if side == "plain":
        model = model.to(memory_format=torch.contiguous_format)  # NCHW, as a plain loop has it
    else:
        keep_freed_memory()  # as `tilepipe train` does
    seconds, seen = 0.0, 0
    for epoch in range(1, epochs + 1):
        if side == "plain":
            s, n = _epoch_plain(model, stores, ref, p, optimizer, loss_fn, epoch)
        else:
            loader.sampler.set_epoch(epoch)
            out = train_epoch(model, loader, loss_fn, optimizer, device, p.train.precision, "bench")
            s, n = out["train_seconds"], out["tiles_seen"]
        seconds, seen = seconds + s, seen + n
        scheduler.step()
    test = split_members(split_json, "test")
    stores.update(open_stores(tiles, sorted(test)))
    test_ref = select_tiles(stores, test, p.train.task, p.train.min_purity)
    test_loader = make_loader(TileBatches(stores, test_ref, p.train.task), 256, 0, False, 0)
    cm, _ = score(model, test_loader, nn.CrossEntropyLoss(), len(p.data.classes), device, "fp32")
    summary = summarize(cm, p.data.class_names)
    return {
        "images_s": seen / seconds,
        "macro_f1": summary["macro_f1"],
        "accuracy": summary["accuracy"],
        "threads": torch.get_num_threads(),
    }


CHILD = """
import json
from benchmarks.training import measure
print(json.dumps(measure({side!r}, seed={seed})))
"""


def run() -> dict:
    """Both sides, each in its own process, one after the other (per seed); speed-up and macro-F1."""
    default_data()
    from tilepipe.params import load_params

    first = load_params("params.yaml").seed
    seeds = [first + k for k in range(SEEDS)]
    got: dict[str, list[dict]] = {"plain": [], "tilepipe": []}
    for seed in seeds:
        for side in got:
            child = CHILD.format(side=side, seed=seed)
            got[side].append(json.loads(run_measured(child).stdout.strip().splitlines()[-1]))
    f1 = {side: [r["macro_f1"] for r in runs] for side, runs in got.items()}
    mean = {side: float(np.mean(values)) for side, values in f1.items()}
    speed = {side: float(np.mean([r["images_s"] for r in runs])) for side, runs in got.items()}
    return {
        "plain_fp32_images_s": round(speed["plain"], 1),
        "tilepipe_step_images_s": round(speed["tilepipe"], 1),
        "training_speedup": round(speed["tilepipe"] / speed["plain"], 2),
        "plain_test_macro_f1": round(mean["plain"], 4),
        "tilepipe_test_macro_f1": round(mean["tilepipe"], 4),
        "macro_f1_diff_points": round(100 * abs(mean["tilepipe"] - mean["plain"]), 2),
        "seeds": seeds,
        "plain_test_macro_f1_per_seed": [round(v, 4) for v in f1["plain"]],
        "tilepipe_test_macro_f1_per_seed": [round(v, 4) for v in f1["tilepipe"]],
        "epochs": EPOCHS,
        "torch_threads": got["tilepipe"][0]["threads"],
        "plain_loader_workers": PLAIN_WORKERS,
        "targets": {"training_speedup": ">= 2", "macro_f1_diff_points": "<= 1"},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
