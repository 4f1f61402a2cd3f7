"""Training on several processes (torch.distributed): ranks, the per-rank batch split, the DDP step.

A job is started by torch.distributed's launcher (``torchrun``, or ``tilepipe.ml.launch``), which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in each process. Every rank walks
the same seeded permutation of all training tiles per epoch (``EpochBatchSampler``'s); each global
batch of ``train.batch_size`` tiles is split across the ranks by stride (rank r takes rows r, r + N,
...), so the union over ranks is every training tile once per epoch and a step on N ranks is a step
of the same global batch on one. Each tile keeps the flip or turn it gets on one process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from tilepipe.errors import TilepipeError
from tilepipe.ml.dataset import EpochBatchSampler
from tilepipe.ml.loops import Precision, _inputs, autocast, epoch_stats, optimizer_step
from tilepipe.processes import cores, die_with_parent

HOLD_AFTER_EPOCH = "TILEPIPE_TEST_HOLD_AFTER_EPOCH"  # test seam: every rank stops after that epoch


@dataclass(frozen=True)
class Ranks:
    """A process's place in a job: global rank and world size, rank and process count on its node."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates, logs, checkpoints and saves the model."""
        return self.rank == 0


def ranks_from_env() -> Ranks | None:
    """The job's ranks when started by torch.distributed's launcher with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def start_ranks(ranks: Ranks, batch_size: int, threads: int, precision: Precision) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU); this rank's device.

    ``threads`` 0 shares the node's cores among its ranks (cores // ranks on the node).
    """
    if batch_size % ranks.world:
        raise TilepipeError(
            f"train.batch_size {batch_size} does not split evenly across {ranks.world} processes; "
            "make it a multiple of the process count"
        )
    die_with_parent()  # a launcher killed from a thread (a flow's task) cannot stop its ranks itself
    cuda = precision == "amp" and torch.cuda.is_available()
    torch.set_num_threads(threads or max(1, cores() // ranks.local_world))
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1))
    return torch.device("cuda", ranks.local_rank) if cuda else torch.device("cpu")


def stop_ranks() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still talks)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class RankBatchSampler(EpochBatchSampler):
    """One rank's share of every global batch: yields (seed, epoch, global positions, rows).

    ``rows`` are the indices into the global batch this rank trains on (``rank::world``); the last,
    short batch of an epoch may leave a rank none. ``seen`` holds the positions of the last epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        super().__init__(size, batch_size, seed, shuffle=True)
        self.rank, self.world = rank, world
        self.seen: list[int] = []

    def __iter__(self):
        self.seen = []
        for seed, epoch, positions in super().__iter__():
            rows = list(range(self.rank, len(positions), self.world))
            self.seen += [positions[i] for i in rows]
            yield seed, epoch, positions, rows


def denominator(y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """What a mean cross-entropy divides by: the summed class weights of the counted targets."""
    valid = y[y != -100]
    if weight is None:
        return torch.tensor(float(valid.numel()), device=y.device)
    return weight[valid].sum()


def share_loss(
    ddp: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_sum: nn.Module,
    device: torch.device,
    precision: Precision,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The whole batch's [summed loss, denominator, tiles], this rank's loss to backward, all-reduce seconds.

    Each rank's summed loss over the whole batch's denominator, times the world size, which DDP's
    gradient averaging divides back out: the gradient is that of the global batch's mean loss.
    """
    with autocast(device, precision):
        local = loss_sum(ddp(x), y)
    count = torch.tensor(float(len(x)), device=device)
    sums = torch.stack([local.detach().float(), denominator(y, loss_sum.weight).float(), count])
    started = time.perf_counter()
    dist.all_reduce(sums)
    seconds = time.perf_counter() - started
    return sums, local * dist.get_world_size() / sums[1].clamp_min(1e-12), seconds


def ddp_train_epoch(
    ddp: nn.Module,
    loader,
    loss_sum: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: Precision,
    desc: str,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One epoch of this rank's shares; the gradient of each step is the global batch's mean loss.

    ``loss_sum`` is the training loss with ``reduction="sum"``; each rank's summed loss is divided by
    the whole batch's denominator (one all-reduce of three numbers per step) and scaled by the
    world size, which DDP's gradient averaging divides back out.
    """
    ddp.train()
    total_loss, seen, mine, reduce_seconds = 0.0, 0, 0, 0.0
    started = time.perf_counter()
    bar = tqdm(total=len(loader), desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())
    for x, y in loader:
        x, y = _inputs(x, device, precision), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        sums, loss, waited = share_loss(ddp, x, y, loss_sum, device, precision)
        reduce_seconds += waited
        optimizer_step(loss, optimizer, scaler)
        batch = int(sums[2])
        total_loss += float(sums[0] / sums[1].clamp_min(1e-12)) * batch
        seen, mine = seen + batch, mine + len(x)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    return {
        **epoch_stats(total_loss, seen, seconds),
        "rank_tiles_seen": mine,
        "loss_reduce_seconds": reduce_seconds,
    }


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model under DistributedDataParallel: gradients all-reduced (averaged) in backward."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_seen(seen: list[int], size: int) -> tuple[list[int], bool]:
    """Tiles seen per rank this epoch, and whether together they were every training tile exactly once."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, np.asarray(seen, dtype=np.int64))
    union = np.sort(np.concatenate(everyone))
    return [len(s) for s in everyone], bool(np.array_equal(union, np.arange(size)))


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (the others wait here while rank 0 validates)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def hold_if_asked(epoch: int, ranks: Ranks, marker_dir: Path) -> None:
    """The test seam: after epoch ``$TILEPIPE_TEST_HOLD_AFTER_EPOCH`` (checkpoint written), say so and wait.

    Each rank touches ``.held-rank<r>`` in ``marker_dir`` and then waits until it is killed.
    """
    if os.environ.get(HOLD_AFTER_EPOCH) == str(epoch):
        (marker_dir / f".held-rank{ranks.rank}").touch()
        threading.Event().wait()
