"""Settings for the whole tool, with the source of every value.

Sources, highest precedence first:

1. CLI flags (passed to :func:`load_settings` as ``cli``),
2. environment variables ``PROVISION_*`` (nested with ``__``, e.g. ``PROVISION_LM__MODE``), plus the
   aliases ``TEST_MODE`` (layer), ``LM_CACHE_DIR`` (lm.cache_dir) and ``GEMINI_TEST_API_KEY`` (lm.api_key),
3. ``[tool.provisioner]`` in the project's ``pyproject.toml``, or a ``provision.toml`` beside it,
4. defaults.

A bad value raises :class:`~provisioner.errors.ConfigError` naming the field, the value and its source.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from provisioner.errors import ConfigError, UnknownNameError
from provisioner.lmconfig import API_KEY_ENV, CACHE_DIR_ENV, LMConfig, LMMode, internal_fields

ENV_PREFIX = "PROVISION_"
LAYER_ALIAS_ENV = "TEST_MODE"
DEFAULT_SOURCE = "default"

DEFAULT_LM_MODES: dict[str, LMMode] = {"unit": "mock", "integration": "cached", "e2e": "real"}

CleanupPolicy = Literal["aggressive", "on_success", "never"]
Isolation = Literal["full", "namespace", "session", "process"]


class WorkerSettings(BaseModel):
    """The bridge worker process (inside a container or spawned locally)."""

    model_config = ConfigDict(extra="forbid")

    max_frame_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_inflight: int = Field(default=8, gt=0, description="concurrent execute_program calls per worker")
    max_connections: int = Field(
        default=256, gt=0, description="capped at run time below the container's pids limit (one thread each)"
    )
    # Bounds against hostile or runaway clients (docs/protocol.md, "Starting a worker"); the defaults
    # are provisioner.bridge.server's and programs' DEFAULT_* constants.
    max_inflight_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="request bodies held at once")
    frame_timeout_s: float = Field(default=30.0, gt=0, description="a started frame must arrive within it")
    max_programs: int = Field(default=5000, gt=0, description="programs per worker")
    max_sessions: int = Field(default=2000, gt=0, description="sessions per worker")
    max_inflight_per_session: int | None = Field(
        default=None, gt=0,
        description="execution slots one session may hold at once; default max(1, max_inflight // 2)",
    )

    @model_validator(mode="after")
    def _per_session_within_the_worker(self) -> WorkerSettings:
        # A session's share above the worker's slots could never be used: the worker would quietly
        # cap it (bridge.server), and the user would believe their setting applies.
        if self.max_inflight_per_session is not None and self.max_inflight_per_session > self.max_inflight:
            raise ValueError(
                f"max_inflight_per_session={self.max_inflight_per_session} is more than max_inflight="
                f"{self.max_inflight} (the worker's execution slots): a session cannot hold more slots "
                "than its worker has; lower worker.max_inflight_per_session or raise worker.max_inflight")
        return self


class ContainerSettings(BaseModel):
    """Images and per-container limits."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, description="worker image; default: the content-hashed build")
    base: Literal["auto", "python", "debootstrap"] = "auto"
    memory: str = "1g"
    cpus: float = Field(default=1.0, gt=0)
    pids_limit: int = Field(default=256, gt=0)
    read_only: bool = True
    ready_timeout_s: float = Field(default=60.0, gt=0)
    recycle_after_sessions: int = Field(default=200, gt=0)
    recycle_after_s: float = Field(default=3600.0, gt=0)
    watchdog_interval_s: float = Field(default=0.5, gt=0)


class LayerSpec(BaseModel):
    """A layer as written in configuration: every field optional, merged over a built-in or defaults."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    adapter: Literal["mock", "bridge"] | None = None
    python: bool | None = None
    pooling_enabled: bool | None = None
    lm_mode: LMMode | None = None
    isolation: Isolation | None = None
    workers: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)
    max_failures: int | None = Field(default=None, ge=0)
    image: str | None = None
    memory: str | None = None
    cpus: float | None = Field(default=None, gt=0)


_search_start: ContextVar[Path | None] = ContextVar("provisioner_project_dir", default=None)


PROJECT_FILE = "provision.toml"


def _walk_project(start: Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """(root folder, settings file or None, its [tool.provisioner] table) for a walk up from ``start``.

    The first folder holding ``provision.toml``, or a ``pyproject.toml``, ends the walk: a
    ``pyproject.toml`` marks the project root even without our table. Without either, ``start`` is the
    root (the folder a command runs in).
    """
    start = start.absolute()
    for folder in (start, *start.parents):
        standalone = folder / PROJECT_FILE
        if standalone.is_file():
            data = _read_toml(standalone)
            return folder, standalone, data.get("tool", {}).get("provisioner", data)
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            table = _read_toml(pyproject).get("tool", {}).get("provisioner")
            return folder, (pyproject if table is not None else None), dict(table or {})
    return start, None, {}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def project_root(start: Path | None = None) -> Path:
    """The project's root folder: where ``provision.toml`` or ``pyproject.toml`` is, walking up.

    The one answer to "where is the project" for every CLI command, the pytest plugin and
    :func:`provisioner.environment`: relative paths in the settings (``state_dir``, ``lm.cache_dir``)
    are anchored here, so ``provision cassettes verify`` run from ``tests/`` checks the same
    cassettes pytest replays. ``start`` defaults to the current directory; without a project file
    above it, ``start`` itself is the root.
    """
    return _walk_project(start or Path.cwd())[0]


def find_project_file(start: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest ``provision.toml``, or ``pyproject.toml`` with ``[tool.provisioner]``, walking up
    (a ``pyproject.toml`` without the table ends the walk: it marks the project root)."""
    _root, path, table = _walk_project(start)
    return (path, table) if path is not None else None


class _ProjectFileSource(PydanticBaseSettingsSource):
    """``[tool.provisioner]`` in pyproject.toml, or provision.toml."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        start = _search_start.get() or Path.cwd()
        found = find_project_file(start)
        self.path: Path | None = found[0] if found else None
        self.data: dict[str, Any] = dict(found[1]) if found else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)

    @property
    def label(self) -> str:
        if self.path is None:
            return "project file"
        return f"{self.path.name} [tool.provisioner]" if self.path.name == "pyproject.toml" else str(
            self.path.name
        )


class _AliasEnvSource(PydanticBaseSettingsSource):
    """The un-prefixed variables users already know: TEST_MODE, LM_CACHE_DIR, GEMINI_TEST_API_KEY."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if os.environ.get(LAYER_ALIAS_ENV):
            out["layer"] = os.environ[LAYER_ALIAS_ENV]
        lm: dict[str, Any] = {}
        if os.environ.get(CACHE_DIR_ENV):
            lm["cache_dir"] = os.environ[CACHE_DIR_ENV]
        if os.environ.get(API_KEY_ENV):
            lm["api_key"] = os.environ[API_KEY_ENV]
        if lm:
            out["lm"] = lm
        return out


#: Seconds a worker request may take by default (``process_timeout``), counted from its arrival (the
#: wait for an execution slot included): the worker then answers ``Timeout`` (with the LM calls made
#: so far, ``lm_usage``) and the request stays the caller's error.
DEFAULT_PROCESS_TIMEOUT_S = 30.0
#: Seconds a host-side client waits for a reply beyond the worker's ``process_timeout``: the time the
#: worker's ``Timeout`` reply needs to be written and to travel back (relay, published port, a
#: loaded host). A client that gave up at ``process_timeout`` itself raced the worker's reply and,
#: when it won, dropped the connection with the reply, so the cost in its ``lm_usage`` was never
#: booked. 5 s: the reply is one small frame the worker writes at its deadline; measured, it came
#: at most 33 ms after the deadline through a worker container at load 10 (benchmarks/
#: bench_reply_grace.py, docs/benchmarks.md "Timeout replies and the client's grace"); the rest is
#: room for a loaded host's scheduling (threads and the relay waiting for a core), not for work.
REPLY_GRACE_S = 5.0


def reply_timeout(process_timeout: float) -> float:
    """Seconds a client waits for the reply to a request a worker bounds by ``process_timeout``
    seconds: ``process_timeout + REPLY_GRACE_S``, so the worker's own ``Timeout`` reply comes first."""
    return process_timeout + REPLY_GRACE_S


class Settings(BaseSettings):
    """Every setting of provisioner. Build it with :func:`load_settings` to get provenance."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    layer: str = "unit"
    max_python_processes: int = Field(default=4, gt=0)
    max_pool_size: int = Field(default=2, gt=0)
    process_timeout: float = Field(default=DEFAULT_PROCESS_TIMEOUT_S, gt=0,
                                   description="seconds a worker request may take from its arrival,"
                                               " the wait for an execution slot included")
    lm_modes: dict[str, LMMode] = Field(default_factory=lambda: dict(DEFAULT_LM_MODES))
    cleanup_policy: CleanupPolicy = "aggressive"
    retain_on_failure: bool = True
    parallel: bool = True
    max_parallel_cases: int = Field(default_factory=lambda: os.cpu_count() or 1, gt=0)
    state_dir: Path = Path(".provision")
    publish_host: str | None = Field(
        default=None,
        description="the engine host's address workers are published on (default: 127.0.0.1 for a "
        "local engine, the host of DOCKER_HOST for a remote one)",
    )
    lm: LMConfig = Field(default_factory=LMConfig)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    container: ContainerSettings = Field(default_factory=ContainerSettings)
    layers: dict[str, LayerSpec] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _AliasEnvSource(settings_cls), _ProjectFileSource(settings_cls))

    # Provenance: dotted field path -> human-readable source. Filled by load_settings().
    _sources: dict[str, str] = {}
    _root: Path | None = None

    @property
    def request_timeout(self) -> float:
        """Seconds a host-side client waits for a worker's reply: :func:`reply_timeout` of
        ``process_timeout`` (the worker's ``Timeout`` reply, with its ``lm_usage``, arrives first)."""
        return reply_timeout(self.process_timeout)

    @property
    def project_dir(self) -> Path:
        """The project root these settings were loaded for (see :func:`project_root`)."""
        return self._root if self._root is not None else project_root()

    def source_of(self, path: str) -> str:
        """Where the value at a dotted path (``lm.mode``) came from."""
        return _lookup_source(self._sources, path)

    @property
    def sources(self) -> dict[str, str]:
        return dict(self._sources)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, path + ".")
        else:
            yield path, value


def _lookup_source(sources: Mapping[str, str], path: str) -> str:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in sources:
            return sources[candidate]
    # A parent set as a whole (e.g. lm_modes from one table): any child path below it.
    for known, label in sources.items():
        if known.startswith(path + "."):
            return label
    return DEFAULT_SOURCE


def _env_label(path: str) -> str:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        name = ENV_PREFIX + "__".join(parts[:end]).upper()
        if name in os.environ:
            return f"env {name}"
    return f"env {ENV_PREFIX}{'__'.join(parts).upper()}"


def _alias_label(path: str) -> str:
    return {
        "layer": f"env {LAYER_ALIAS_ENV}",
        "lm.cache_dir": f"env {CACHE_DIR_ENV}",
        "lm.api_key": f"env {API_KEY_ENV}",
    }.get(path, "env")


def load_settings(
    cli: Mapping[str, Any] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build the effective settings and remember where each value came from.

    ``cli`` holds overrides from command-line flags, as a nested dict (``{"lm": {"mode": "real"}}``)
    or with dotted keys (``{"lm.mode": "real"}``); ``None`` values are ignored. ``project_dir`` is
    where the search for the project file starts (default: the current directory); relative
    ``state_dir`` and ``lm.cache_dir`` come back absolute, anchored at the :func:`project_root`.

    Raises:
        ConfigError: a value is invalid (names the field, the value and its source), or a key is not
            a setting (:class:`~provisioner.errors.UnknownNameError`, with a "did you mean").
    """
    cli_nested = _nest({k: v for k, v in (cli or {}).items() if v is not None})
    root = project_root(Path(project_dir) if project_dir is not None else None)
    token = _search_start.set(root)
    try:
        project = _ProjectFileSource(Settings)
        env = EnvSettingsSource(
            Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
        )
        alias = _AliasEnvSource(Settings)
        sources: dict[str, str] = {}
        # Lowest precedence first, so higher ones overwrite.
        for data, label in (
            (project(), lambda _p: project.label),
            (alias(), _alias_label),
            (env(), _env_label),
            (cli_nested, lambda p: f"cli --{p.split('.')[-1].replace('_', '-')}"),
        ):
            for path, _value in _flatten(data):
                _drop_below(sources, path)
                sources[path] = label(path)
        try:
            settings = Settings(**cli_nested)
        except ValidationError as exc:
            raise _explain(exc, sources) from None
    finally:
        _search_start.reset(token)
    settings = _anchored(settings, root)
    settings._sources = sources
    settings._root = root
    return settings


def _anchored(settings: Settings, root: Path) -> Settings:
    """Relative paths of the settings made absolute at the project root."""
    updates: dict[str, Any] = {}
    if not settings.state_dir.is_absolute():
        updates["state_dir"] = root / settings.state_dir
    if not settings.lm.cache_dir.is_absolute():
        updates["lm"] = settings.lm.model_copy(update={"cache_dir": root / settings.lm.cache_dir})
    return settings.model_copy(update=updates) if updates else settings


def _drop_below(sources: dict[str, str], path: str) -> None:
    for known in [k for k in sources if k.startswith(path + ".") or path.startswith(k + ".")]:
        del sources[known]


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def _explain(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """One line per problem; an unknown key makes the whole an :class:`UnknownNameError` (a usage
    error with "did you mean"), listing the other problems after it."""
    lines = []
    first_unknown: tuple[str, str, list[str], str] | None = None
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        origin = _lookup_source(sources, path)
        if err["type"] == "extra_forbidden":
            known = _known_keys([str(p) for p in err["loc"][:-1]])
            parent = ".".join(str(p) for p in err["loc"][:-1])
            what = f"setting in {parent!r}" if parent else "setting"
            if first_unknown is None:
                first_unknown = (what, str(err["loc"][-1]), known, origin)
                continue
            another = UnknownNameError(what, str(err["loc"][-1]), known, plural="keys")
            lines.append(f"{another} (from {origin})")
            continue
        value = err.get("input")
        shown = "<secret>" if "api_key" in path else repr(value)
        line = f"invalid setting {path!r} = {shown} (from {origin}): {err['msg']}"
        suggestion = _closest_choice(err) if "api_key" not in path else None
        if suggestion is not None:
            line += f" (did you mean {suggestion!r}?)"
        lines.append(line)
    if first_unknown is not None:
        what, name, known, origin = first_unknown
        return UnknownNameError(what, name, known, plural="keys", hint=f"from {origin}", more=lines)
    return ConfigError("\n".join(lines))


def _closest_choice(err: Any) -> str | None:
    """For a value that must be one of a fixed set (pydantic's ``literal_error``/``enum`` errors,
    whose ``ctx["expected"]`` lists the choices as ``'a', 'b' or 'c'``): the choice closest to the
    given string, or None."""
    import re

    from provisioner.errors import did_you_mean

    if err.get("type") not in ("literal_error", "enum") or not isinstance(err.get("input"), str):
        return None
    choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
    return did_you_mean(err["input"], choices) if choices else None


def _known_keys(parents: list[str]) -> list[str]:
    """The field names a settings table at ``parents`` (e.g. ``["layers", "smoke"]``) accepts."""
    model: Any = Settings
    for part in parents:
        if model is Settings and part == "layers":
            model = dict[str, LayerSpec]
            continue
        if model == dict[str, LayerSpec]:
            model = LayerSpec
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    if not hasattr(model, "model_fields"):
        return []
    internal = internal_fields(model)
    return [name for name in model.model_fields if name not in internal]


def user_values(settings: Settings) -> dict[str, Any]:
    """``settings.model_dump(mode="json")`` without the fields the run fills in itself (marked
    ``json_schema_extra=INTERNAL``, :func:`provisioner.lmconfig.internal_fields`), at any depth:
    what `provision config` shows as settings a user can set."""
    return _without_internal(type(settings), settings.model_dump(mode="json"))


def _without_internal(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    hidden = set(internal_fields(model))
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name in hidden:
            continue
        field = model.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            value = _without_internal(annotation, value)
        out[name] = value
    return out
