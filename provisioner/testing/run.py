"""A run's identity: one id and one shared directory for every process of a test run.

The first process of a run (pytest's controller, or a script calling :func:`provisioner.environment`)
creates the id; xdist workers receive it from the controller, subprocesses through
``PROVISION_RUN_ID`` / ``PROVISION_RUN_DIR``. Everything run-wide hangs off it: container labels,
the watchdog, the LM rate limit, cost limit and ledger (files in the run directory).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

RUN_ID_ENV = "PROVISION_RUN_ID"
RUN_DIR_ENV = "PROVISION_RUN_DIR"
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,40}$")


def new_run_id() -> str:
    """A fresh, sortable run id such as ``r20261125-231502-9f3a1c`` (safe in container names)."""
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(
            f"run id {run_id!r} must be 3-41 characters of lowercase letters, digits and '-' "
            "(it becomes part of container and network names)"
        )
    return run_id


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    run_dir: Path
    # True in the process that created the run (it owns the run-wide report and cleanup).
    controller: bool
    # An xdist worker: its controller's ``<pid>-<start time>`` (watchdog.process_entry). The worker
    # registers with the run's watchdog as its dependant, so it is terminated when the controller dies.
    principal: str | None = None

    @classmethod
    def create(cls, state_dir: Path, run_id: str | None = None) -> RunIdentity:
        """A run for this process: from ``PROVISION_RUN_ID``/``PROVISION_RUN_DIR`` if set, else new."""
        inherited = os.environ.get(RUN_ID_ENV)
        chosen = check_run_id(run_id or inherited or new_run_id())
        env_dir = os.environ.get(RUN_DIR_ENV)
        run_dir = Path(env_dir) if env_dir and inherited == chosen else state_dir / "runs" / chosen
        return cls(run_id=chosen, run_dir=run_dir.absolute(), controller=True)

    @classmethod
    def joined(cls, run_id: str, run_dir: str | Path, principal: str | None = None) -> RunIdentity:
        """The identity of a run another process created (an xdist worker joining its controller,
        ``principal`` being the controller's ``<pid>-<start time>``)."""
        return cls(run_id=check_run_id(run_id), run_dir=Path(run_dir), controller=False, principal=principal)

    def as_env(self) -> dict[str, str]:
        return {RUN_ID_ENV: self.run_id, RUN_DIR_ENV: str(self.run_dir)}
