"""The LM configuration: one typed object that travels from settings to every worker.

This module sits at the bottom of the dependency graph (pydantic only, no DSPy), so both the
host-side controller and the code inside containers can import it cheaply.

The controller hands an ``LMConfig`` to a worker through its environment: the non-secret part as
JSON in ``PROVISION_LM_CONFIG`` (:meth:`LMConfig.to_worker_env`) and, separately, the secrets
:func:`worker_secrets` decides it gets — the one place that decides who receives the API key
(``GEMINI_TEST_API_KEY``). The key is a ``SecretStr``: it is never part of ``model_dump_json()``
output, labels, state files, cassettes or logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from provisioner.errors import ConfigError

LMMode = Literal["mock", "cached", "real"]
RecordMode = Literal["none", "once", "new_episodes", "all"]
LM_MODES: tuple[str, ...] = ("mock", "cached", "real")
RECORD_MODES: tuple[str, ...] = ("none", "once", "new_episodes", "all")

LM_CONFIG_ENV = "PROVISION_LM_CONFIG"
API_KEY_ENV = "GEMINI_TEST_API_KEY"
CACHE_DIR_ENV = "LM_CACHE_DIR"
DEFAULT_MODEL = "gemini-2.5-flash-lite"

# Fields that belong to the run, not to a client of one of its workers: where real calls go and
# with which key (``base_url``, ``endpoint_kind``, ``api_key``), what the run may spend and how fast
# (the limits; ``run_dir`` holds the shared budget, so a fresh one would be a fresh budget), which
# run and layer calls are booked to, the price table the budget is computed with, and where and how
# cassettes are recorded (recording from the real API spends money and writes into the project).
# Fields the run fills in itself (the run's directory and id, the active layer, what answers at
# base_url, a shard's share, the cassette folder as the user sees it): not settings a user sets, so an
# unknown-key error does not offer them.
# Each such field carries ``json_schema_extra=INTERNAL`` in its Field; :data:`INTERNAL_LM_FIELDS` and
# `provision config` derive from that mark (:func:`internal_fields`), not from a list kept by hand.
INTERNAL: dict[str, Any] = {"internal": True}

# The controller sets them when it starts the workers; ``configure_lm`` over the bridge refuses
# every one of them by name.
RUN_OWNED_LM_FIELDS: tuple[str, ...] = (
    "api_key",
    "base_url",
    "endpoint_kind",
    "cost_limit_usd",
    "rate_limit_rpm",
    "shards",
    "limits_share_of",
    "rate_limit_wait_s",
    "monthly_budget_usd",
    "prices",
    "run_dir",
    "run_id",
    "layer",
    "cache_dir",
    "cache_dir_shown",
    "record_mode",
    "cached_inner",
)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at commas outside brackets (``a: dict[str, int], b`` is two parts)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def signature_field_names(signature: str) -> tuple[frozenset[str], frozenset[str]]:
    """(input names, output names) of a DSPy string signature such as ``"a, b: int -> c: list[str]"``.

    Raises:
        ValueError: no ``->``, or a field name that is not an identifier.
    """
    if signature.count("->") != 1:
        raise ValueError(f"signature {signature!r} must read 'inputs -> outputs', e.g. 'question -> answer'")
    sides = []
    for side in signature.split("->"):
        names = [part.split(":", 1)[0].strip() for part in _split_top_level(side)]
        for name in names:
            if not name.isidentifier():
                raise ValueError(f"signature {signature!r}: {name!r} is not a field name")
        sides.append(frozenset(names))
    if not sides[1]:
        raise ValueError(f"signature {signature!r} has no output field")
    return sides[0], sides[1]


class MockRule(BaseModel):
    """One rule of the mock LM: when an input matches, answer with these outputs (or an error).

    ``match`` maps input field names to a pattern; ``"*"`` as a field name matches any field, and
    ``"*"`` as a pattern any value.
    ``kind`` says how patterns compare: ``exact``, ``substring`` or ``regex``.
    ``outputs`` maps output field names to values; fields not named get a per-type default.
    ``error`` injects a failure instead: ``rate_limit``, ``timeout``, ``server_error`` or ``malformed``.
    ``latency_ms`` delays the answer (a simulated slow LM).
    ``signature`` scopes the rule to one program: a DSPy string signature (``"question -> answer"``,
    ``"ticket -> category, urgent: bool"``; types are ignored). The rule is then checked only against
    requests whose signature has exactly these input and output field names, and the fields it names
    must be among them (else a validation error). Without it, the rule is checked against every
    request whose signature has the fields it names (and every request without a signature).
    """

    model_config = ConfigDict(extra="forbid")

    match: dict[str, str] = Field(default_factory=dict)
    kind: Literal["exact", "substring", "regex"] = "substring"
    outputs: dict[str, Any] = Field(default_factory=dict)
    error: Literal["rate_limit", "timeout", "server_error", "malformed"] | None = None
    # Simulated slow LM: the engine sleeps this long before answering (or failing). It models a
    # slow provider for tests of timeouts and concurrency; it is not a synchronisation device.
    latency_ms: int = Field(default=0, ge=0)
    signature: str | None = None

    def signature_fields(self) -> tuple[frozenset[str], frozenset[str]] | None:
        """(input names, output names) of :attr:`signature`, or None for a rule without one."""
        return None if self.signature is None else signature_field_names(self.signature)

    @model_validator(mode="after")
    def _check_signature(self) -> MockRule:
        fields = self.signature_fields()
        if fields is None:
            return self
        for side, names, known in (("match", self.match, fields[0]), ("outputs", self.outputs, fields[1])):
            for name in names:
                if name != "*" and name not in known:
                    kind = "an input" if side == "match" else "an output"
                    raise ValueError(
                        f"{side}[{name!r}] is not {kind} field of the rule's signature {self.signature!r} "
                        f"({', '.join(sorted(known)) or 'none'}); fix the field name or the signature"
                    )
        return self

    @model_validator(mode="after")
    def _check_regex(self) -> MockRule:
        # The `regex` package: the engine that matches these rules (with a time bound, see
        # provisioner.lm.mock), so a pattern valid here is valid there.
        if self.kind == "regex":
            for field, pattern in self.match.items():
                if pattern == "*":  # "*" means any value in every kind, not a regex
                    continue
                try:
                    regex.compile(pattern)
                except regex.error as exc:
                    raise ValueError(f"match[{field!r}] is not a valid regex: {exc}") from exc
        return self


class ModelPrice(BaseModel):
    """USD per one million tokens."""

    model_config = ConfigDict(extra="forbid")

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)


#: ``lm.rate_limit_rpm`` of a run whose real calls the Gemini stand-in answers, unless the user set
#: ``lm.rate_limit_rpm`` (then theirs holds). The limit's default (10, a free Gemini tier's) protects
#: a real account; the stand-in bills nothing, and waiting for 10 rpm made a 29-call run take 137 s.
#: Still a limit (a runaway loop stays bounded), just not one a test suite waits for.
STANDIN_RATE_LIMIT_RPM = 1000

class LMConfig(BaseModel):
    """How a layer's LM behaves. Part of :class:`provisioner.settings.Settings` as ``lm``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: LMMode = "mock"
    model: str = DEFAULT_MODEL
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=1024, gt=0)
    cache_dir: Path = Path("test/fixtures/lm_responses")
    # How messages name ``cache_dir`` when it is not the path the user knows: a worker container's
    # cassettes are mounted at /provision/cassettes, so the controller passes the host folder
    # (relative to the project root, e.g. "test/fixtures/lm_responses"). None: ``cache_dir`` itself.
    cache_dir_shown: str | None = Field(default=None, json_schema_extra=INTERNAL)
    record_mode: RecordMode = "new_episodes"
    # What the cached mode records from on a miss: the real Gemini engine (default) or the mock.
    cached_inner: Literal["real", "mock"] = "real"
    rate_limit_rpm: int = Field(default=10, gt=0)
    cost_limit_usd: float = Field(default=1.00, ge=0)
    monthly_budget_usd: float = Field(default=10.0, ge=0)
    # How many shards (pytest runs of one suite side by side, e.g. pytest-split groups on separate CI
    # runners) share cost_limit_usd and rate_limit_rpm: each enforces its share (shard_share). The
    # pytest plugin sets it from pytest-split's --splits.
    shards: int = Field(default=1, ge=1)
    # Set by shard_share: cost_limit_usd and rate_limit_rpm are one shard's share, the run's divided
    # by this many (1: the whole run's). Errors name it; nothing divides by it again.
    limits_share_of: int = Field(default=1, ge=1, json_schema_extra=INTERNAL)
    base_url: str | None = None
    # What answers at ``base_url``: real Gemini (or a proxy to it) or the Gemini stand-in. Only the
    # controller that wired the stand-in in sets "standin" (a base_url alone does not make an
    # endpoint a stand-in); cassettes and the ledger mark what the stand-in answered.
    endpoint_kind: Literal["gemini", "standin"] = Field(default="gemini", json_schema_extra=INTERNAL)
    api_key: SecretStr | None = Field(default=None, exclude=True)
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    # Backoff of real calls after 429/5xx when the server gives no Retry-After: base * 2**attempt,
    # capped (a server's Retry-After is honoured up to the cap too).
    retry_base_delay_s: float = Field(default=1.0, ge=0)
    retry_max_delay_s: float = Field(default=60.0, ge=0)
    # How long a real call may wait for a slot of the run's request-per-minute budget before it
    # fails with RateLimitExceeded.
    rate_limit_wait_s: float = Field(default=120.0, ge=0)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)
    mock_rules: list[MockRule] = Field(default_factory=list)
    mock_default: str = "mock_response"
    # Where the run's shared state lives (rate-limit window, cost budget, ledger). All workers and
    # processes of one run point at the same directory; None means a private per-process directory.
    run_dir: Path | None = Field(default=None, json_schema_extra=INTERNAL)
    run_id: str | None = Field(default=None, json_schema_extra=INTERNAL)
    layer: str | None = Field(default=None, json_schema_extra=INTERNAL)

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must not be empty")
        return value

    def shard_share(self) -> LMConfig:
        """This configuration's limits for one of ``shards`` shards: ``cost_limit_usd / shards`` dollars
        and ``rate_limit_rpm // shards`` requests per minute, so N shards together never pass the run's
        limits, whether they share a host or not (each shard's own run directory enforces its share).
        The copy says ``shards=1`` and ``limits_share_of=shards``: its limits are already a share, so
        applying this again changes nothing.

        Raises:
            ConfigError: ``rate_limit_rpm`` is below ``shards`` (a shard needs one request a minute).
        """
        if self.shards == 1:
            return self
        if self.rate_limit_rpm < self.shards:
            raise ConfigError(
                f"lm.rate_limit_rpm={self.rate_limit_rpm} cannot be shared by lm.shards={self.shards} "
                "shards (each needs at least 1 request/minute): raise lm.rate_limit_rpm or run fewer shards"
            )
        return self.model_copy(update={"cost_limit_usd": self.cost_limit_usd / self.shards,
                                       "rate_limit_rpm": self.rate_limit_rpm // self.shards, "shards": 1,
                                       "limits_share_of": self.shards})

    @property
    def limits_note(self) -> str:
        """What errors about the limits add: which share of the run's limits this configuration has."""
        if self.limits_share_of == 1:
            return ""
        return (f" (this shard's share: the run's lm.cost_limit_usd and lm.rate_limit_rpm divided by "
                f"lm.shards={self.limits_share_of})")

    # -- hand-over to workers -------------------------------------------------------------------

    def public_json(self) -> str:
        """The configuration without the API key, as compact JSON."""
        return self.model_dump_json(exclude={"api_key"})

    @property
    def calls_gemini(self) -> bool:
        """This configuration can make Gemini calls: ``real`` mode, or ``cached`` mode recording its
        misses from the real engine (``cached_inner="real"`` and a ``record_mode`` other than ``none``)."""
        return self.mode == "real" or (
            self.mode == "cached" and self.cached_inner == "real" and self.record_mode != "none"
        )

    @property
    def wants_standin(self) -> bool:
        """The run wires the Gemini stand-in in for this configuration: it calls Gemini
        (:attr:`calls_gemini`: real mode, or cached mode recording its misses from Gemini) and has
        neither an API key nor a ``base_url``. The one rule for in-process LMs
        (``provisioner.api.Environment.uses_standin``), worker containers
        (``provisioner.runtime.recipes.plan_run``) and the run's defaults (``provisioner.run``)."""
        return self.calls_gemini and self.answered_by_standin

    @property
    def answered_by_standin(self) -> bool:
        """The run's Gemini for this configuration is the stand-in it wires in: real mode, or cached
        mode recording from Gemini in *any* record mode, without an API key or ``base_url``. Unlike
        :attr:`wants_standin` this holds for a replay-only run too (which starts no stand-in): its
        cassettes are those the stand-in recorded (``endpoint_kind = "standin"``, keyed
        ``gemini-standin``), so a replay finds what a recording run wrote."""
        gemini = self.mode == "real" or (self.mode == "cached" and self.cached_inner == "real")
        return gemini and self.api_key is None and self.base_url is None

    def with_run_endpoint(self) -> LMConfig:
        """This configuration with ``endpoint_kind`` set by the run's rule (:attr:`answered_by_standin`):
        what the controller hands to its in-process LMs and worker containers."""
        return self.model_copy(update={"endpoint_kind": "standin"}) if self.answered_by_standin else self

    @property
    def gemini_use(self) -> str:
        """Why this configuration calls Gemini, in words for messages."""
        if self.mode == "cached":
            return (f"recording cassette misses from Gemini (lm.mode='cached', lm.cached_inner='real', "
                    f"lm.record_mode={self.record_mode!r})")
        return f"real mode (lm.mode={self.mode!r})"

    @property
    def gemini_alternatives(self) -> str:
        """What to do instead of calling Gemini, in words for messages ("or ...")."""
        if self.mode == "cached":
            return "or record from the mock (lm.cached_inner='mock'), or replay only (--record-mode none)"
        return "or use --lm mock / --lm cached"

    def to_worker_env(self) -> dict[str, str]:
        """The environment variable that gives a worker this LM configuration, without any secret:
        ``{"PROVISION_LM_CONFIG": <JSON>}``. Which secrets a worker gets is :func:`worker_secrets`'s call."""
        return {LM_CONFIG_ENV: self.public_json()}

    @classmethod
    def from_worker_env(cls, environ: Mapping[str, str]) -> LMConfig | None:
        """The configuration a controller handed over, or None when there is none."""
        raw = environ.get(LM_CONFIG_ENV)
        if not raw:
            return None
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{LM_CONFIG_ENV} must hold a JSON object")
        key = environ.get(API_KEY_ENV)
        if key:
            data["api_key"] = key
        return cls.model_validate(data)


def _on_loopback(url: str) -> bool:
    """``url``'s host is this machine's loopback (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_problem(lm: LMConfig, *, layer: str, in_containers: bool) -> str | None:
    """Why ``lm``'s Gemini calls cannot be made as configured (None: they can), checked when a run
    starts so a run stops with a usage error naming the setting instead of failing every test.

    ``in_containers``: the layer's LM calls are made in worker containers (a bridge layer). Only a
    ``base_url`` the user set is checked (without one the run wires in the real API or its own
    stand-in, :attr:`LMConfig.wants_standin`): it needs a key, and worker containers cannot reach
    this machine's loopback."""
    if not lm.calls_gemini or lm.base_url is None or lm.endpoint_kind == "standin":
        return None
    instead = lm.gemini_alternatives
    if lm.api_key is None or not lm.api_key.get_secret_value():
        return (f"lm.base_url={lm.base_url} is set but {API_KEY_ENV} is not: layer {layer!r} calls Gemini "
                f"there ({lm.gemini_use}) and every call needs a key; "
                f"export {API_KEY_ENV}=<that endpoint's key> "
                f"(`provision standin gemini` accepts any non-empty key unless started with {API_KEY_ENV} "
                f"set), or unset lm.base_url (PROVISION_LM__BASE_URL) to let the run start its own Gemini "
                f"stand-in, {instead}")
    if in_containers and _on_loopback(lm.base_url):
        return (f"lm.base_url={lm.base_url} is on this machine's loopback, which the worker containers of "
                f"layer {layer!r} cannot reach ({lm.gemini_use}); unset lm.base_url (PROVISION_LM__BASE_URL) "
                f"and {API_KEY_ENV} to let the run start its own Gemini stand-in on the workers' network, "
                f"{instead}")
    return None


def internal_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` marked ``json_schema_extra=INTERNAL``: set by the run, not by a user."""
    return tuple(name for name, field in model.model_fields.items()
                 if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("internal"))


#: The LM fields the run fills in itself (cache_dir_shown, limits_share_of, endpoint_kind, run_dir,
#: run_id, layer): an unknown-key error does not offer them, `provision config` does not list them.
INTERNAL_LM_FIELDS: tuple[str, ...] = internal_fields(LMConfig)

# The stand-in accepts any non-empty key; the Gemini engine insists on having one.
STANDIN_KEY = "provision-standin-not-a-secret"
GeminiEndpoint = Literal["api", "standin", "none"]


def worker_secrets(lm: LMConfig, *, endpoint: GeminiEndpoint) -> dict[str, str]:
    """The secret environment of a worker running ``lm`` — the one policy for the API key.

    ``endpoint``: what the worker can reach for Gemini calls — ``"api"`` the real API (a worker
    process on the host, a container with a route out), ``"standin"`` the run's Gemini stand-in,
    ``"none"`` nothing (a container on an internal network).

    The real key goes only to a worker that makes Gemini calls (:attr:`LMConfig.calls_gemini`) *and*
    can reach the real API: never to a mock worker, a replay-only cached worker or a worker cut off
    from the internet, so none of them can spend money or leak the key, even by mistake. A worker
    of the stand-in gets :data:`STANDIN_KEY` (not a secret). Returns ``{"GEMINI_TEST_API_KEY": …}``
    or ``{}``.
    """
    if not lm.calls_gemini or endpoint == "none":
        return {}
    if endpoint == "standin":
        return {API_KEY_ENV: STANDIN_KEY}
    if lm.api_key is None or not lm.api_key.get_secret_value():
        return {}
    return {API_KEY_ENV: lm.api_key.get_secret_value()}
