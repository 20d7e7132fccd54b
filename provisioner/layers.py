"""Test layers as data: each one is a recipe for how tests of that layer get their environment.

Built-ins (the plan's test config):

=============  ========  ======  =======  =======  =========
layer          adapter   python  pooling  LM       isolation
=============  ========  ======  =======  =======  =========
unit           mock      no      no       mock     full
integration    bridge    yes     no       cached   namespace
e2e            bridge    yes     yes      real     session
=============  ========  ======  =======  =======  =========

Users override fields of these, or add layers, under ``[tool.provisioner.layers.<name>]``.
A layer's description, unless the user wrote one, is made from its effective fields
(:func:`describe`): a built-in layer whose ``lm_mode`` or pooling a user changed says so, instead of
restating the built-in's settings (a new user's trial: e2e with ``lm_mode = "mock"`` still said
"real Gemini LM").
The LM mode of a layer comes from ``lm_modes[<name>]`` when the user set it there (project file,
environment), else from the layer's own ``lm_mode`` (the user's layer table, else the built-in), else
from the default ``lm_modes`` (:data:`provisioner.settings.DEFAULT_LM_MODES`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from provisioner.errors import ConfigError, UnknownLayerError
from provisioner.lmconfig import LMConfig, LMMode
from provisioner.settings import Isolation, LayerSpec, Settings


class Layer(BaseModel):
    """A fully resolved layer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    adapter: Literal["mock", "bridge"]
    python: bool
    pooling_enabled: bool
    lm_mode: LMMode
    isolation: Isolation
    workers: int = Field(gt=0, description="pool size (pooled layers) or workers started by `up`")
    timeout_s: float = Field(gt=0, description="per-test timeout")
    max_failures: int | None = None
    image: str | None = None
    memory: str | None = None
    cpus: float | None = None
    builtin: bool = False

    @property
    def needs_docker(self) -> bool:
        """Layers whose workers are containers need a Docker engine."""
        return self.adapter == "bridge" and self.python

    @property
    def runs_in_words(self) -> str:
        """Where the layer's programs run, as every message and the README's layer table name it:
        ``in-process (LocalBridge, adapter 'mock')`` or ``bridge containers (adapter 'bridge')``."""
        if self.needs_docker:
            return f"bridge containers (adapter {self.adapter!r})"
        return f"in-process (LocalBridge, adapter {self.adapter!r})"

    @property
    def egress_allowed(self) -> bool:
        """Only real-LM layers may reach the outside world; mock and cached cannot spend money."""
        return self.lm_mode == "real"

    def with_lm_mode(self, mode: LMMode | None) -> Layer:
        """This layer as it runs with ``mode`` (``--lm``; None: unchanged): its ``lm_mode`` and, when
        its description was made from its fields (:func:`describe`), the description too."""
        if mode is None or mode == self.lm_mode:
            return self
        update: dict[str, object] = {"lm_mode": mode}
        if self.description == describe(self):
            update["description"] = describe(self.model_copy(update={"lm_mode": mode}))
        return self.model_copy(update=update)

    def lm_config(self, base: LMConfig, mode: LMMode | None = None) -> LMConfig:
        """The LM configuration this layer runs with: ``base`` (the settings' ``lm`` table) with the
        layer's name and LM mode applied; ``mode`` (``--lm``) overrides the layer's ``lm_mode``. With
        ``lm.shards`` N > 1, the limits are this shard's share (:meth:`LMConfig.shard_share`).

        Raises:
            ConfigError: the rate limit cannot be shared by ``lm.shards`` shards.
        """
        return base.model_copy(update={"mode": mode or self.lm_mode, "layer": self.name}).shard_share()


# No descriptions here: each is made from the layer's effective fields (describe), so it follows a
# user's overrides.
BUILTIN_LAYERS: dict[str, LayerSpec] = {
    "unit": LayerSpec(
        adapter="mock", python=False, pooling_enabled=False, lm_mode="mock", isolation="full",
        timeout_s=30,
    ),
    "integration": LayerSpec(
        adapter="bridge", python=True, pooling_enabled=False, lm_mode="cached", isolation="namespace",
        timeout_s=120,
    ),
    "e2e": LayerSpec(
        adapter="bridge", python=True, pooling_enabled=True, lm_mode="real", isolation="session",
        timeout_s=300,
    ),
}

_LM_WORDS: dict[str, str] = {
    "mock": "mock LM",
    "cached": "cached (record/replay) LM",
    "real": "real Gemini LM with rate and cost limits",
}


def shared_workers_up_to(pooling_enabled: bool | None, workers: int | None) -> int:
    """The most workers the one pool of a pytest run (or of a :func:`provisioner.environment`)
    starts for a container layer: its ``workers`` when pooled, else 1 — shared by every test (each
    in a session of its own). ``provision up`` starts ``workers`` either way. The one rule of
    ``runtime.workers.worker_starts`` and of :func:`describe`."""
    return (workers or 1) if pooling_enabled else 1


def describe(layer: Layer | LayerSpec) -> str:
    """A layer's description from its fields: where its programs run and its LM, e.g. "a warm pool
    of bridge worker containers, real Gemini LM with rate and cost limits" (the built-in e2e's),
    "one bridge worker container shared by the tests, a namespace each (`provision up`: 2),
    cached (record/replay) LM" (the built-in integration's: not pooled, so a pytest run and an API
    environment start one worker, `provision up` its ``workers``)."""
    if not (layer.adapter == "bridge" and layer.python):
        return f"in-process, {_LM_WORDS[str(layer.lm_mode)]}, no containers"
    if layer.isolation == "process":
        where = "fork-mode bridge worker containers, a forked process per test"
    elif layer.pooling_enabled:
        where = "a warm pool of bridge worker containers"
    else:
        shared = shared_workers_up_to(layer.pooling_enabled, layer.workers)
        each = "a namespace each" if layer.isolation == "namespace" else "a session each"
        where = f"{'one' if shared == 1 else shared} bridge worker container shared by the tests, {each}"
        if layer.workers is not None and layer.workers != shared:
            where += f" (`provision up`: {layer.workers})"
    return f"{where}, {_LM_WORDS[str(layer.lm_mode)]}"

_DEFAULTS = LayerSpec(
    adapter="bridge", python=True, pooling_enabled=False, lm_mode="mock", isolation="namespace", timeout_s=120
)


def resolve_layers(settings: Settings) -> dict[str, Layer]:
    """Every layer: built-ins with the user's overrides merged in, then the user's own layers."""
    names = list(BUILTIN_LAYERS) + [n for n in settings.layers if n not in BUILTIN_LAYERS]
    return {name: _resolve(settings, name) for name in names}


def lm_mode_origin(settings: Settings, name: str) -> str:
    """The setting layer ``name``'s LM mode comes from (the rule of the module doc, the one
    :func:`get_layer` applies): ``lm_modes.<name>`` when the user set that entry (or the layer sets
    no ``lm_mode``), else ``layers.<name>.lm_mode`` (the user's layer table), else ``built-in``
    (the built-in layer's own mode) or ``default`` (a layer of the user's without one: the built-in
    default of layer fields)."""
    user_layer = settings.layers.get(name)
    layer_sets_it = user_layer is not None and user_layer.lm_mode is not None
    user_set_mode = settings.source_of(f"lm_modes.{name}") != "default"
    if name in settings.lm_modes and (user_set_mode or not layer_sets_it):
        return f"lm_modes.{name}"
    if layer_sets_it:
        return f"layers.{name}.lm_mode"
    return "built-in" if name in BUILTIN_LAYERS else "default"


def layer_names(settings: Settings) -> list[str]:
    return list(BUILTIN_LAYERS) + [n for n in settings.layers if n not in BUILTIN_LAYERS]


def get_layer(settings: Settings, name: str) -> Layer:
    if name not in BUILTIN_LAYERS and name not in settings.layers:
        raise UnknownLayerError(name, layer_names(settings))
    return _resolve(settings, name)


def _resolve(settings: Settings, name: str) -> Layer:
    merged: dict[str, object] = {}
    for spec in (_DEFAULTS, BUILTIN_LAYERS.get(name), settings.layers.get(name)):
        if spec is not None:
            merged.update(spec.model_dump(exclude_none=True))
    if lm_mode_origin(settings, name) == f"lm_modes.{name}":
        # The default lm_modes cover the built-in layers; a user's [tool.provisioner.layers.e2e]
        # lm_mode = "mock" was silently overridden by them (a new user's trial).
        merged["lm_mode"] = settings.lm_modes[name]
    merged.setdefault("workers", settings.max_pool_size)
    if merged.get("isolation") == "process" and merged.get("adapter") != "bridge":
        raise ConfigError(
            f"layer {name!r}: isolation 'process' gives each test its own forked worker process, which"
            " needs bridge workers; set adapter = 'bridge' (python = true), or pick isolation 'full'"
        )
    if not merged.get("python") and merged.get("adapter") == "bridge":
        raise ConfigError(
            f"layer {name!r}: adapter 'bridge' needs python workers; set python = true or adapter = 'mock'"
        )
    if "description" not in merged:  # none written by the user: made from what the layer is
        merged["description"] = describe(LayerSpec.model_validate(
            {k: v for k, v in merged.items() if k in LayerSpec.model_fields}))
    return Layer(name=name, builtin=name in BUILTIN_LAYERS, **merged)  # type: ignore[arg-type]
