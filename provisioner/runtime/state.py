"""A run's files: its folder (:class:`RunDir`, ``<state_dir>/runs/<id>``) with the state file
``state.json`` and the env file ``env`` (also copied to ``<state_dir>/current.env`` for ``source``).

No secrets are written to the state file: it holds ids, names, addresses and modes only. The env
file (mode 0600) also holds the run's control token, ``PROVISION_CONTROL_TOKEN``: it lets a
controller in any language use the workers' worker-wide commands (docs/protocol.md, "Access").
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from provisioner._files import atomic_write
from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV
from provisioner.errors import StateUnreadableError
from provisioner.lm.ledger import RUN_LM_SUBDIR
from provisioner.runtime import watchdog as wd
from provisioner.settings import Settings

LOOPBACK = "127.0.0.1"
CURRENT_ENV = "current.env"
CURRENT_RUN = "current"
RUNS_SUBDIR = "runs"
STATE_FILE = "state.json"
ENV_FILE = "env"


@dataclass(frozen=True)
class RunDir:
    """One run's folder, ``<state_dir>/runs/<run_id>``, and the name of every path in it.

    The folder is shared by every process of the run (pytest and its xdist workers, ``provision
    run``, the watchdog): ``state.json`` and ``env`` (written by ``provision up``), ``lm/`` (the LM
    rate window, cost budget and ledger, bind-mounted into the workers), ``owners/`` and
    ``processes/`` (the watchdog's registrations), ``watchdog.lock`` and the watchdog's markers.
    """

    path: Path

    @classmethod
    def of(cls, state_dir: Path | str, run_id: str) -> RunDir:
        """The folder of ``run_id`` under ``state_dir`` (made absolute: it is handed to other processes)."""
        return cls((Path(state_dir) / RUNS_SUBDIR / run_id).resolve())

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def env_file(self) -> Path:
        return self.path / ENV_FILE

    @property
    def lm_dir(self) -> Path:
        return self.path / RUN_LM_SUBDIR

    @property
    def owners_dir(self) -> Path:
        return self.path / wd.OWNERS_DIR

    @property
    def processes_dir(self) -> Path:
        return self.path / wd.PROCESSES_DIR

    @property
    def watchdog_lock(self) -> Path:
        return self.path / wd.LOCK_FILE

    def marker(self, name: str) -> Path:
        """A watchdog marker file (``watchdog.PERSIST_MARKER``, ``RETAIN_MARKER``, ``STOPPED_MARKER``…)."""
        return self.path / name


class WorkerEntry(TypedDict):
    """One worker of a run in its state file: slot, container name and id, ``127.0.0.1:<port>``."""

    slot: int
    name: str
    container_id: str
    address: str


@dataclass
class RunState:
    """What ``provision up`` leaves behind for ``status``/``down`` and for other tools. No secrets."""

    run_id: str
    layer: str
    lm_mode: str
    # The provisioner.instance label of the run's resources; "session" in state files of older versions.
    instance: Annotated[str, Field(validation_alias=AliasChoices("instance", "session"))]
    image: str
    created: float
    owner_pid: int
    owner_host: str
    persistent: bool
    uses_standin: bool
    egress: bool
    networks: list[str]
    relay: str
    standin: str | None
    workers: list[WorkerEntry]
    lm_run_dir: str | None = None
    status: str = "up"
    # The cassette record mode of a cached run (None: mock or real, or written by an older version):
    # a pytest session attaches to the run only with the same one (runtime/shared_pool.py).
    record_mode: str | None = None

    @property
    def publish_host(self) -> str:
        """The host the workers are published on (``127.0.0.1`` unless the engine is remote)."""
        return self.addresses[0].rsplit(":", 1)[0] if self.workers else LOOPBACK

    @property
    def addresses(self) -> list[str]:
        return [str(w["address"]) for w in self.workers]

    def env(self, state_file: Path | None = None) -> dict[str, str]:
        """The variables any language's test suite needs to reach this run."""
        ports = [a.rsplit(":", 1)[1] for a in self.addresses]
        env = {
            "PROVISION_RUN_ID": self.run_id,
            "PROVISION_LAYER": self.layer,
            "PROVISION_LM_MODE": self.lm_mode,
            "PROVISION_BRIDGE_ADDRS": ",".join(self.addresses),
            "PROVISION_BRIDGE_HOST": self.publish_host,
            "PROVISION_BRIDGE_PORTS": ",".join(ports),
            "PROVISION_WORKERS": str(len(self.workers)),
            "PROVISION_LM_STANDIN": "1" if self.uses_standin else "0",
        }
        if self.lm_run_dir:
            env["PROVISION_LM_RUN_DIR"] = self.lm_run_dir
        if state_file is not None:
            env["PROVISION_STATE_FILE"] = str(state_file)
        return env


def run_dir_of(settings: Settings, run_id: str) -> RunDir:
    """The :class:`RunDir` of ``run_id`` in the settings' state dir."""
    return RunDir.of(settings.state_dir, run_id)


def render_env(env: Mapping[str, str]) -> str:
    """``export KEY=value`` lines: ``source``-able by sh/bash/zsh, and read by python-dotenv."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def write_state(
    settings: Settings,
    state: RunState,
    *,
    current: bool = True,
    control_token: str | None = None,
    bridge_token: str | None = None,
) -> Path:
    """Write state.json and the env file of the run (and make it the current one).

    ``control_token`` goes into the env files only (as ``PROVISION_CONTROL_TOKEN``; they are
    written 0600), never into state.json; so does ``bridge_token`` (``PROVISION_BRIDGE_TOKEN``, a
    run published off loopback).
    """
    run_dir = run_dir_of(settings, state.run_id)
    path = run_dir.state_file
    atomic_write(path, json.dumps(asdict(state), indent=2) + "\n")
    env = state.env(path)
    if control_token:
        env[CONTROL_TOKEN_ENV] = control_token
    if bridge_token:
        env[BRIDGE_TOKEN_ENV] = bridge_token
    env_text = render_env(env)
    atomic_write(run_dir.env_file, env_text, mode=0o600)
    if current:
        root = Path(settings.state_dir).resolve()
        atomic_write(root / CURRENT_ENV, env_text, mode=0o600)
        atomic_write(root / CURRENT_RUN, state.run_id + "\n")
    return path


def bridge_token_of(settings: Settings, run_id: str) -> str | None:
    """The run's ``PROVISION_BRIDGE_TOKEN`` from its env file (None: a loopback run, or no file)."""
    from dotenv import dotenv_values

    path = run_dir_of(settings, run_id).env_file
    if not path.is_file():
        return None
    return dotenv_values(path).get(BRIDGE_TOKEN_ENV) or None


_RUN_STATE = TypeAdapter(RunState)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def read_state(settings: Settings, run_id: str) -> RunState | None:
    """The run's state (None: it has no state file; only ``provision up`` writes one).

    Raises:
        StateUnreadableError: the file is there but is not a valid state file (torn, bad JSON, a
            field missing or of the wrong type) — the run's resources are still found by their labels.
    """
    path = run_dir_of(settings, run_id).state_file
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateUnreadableError(path, exc.strerror or str(exc)) from None
    try:
        return _RUN_STATE.validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}" for err in exc.errors()[:3]
        )
        raise StateUnreadableError(path, problems) from None


def current_run_id(settings: Settings) -> str | None:
    """The run id in ``<state_dir>/current`` (None: none, or the file is torn or not a run id)."""
    try:
        text = (Path(settings.state_dir) / CURRENT_RUN).read_bytes().decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    return text if _RUN_ID.fullmatch(text) else None


def _clear_current(settings: Settings, run_id: str) -> None:
    root = Path(settings.state_dir)
    if current_run_id(settings) == run_id:
        for name in (CURRENT_ENV, CURRENT_RUN):
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()

