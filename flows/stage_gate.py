"""Which stages a flow run runs: the ones ``dvc status`` says changed, as ``dvc repro`` decides.

DVC compares each stage's deps, params and outs with what ``dvc.lock`` recorded. The gate asks it
once for every stage when the run starts; once a stage has run (and written new outputs), it asks
again for each later stage just before it. A stage without a change is skipped with the log line
``<stage>: unchanged, skipped``; one that runs is recorded in ``dvc.lock`` as soon as it finishes
(``dvc commit --force <stage>``, what ``dvc repro`` does), so a run that dies half-way resumes
after the last stage it finished. The hashes are DVC's own: nothing here computes one.

DVC cannot judge a run whose params are not params.yaml's (``--set`` overrides, another params
file) or a folder that is not a DVC project: then every stage runs and ``dvc.lock`` is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from tilepipe.flows import dvc_cli
from tilepipe.params import Params

SHOWN = 4  # paths named per kind of change in the log line


@dataclass
class StageGate:
    """The stages of one flow run: what DVC reports changed, what ran, what was skipped."""

    off: str | None  # why DVC cannot decide for this run (None: it does)
    status: dict[str, list] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, params: Params) -> StageGate:
        """The gate of a run with ``params``: DVC's status of every stage, when DVC can judge it."""
        off = dvc_cli.why_not_commit(params)
        return cls(off, {} if off else dvc_cli.status())

    @property
    def on(self) -> bool:
        """True when DVC decides which stages run (and the flow records them in dvc.lock)."""
        return self.off is None

    def must_run(self, stage: str) -> bool:
        """True when ``stage`` must run now; logs the decision, one line."""
        log = get_run_logger()
        if not self.on:
            return True
        if self.ran:  # an earlier stage of this run wrote outputs: DVC judges this one anew
            self.status[stage] = dvc_cli.status(stage).get(stage, [])
        changes = self.status.get(stage)
        if not changes:
            log.info("%s: unchanged, skipped", stage)
            self.skipped.append(stage)
            return False
        log.info("%s: %s; running", stage, describe(changes))
        return True

    def done(self, stage: str) -> None:
        """``stage`` ran to the end."""
        self.ran.append(stage)


def describe(changes: list[Any]) -> str:
    """DVC's status entries of one stage as a short phrase: ``changed deps: a, b; changed params: train``."""
    parts = []
    for change in changes:
        if isinstance(change, str):
            parts.append(change)
            continue
        for kind, paths in change.items():
            names = []
            for path, state in paths.items():
                names += [f"{path} ({', '.join(state)})"] if isinstance(state, dict) else [path]
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            parts.append(f"{kind}: {', '.join(names[:SHOWN])}{more}")
    return "; ".join(parts) or "changed"
