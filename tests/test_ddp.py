"""Training on two processes (torch.distributed, gloo): every tile once per epoch across the ranks, one
MLflow run (rank 0's), and kill -9 of a rank then train.resume=true ends on the uninterrupted weights.

The two-rank tests start real `tilepipe train --nproc-per-node 2` jobs through torch.distributed's
launcher; together about 100 s on 2 cores (marked ``ddp``, in one xdist group; docs/scale-out.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.conftest import ROOT, TRAIN, prepare_tiny_pipeline, tiny_overrides, tiny_params
from tilepipe.errors import TilepipeError
from tilepipe.ml.checkpoint import load_model
from tilepipe.ml.dataset import EpochBatchSampler, TileBatches, open_stores, select_tiles, split_members
from tilepipe.ml.distributed import HOLD_AFTER_EPOCH, RankBatchSampler, Ranks
from tilepipe.ml.training import resumable, run_key

TILEPIPE = str(Path(sys.executable).parent / "tilepipe")
DDP = [*TRAIN, "train.threads=1"]


# ------------------------------------------------------------------------ the split, no processes


@pytest.mark.parametrize("size,batch,world", [(37, 8, 2), (61, 12, 4), (5, 4, 4), (60, 16, 2)])
def test_ranks_share_each_global_batch_so_every_tile_is_seen_once(size, batch, world):
    one = EpochBatchSampler(size, batch, seed=3, shuffle=True)
    shares = [RankBatchSampler(size, batch, 3, rank, world) for rank in range(world)]
    for epoch in (1, 2):
        for sampler in (one, *shares):
            sampler.set_epoch(epoch)
        steps = [list(s) for s in shares]
        assert all(len(s) == len(one) for s in steps), "every rank takes every step"
        for k, (_, _, whole) in enumerate(one):
            got = [step[k] for step in steps]
            assert all(g[2] == whole for g in got), "each rank sees the 1-process batch of that step"
            mine = [[whole[i] for i in g[3]] for g in got]
            assert sorted(p for m in mine for p in m) == sorted(whole)
        seen = [s.seen for s in shares]
        assert sorted(p for s in seen for p in s) == list(range(size)), "the union is every tile once"
        assert max(map(len, seen)) - min(map(len, seen)) <= len(one)


def test_a_rank_share_is_its_rows_of_the_whole_batch_turned_alike(prepared):
    tmp_path, _ = prepared
    members = split_members(tmp_path / "split.json", "train")
    stores = open_stores(tmp_path / "tiles", sorted(members))
    for task in ("classification", "segmentation"):
        data = TileBatches(stores, select_tiles(stores, members, task, 0.5), task, augment=True)
        positions = np.random.default_rng(1).permutation(len(data))[:9].tolist()
        x, y = data[(7, 2, positions)]
        for rows in ([0, 2, 4, 6, 8], [1, 3, 5, 7], []):
            xr, yr = data[(7, 2, positions, rows)]
            torch.testing.assert_close(xr, x[rows], rtol=0, atol=0)
            torch.testing.assert_close(yr, y[rows], rtol=0, atol=0)
            assert xr.shape[1:] == x.shape[1:] and yr.shape[1:] == y.shape[1:]


def _step_gradients(tmp: str) -> dict[str, float]:
    """One rank: the gradient of the first and the last (short) global batch of epoch 1 on 2 ranks;
    rank 0 also computes them on the whole batch as one process does. Batch norm on its running
    statistics (eval mode), so the arithmetic is the same and only the loss split can differ."""
    from tilepipe.ml.distributed import ranks_from_env, share_loss, start_ranks, wrap
    from tilepipe.ml.training import load_training_data, make_trainer

    params = tiny_params(Path(tmp), *DDP)
    ranks = ranks_from_env()
    device = start_ranks(ranks, params.train.batch_size, 1, "fp32")
    data = load_training_data(params, Path(tmp) / "tiles", Path(tmp) / "split.json")
    shared, whole = make_trainer(params, data, ranks, device), make_trainer(params, data)
    ddp = wrap(shared.model.eval(), device)
    gaps = {}
    for trainer in (shared, whole):
        trainer.loader.sampler.set_epoch(1)
    pairs = zip(list(shared.loader), list(whole.loader), strict=True)
    for name, ((x, y), (xw, yw)) in zip(("first", "last"), [next(pairs), list(pairs)[-1]], strict=True):
        ddp.zero_grad()
        share_loss(ddp, x, y, shared.loss_sum, device, "fp32")[1].backward()
        whole.model.eval().zero_grad()
        whole.loss_fn(whole.model(xw), yw).backward()
        gaps[name] = max(
            float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12))
            for a, b in zip(shared.model.parameters(), whole.model.parameters(), strict=True)
        )
        gaps[f"{name}_tiles"] = float(len(x))
    torch.distributed.destroy_process_group()
    return gaps


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
def test_a_step_on_two_ranks_has_the_gradient_of_the_whole_batch(prepared, monkeypatch):
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    tmp_path, _ = prepared
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=2, run_id="grad", rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0", rdzv_configs={"is_host": True}, max_restarts=0,
    )  # fmt: skip
    gaps = elastic_launch(config, _step_gradients)(str(tmp_path))
    for rank in (0, 1):
        assert gaps[rank]["first"] < 1e-4 and gaps[rank]["last"] < 1e-4, gaps
    assert gaps[0]["first_tiles"] == gaps[1]["first_tiles"] == 8  # half of train.batch_size 16
    assert gaps[0]["last_tiles"] + gaps[1]["last_tiles"] < 16  # the short batch, split too


# -------------------------------------------------------------------------- two real processes


def _cmd(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    sets = [x for o in [*tiny_overrides(tmp_path), *DDP, *extra] for x in ("--set", o)]
    paths = ["--tiles", str(tmp_path / "tiles"), "--split", str(tmp_path / "split.json"), "--out", str(out)]
    return [TILEPIPE, "train", "--params", str(ROOT / "params.yaml"), *sets, *paths, "--nproc-per-node", "2"]


def _env(db: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _ranks_of(launcher: int) -> dict[str, psutil.Process]:
    found = {}
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[rank] = child
    return found


def _killed_after_first_epoch(tmp_path: Path, out: Path) -> tuple[subprocess.CompletedProcess, list]:
    """Run 2 ranks held after epoch 1 (the seam), kill -9 rank 1; what the launcher said, who outlived it."""
    log, errors = tmp_path / "killed.log", tmp_path / "killed.err"
    with open(log, "w") as sink, open(errors, "w") as err:
        env = _env(tmp_path / "killed.db", **{HOLD_AFTER_EPOCH: "1"})
        proc = subprocess.Popen(_cmd(tmp_path, out), cwd=tmp_path, env=env, stdout=sink, stderr=err)
    deadline = time.monotonic() + 300
    while not all((out / f".held-rank{r}").exists() for r in (0, 1)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the ranks never reached the hold:\n{log.read_text()}\n{errors.read_text()}")
        time.sleep(0.1)
    ranks = _ranks_of(proc.pid)
    assert sorted(ranks) == ["0", "1"], ranks
    os.kill(ranks["1"].pid, signal.SIGKILL)
    proc.wait(timeout=120)
    left = [p for p in ranks.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), errors.read_text()), left


@pytest.mark.ddp
@pytest.mark.xdist_group("ddp")
def test_two_ranks_see_every_tile_once_log_one_run_and_resume_exactly_after_a_kill(tmp_path):
    tmp_path, _ = prepare_tiny_pipeline(tmp_path, *DDP)
    full, cut = tmp_path / "full", tmp_path / "cut"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run, while the other is started and killed
        uninterrupted = pool.submit(_run, _cmd(tmp_path, full), tmp_path, _env(tmp_path / "full.db"))
        killed, left = _killed_after_first_epoch(tmp_path, cut)
        done = uninterrupted.result()
    assert done.returncode == 0, done.stdout + done.stderr

    # Every epoch, the ranks' tiles together are the training set, each tile once; the same per epoch.
    summary = json.loads((full / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 3
    assert summary["ranks_cover_training_set"] == [True] * 3
    assert summary["tiles_seen_per_epoch"] == [summary["train_tiles"]] * 3
    assert [sum(r) for r in summary["tiles_seen_per_rank"]] == summary["tiles_seen_per_epoch"]
    assert all(min(r) > 0 for r in summary["tiles_seen_per_rank"])

    # One MLflow run, rank 0's: its epochs once each, the model logged; the other rank logged nothing.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'full.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "val_macro_f1")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert runs[0].data.params["train.nproc_per_node"] == "2"
    assert json.loads((full / "run.json").read_text())["run_id"] == runs[0].info.run_id

    # kill -9 of one rank: the launcher stops the other and fails with one line naming it.
    assert killed.returncode == 1, killed.stdout + killed.stderr
    assert not left, f"ranks outlived the job: {left}"
    assert "Traceback" not in killed.stderr
    last_line = killed.stderr.strip().splitlines()[-1]
    expected = f"tilepipe train: error: {cut}: training on 2 processes stopped: rank 1"
    assert last_line.startswith(expected), last_line
    assert "SIGKILL" in last_line and "train.resume=true" in last_line
    state = json.loads(torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["state"])
    assert state["epoch"] == 1 and not (cut / "train.json").exists()

    # train.resume=true on 2 ranks ends with exactly the weights of the uninterrupted 2-rank run.
    for marker in cut.glob(".held-rank*"):
        marker.unlink()
    resumed = _run(_cmd(tmp_path, cut, "train.resume=true"), tmp_path, _env(tmp_path / "killed.db"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (ma, meta_a), (mb, meta_b) = load_model(full / "model.pt"), load_model(cut / "model.pt")
    assert meta_a.epoch == meta_b.epoch
    pairs = zip(ma.state_dict().values(), mb.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert (full / "history.csv").read_text() == (cut / "history.csv").read_text()
    resumed_summary = json.loads((cut / "train.json").read_text())
    assert resumed_summary["tiles_seen_per_rank"] == summary["tiles_seen_per_rank"]

    # The checkpoint knows its process count: 2 ranks resume it, 1 process is refused.
    params, last = tiny_params(tmp_path, *DDP), cut / "checkpoints" / "last.pt"
    assert resumable(last, run_key(params, tmp_path / "split.json", tmp_path / "tiles", Ranks(0, 2, 0, 2)))
    with pytest.raises(TilepipeError, match=r"other params, split or tiles \(or process count\)"):
        resumable(last, run_key(params, tmp_path / "split.json", tmp_path / "tiles"))


def test_a_batch_that_does_not_split_across_the_processes_is_one_line(tmp_path):
    run = subprocess.run(
        [TILEPIPE, "train", "--params", str(ROOT / "params.yaml"), "--nproc-per-node", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "tilepipe train: error: --nproc-per-node: train: batch_size must be a multiple of nproc_per_node "
        "(each process takes a share)"
    ]
