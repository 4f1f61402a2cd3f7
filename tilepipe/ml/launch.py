"""Start ``tilepipe train`` on several processes of this machine through torch.distributed's launcher.

The launcher is the one behind ``torchrun`` (``torch.distributed.launcher.api.elastic_launch``): it
starts ``train.nproc_per_node`` processes of ``python -m tilepipe train`` with the rendezvous on
127.0.0.1 (a free port the store picks), watches them and, if one dies, stops the others and fails
(no restarts: ``train.resume`` continues from the last checkpoint). Several machines: run
``torchrun --nnodes ...`` yourself (docs/scale-out.md).
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

from tilepipe.errors import TilepipeError
from tilepipe.params import Params
from tilepipe.processes import environment


def _loopback_env():
    """Gloo's sockets on the loopback interface (unless the environment chose one) while ranks start."""
    return environment(
        {"GLOO_SOCKET_IFNAME": "lo"} if sys.platform.startswith("linux") else {}, keep_set=True
    )


def launch_training(
    params: Params, tiles_dir: Path, split_json: Path, out_dir: Path, stats_json: Path | None = None
) -> None:
    """Run ``tilepipe train`` as ``train.nproc_per_node`` ranks; a failed rank is one clear error."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = params.train.nproc_per_node
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"is_host": True},
        max_restarts=0,
        monitor_interval=0.5,
        local_addr="127.0.0.1",
    )
    with tempfile.TemporaryDirectory(prefix="tilepipe-train-") as tmp, _loopback_env():
        params_file = Path(tmp) / "params.json"  # the params as given (overrides included), for every rank
        params_file.write_text(json.dumps(params.model_dump(mode="json")))
        paths = ["--tiles", str(tiles_dir), "--split", str(split_json), "--out", str(out_dir)]
        paths += ["--stats", str(stats_json)] if stats_json is not None else []
        args = ["-m", "tilepipe", "train", "--params", str(params_file), *paths]
        try:
            elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            signal = failure.signal_name()
            how = f"signal {signal}" if signal != "<N/A>" else f"exit code {failure.exitcode}"
            raise TilepipeError(
                f"{out_dir}: training on {n} processes stopped: rank {rank} ended with {how}; "
                "set train.resume=true to continue from the last checkpoint"
            ) from None
