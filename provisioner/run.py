"""A run: what the user chose, what it resolves to, who takes part, and what each process reports.

Plain Python (no pytest import) so :func:`provisioner.environment`, the CLI and the pytest plugin
resolve a run the same way.

* **options** (:class:`RunOptions` → :func:`resolve_run` → :class:`ResolvedRun`): precedence for the
  layer: ``--layer`` > ``TEST_MODE`` > ``PROVISION_LAYER`` > ``[tool.provisioner] layer`` > ``unit``;
  ``--lm`` overrides the layer's LM mode and ``--record-mode`` the cassette record mode.
* **identity** (:class:`RunIdentity`): one id and one shared directory for every process of a test
  run. The first process of a run (pytest's controller, or a script calling
  :func:`provisioner.environment`) creates the id; xdist workers receive it from the controller,
  subprocesses through ``PROVISION_RUN_ID`` / ``PROVISION_RUN_DIR``. Everything run-wide hangs off
  it: container labels, the watchdog, the LM rate limit, cost limit and ledger (files in the run
  directory).
* **process report** (:class:`ProcessReport`): what one process contributes to the run report.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provisioner.errors import ConfigError
from provisioner.layers import Layer, get_layer
from provisioner.lm.callstats import LMUsage
from provisioner.lm.ledger import RUN_LM_SUBDIR
from provisioner.lmconfig import (
    API_KEY_ENV,
    LM_MODES,
    RECORD_MODES,
    STANDIN_RATE_LIMIT_RPM,
    LMConfig,
    LMMode,
    RecordMode,
    endpoint_problem,
)
from provisioner.settings import DEFAULT_SOURCE, Settings, load_settings


@dataclass(frozen=True)
class RunOptions:
    """What a user chose for this run (``None`` means: take it from the settings)."""

    layer: str | None = None
    lm_mode: LMMode | None = None
    record_mode: RecordMode | None = None
    report_path: Path | None = None
    # Real mode must use the real API: a missing GEMINI_TEST_API_KEY is an error, not the stand-in.
    require_key: bool = False
    # How many shards the suite is split into (pytest-split's --splits): sets lm.shards, so this
    # shard enforces its share of the run's cost and rate limits.
    shards: int | None = None
    # This shard's label in the run history when PROVISION_SHARD is not set: "GROUP/SPLITS" from
    # pytest-split's --group/--splits.
    shard: str | None = None

    def __post_init__(self) -> None:
        if self.lm_mode is not None and self.lm_mode not in LM_MODES:
            raise ConfigError(f"--lm must be one of {', '.join(LM_MODES)}, got {self.lm_mode!r}")
        if self.record_mode is not None and self.record_mode not in RECORD_MODES:
            raise ConfigError(
                f"--record-mode must be one of {', '.join(RECORD_MODES)}, got {self.record_mode!r}"
            )

    def cli_overrides(self) -> dict[str, Any]:
        return {"layer": self.layer, "lm.record_mode": self.record_mode}


@dataclass(frozen=True)
class ResolvedRun:
    """The effective settings, the active layer and the LM configuration a run uses."""

    settings: Settings
    layer: Layer
    lm_config: LMConfig
    project_dir: Path


def resolve_run(
    options: RunOptions,
    project_dir: Path,
    *,
    run_id: str | None = None,
    run_dir: Path | None = None,
) -> ResolvedRun:
    """Load the settings for the project at or above ``project_dir`` with ``options`` applied, and
    resolve the active layer.

    Relative paths (the cassette directory, the state directory) are anchored at the project root
    (:func:`provisioner.settings.project_root`, the same one every CLI command uses), so a run finds
    the same recordings whatever the working directory. ``run_id`` and ``run_dir`` (shared by every
    process of one run) go into the LM configuration: ``<run_dir>/lm`` carries the run's rate limit,
    cost limit and ledger.

    Raises:
        ConfigError: invalid settings; ``require_key`` in real mode without an API key;
            :class:`~provisioner.errors.UnknownLayerError` for an unknown layer.
    """
    settings = load_settings(cli=options.cli_overrides(), project_dir=project_dir)
    root = settings.project_dir
    # The layer as it runs: with --lm, its LM mode (and the description made from it) is --lm's.
    layer = get_layer(settings, settings.layer).with_lm_mode(options.lm_mode)
    base = _with_shards(settings, options.shards)
    lm_config = layer.lm_config(base, options.lm_mode)
    if lm_config.wants_standin and settings.source_of("lm.rate_limit_rpm") == DEFAULT_SOURCE:
        # lm.rate_limit_rpm protects a real Gemini account; the stand-in this run wires in bills
        # nothing, so waiting for Gemini's 10 rpm only made its tests slow. A value the user set
        # still holds (a test of the limit itself needs it).
        lm_config = layer.lm_config(base.model_copy(update={"rate_limit_rpm": STANDIN_RATE_LIMIT_RPM}),
                                    options.lm_mode)
    # The LM's shared state (rate window, cost budget, ledger) lives in <run dir>/lm: the same
    # directory is bind-mounted into the run's worker containers, so limits and ledger are run-wide.
    lm_dir = None if run_dir is None else run_dir / RUN_LM_SUBDIR
    updates: dict[str, Any] = {"run_id": run_id, "run_dir": lm_dir}
    if not lm_config.cache_dir.is_absolute():
        updates["cache_dir"] = root / lm_config.cache_dir
    lm_config = lm_config.model_copy(update=updates).with_run_endpoint()
    if options.require_key and lm_config.calls_gemini and lm_config.api_key is None:
        why = f" ({lm_config.gemini_use})" if lm_config.mode == "cached" else ""
        raise ConfigError(
            f"--require-key: layer {layer.name!r} calls real Gemini{why} but {API_KEY_ENV} is not set "
            "(set it, or drop --require-key to use the Gemini stand-in)"
        )
    problem = endpoint_problem(lm_config, layer=layer.name, in_containers=layer.needs_docker)
    if problem is not None:
        raise ConfigError(problem)
    return ResolvedRun(settings=settings, layer=layer, lm_config=lm_config, project_dir=root)


def _with_shards(settings: Settings, shards: int | None) -> LMConfig:
    """The settings' ``lm`` table with ``lm.shards`` from pytest-split's ``--splits`` when given.

    Raises:
        ConfigError: ``lm.shards`` was set (not a default) to another number than ``--splits``.
    """
    if shards is None or shards == settings.lm.shards:
        return settings.lm
    source = settings.source_of("lm.shards")
    if source != DEFAULT_SOURCE:
        raise ConfigError(f"pytest-split's --splits {shards} and lm.shards={settings.lm.shards} (from "
                          f"{source}) disagree: the run's limits are shared by --splits shards; drop "
                          "lm.shards or make them equal")
    return settings.lm.model_copy(update={"shards": shards})


def state_dir(settings: Settings, project_dir: Path) -> Path:
    """The state directory (``.provision``), anchored at the project when relative."""
    return settings.state_dir if settings.state_dir.is_absolute() else project_dir / settings.state_dir


# -- process report --------------------------------------------------------------------------------

@dataclass
class LeakRecord:
    test: str
    leaks: list[tuple[str, str]]


@dataclass
class ProcessReport:
    """What one process contributes (sent from xdist workers to the controller as JSON)."""

    layer: str
    workers_started: int = 0
    lm: LMUsage = field(default_factory=LMUsage)
    leaks: list[LeakRecord] = field(default_factory=list)
    retained: list[str] = field(default_factory=list)
    # [test id, rule as JSON] of per-test LM rules (@pytest.mark.lm_rules) that answered no request
    unmatched_lm_rules: list[list[str]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProcessReport:
        data = json.loads(text)
        return cls(
            layer=data["layer"],
            workers_started=int(data.get("workers_started", 0)),
            lm=LMUsage(**data.get("lm", {})),
            leaks=[LeakRecord(r["test"], [(x[0], x[1]) for x in r["leaks"]]) for r in data.get("leaks", [])],
            retained=list(data.get("retained", [])),
            unmatched_lm_rules=[[str(x) for x in pair] for pair in data.get("unmatched_lm_rules", [])],
        )


# -- identity --------------------------------------------------------------------------------------

RUN_ID_ENV = "PROVISION_RUN_ID"
RUN_DIR_ENV = "PROVISION_RUN_DIR"
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,40}$")


def new_run_id() -> str:
    """A fresh, sortable run id such as ``r20261125-231502-9f3a1c`` (safe in container names)."""
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a valid run id.

    Raises:
        ConfigError: it is not (``--run-id`` / ``PROVISION_RUN_ID`` are user input).
    """
    if not _RUN_ID.match(run_id):
        raise ConfigError(
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
