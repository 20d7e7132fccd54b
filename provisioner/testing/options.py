"""Turning the plugin's command-line options into settings, the active layer and its LM configuration.

Plain Python (no pytest import) so :func:`provisioner.environment` and the plugin resolve a run the
same way. Precedence for the layer: ``--layer`` > ``TEST_MODE`` > ``PROVISION_LAYER`` >
``[tool.provisioner] layer`` > ``unit``; ``--lm`` overrides the layer's LM mode and ``--record-mode``
the cassette record mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provisioner.errors import ConfigError
from provisioner.layers import Layer, get_layer
from provisioner.lm.ledger import RUN_LM_SUBDIR
from provisioner.lmconfig import API_KEY_ENV, LM_MODES, RECORD_MODES, LMConfig, LMMode, RecordMode
from provisioner.settings import Settings, load_settings


@dataclass(frozen=True)
class RunOptions:
    """What a user chose for this run (``None`` means: take it from the settings)."""

    layer: str | None = None
    lm_mode: LMMode | None = None
    record_mode: RecordMode | None = None
    report_path: Path | None = None
    # Real mode must use the real API: a missing GEMINI_TEST_API_KEY is an error, not the stand-in.
    require_key: bool = False

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
    layer = get_layer(settings, settings.layer)
    lm_config = settings.lm_for(layer.name, mode=options.lm_mode)
    # The LM's shared state (rate window, cost budget, ledger) lives in <run dir>/lm: the same
    # directory is bind-mounted into the run's worker containers, so limits and ledger are run-wide.
    lm_dir = None if run_dir is None else run_dir / RUN_LM_SUBDIR
    updates: dict[str, Any] = {"run_id": run_id, "run_dir": lm_dir}
    if not lm_config.cache_dir.is_absolute():
        updates["cache_dir"] = root / lm_config.cache_dir
    lm_config = lm_config.model_copy(update=updates)
    if options.require_key and lm_config.mode == "real" and lm_config.api_key is None:
        raise ConfigError(
            f"--require-key: layer {layer.name!r} calls real Gemini but {API_KEY_ENV} is not set "
            "(set it, or drop --require-key to use the Gemini stand-in)"
        )
    return ResolvedRun(settings=settings, layer=layer, lm_config=lm_config, project_dir=root)


def state_dir(settings: Settings, project_dir: Path) -> Path:
    """The state directory (``.provision``), anchored at the project when relative."""
    return settings.state_dir if settings.state_dir.is_absolute() else project_dir / settings.state_dir
