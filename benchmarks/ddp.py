"""Training on several processes: images/s of 1 rank x 2 threads vs 2 ranks x 1 thread, all-reduce share.

Both sides run `tilepipe train`'s own step on the default model, batch and data (the built-in scenes,
default params): one process with 2 torch threads (``train_epoch``), or two ranks with 1 thread
each (``ddp_train_epoch``: DistributedDataParallel over gloo, each rank half of every global batch
of 64), started by torch.distributed's launcher (``elastic_launch``, as `tilepipe train
--nproc-per-node 2` does). The same STEPS global batches of epoch 1 after WARMUP steps; the two
sides alternate ROUNDS times (this machine's speed drifts), figures are the means.

The all-reduce share: on the 2 ranks, an all-reduce of a flat fp32 tensor of the model's parameter
count (what DDP reduces every step, in buckets overlapped with the backward pass) timed alone,
plus the step's all-reduce of the loss sums, over the mean step time.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from benchmarks.common import ROOT, run_measured
from benchmarks.datapath import Batches, default_data

WARMUP = 3
STEPS = int(os.environ.get("BENCH_DDP_STEPS", "30"))
ROUNDS = int(os.environ.get("BENCH_DDP_ROUNDS", "2"))


def worker(steps: int = STEPS) -> dict:
    """One side's timed steps (a rank when started by the launcher); images/s and the all-reduce times."""
    import torch
    import torch.distributed as dist

    from tilepipe.ml.distributed import ddp_train_epoch, ranks_from_env, start_ranks, wrap
    from tilepipe.ml.loops import keep_freed_memory, train_epoch
    from tilepipe.ml.training import load_training_data, make_trainer
    from tilepipe.params import load_params

    ranks = ranks_from_env()
    p = load_params(ROOT / "params.yaml")
    device = start_ranks(ranks, p.train.batch_size, 0, p.train.precision) if ranks else None
    if ranks is None:
        torch.set_num_threads(2)
    data = load_training_data(p, *default_data())
    keep_freed_memory()
    t = make_trainer(p, data, ranks, device)
    model, loss_fn, step = t.model, t.loss_fn, train_epoch
    if ranks is not None:
        model, loss_fn, step = wrap(t.model, t.device), t.loss_sum, ddp_train_epoch
    t.loader.sampler.set_epoch(1)
    batches = iter(t.loader)
    args = (loss_fn, t.optimizer, t.device, p.train.precision, "bench")
    step(model, Batches(batches, WARMUP), *args)
    out = step(model, Batches(batches, steps), *args)
    result = {"images_s": out["tiles_seen"] / out["train_seconds"], "step_s": out["train_seconds"] / steps}
    result["threads"] = torch.get_num_threads()
    if ranks is not None:
        flat = torch.zeros(sum(q.numel() for q in t.model.parameters()))
        dist.all_reduce(flat)
        started = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(flat)
        result["grad_allreduce_s"] = (time.perf_counter() - started) / 20
        result["loss_allreduce_s"] = out["loss_reduce_seconds"] / steps
        result["parameters"] = flat.numel()
        dist.destroy_process_group()
    return result


ONE = """
import json
from benchmarks.ddp import worker
print(json.dumps(worker()))
"""

TWO = """
import json, os
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from benchmarks.ddp import worker
config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id={run_id!r}, rdzv_backend="c10d",
                      rdzv_endpoint="127.0.0.1:0", rdzv_configs={{"is_host": True}}, max_restarts=0)
print(json.dumps(elastic_launch(config, worker)()[0]))
"""


def run() -> dict:
    """Alternate the two sides ROUNDS times, each in fresh processes; images/s, ratio, all-reduce share."""
    default_data()
    got: dict[str, list[dict]] = {"one": [], "two": []}
    for _ in range(ROUNDS):
        got["one"].append(json.loads(run_measured(ONE).stdout.strip().splitlines()[-1]))
        child = TWO.format(run_id=str(uuid.uuid4()))
        got["two"].append(json.loads(run_measured(child).stdout.strip().splitlines()[-1]))

    def mean(side: str, key: str) -> float:
        return sum(r[key] for r in got[side]) / len(got[side])

    one, two = mean("one", "images_s"), mean("two", "images_s")
    reduce_s = mean("two", "grad_allreduce_s") + mean("two", "loss_allreduce_s")
    return {
        "one_rank_2_threads_images_s": round(one, 1),
        "two_ranks_1_thread_images_s": round(two, 1),
        "two_ranks_vs_one_rank": round(two / one, 2),
        "two_ranks_step_ms": round(1000 * mean("two", "step_s"), 1),
        "grad_allreduce_ms": round(1000 * mean("two", "grad_allreduce_s"), 2),
        "loss_allreduce_ms": round(1000 * mean("two", "loss_allreduce_s"), 3),
        "allreduce_share_of_step": round(reduce_s / mean("two", "step_s"), 3),
        "parameters": got["two"][0]["parameters"],
        "steps": STEPS,
        "rounds": ROUNDS,
        "images_s_per_round": {side: [round(r["images_s"], 1) for r in runs] for side, runs in got.items()},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
