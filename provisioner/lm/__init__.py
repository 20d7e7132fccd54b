"""LM wiring: build a ``dspy.LM`` for a layer's :class:`~provisioner.lmconfig.LMConfig`.

Modes (``LMConfig.mode``):

* ``mock`` — :class:`provisioner.lm.mock.MockEngine`: deterministic, signature-aware, rules and
  injected errors, $0.
* ``cached`` — :class:`provisioner.lm.cached.CachedEngine`: VCR-like record/replay of an inner
  engine (real Gemini or the mock) into one JSON file per request under ``cache_dir``.
* ``real`` — :class:`provisioner.lm.gemini.GeminiEngine`: the google-genai client, with the run's
  rate limit and cost budget (:mod:`provisioner.lm.limits`) and the ledger.

Every managed LM is built with ``cache=False`` (DSPy's response cache keys ignore the engine and
endpoint, so it would serve mock answers to real calls and vice versa) and with
``num_retries=0``: retries of real calls happen inside :class:`GeminiEngine`, bounded by
``max_retries`` and honouring Retry-After, and a replay-only cassette miss must fail at once.

This package runs inside worker containers too: it never imports the runtime, the CLI, docker or
pytest, and it imports dspy and google-genai only when an LM is built.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from provisioner.lm.callstats import CALL_KINDS, LMCallStats, reset_stats, stats
from provisioner.lmconfig import LMConfig

if TYPE_CHECKING:
    import dspy

    from provisioner.lm.engine import EngineBase
    from provisioner.lm.mock import TestRules

# DSPy may import litellm lazily; never let it fetch a price map from the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = [
    "CALL_KINDS",
    "LMCallStats",
    "build_engine",
    "build_lm",
    "dspy_model_name",
    "preload",
    "provisioner_error",
    "reset_stats",
    "stats",
]


def preload(config: LMConfig) -> None:
    """Import what building and calling ``config``'s LM needs (DSPy's LM call path; google-genai when
    it may call Gemini or its stand-in) now: seconds on a cold start (about 4.5 s on an idle 2-core
    machine, `python -X importtime`), which the pytest plugin keeps out of the first test's timeout."""
    import dspy.clients.execution  # noqa: F401

    if config.mode == "real" or (config.mode == "cached" and config.cached_inner == "real"):
        from google import genai  # noqa: F401


def dspy_model_name(config: LMConfig) -> str:
    """The model string the ``dspy.LM`` carries (shows in history and errors)."""
    prefix = "mock" if config.mode == "mock" else "gemini"
    return f"{prefix}/{config.model}"


def build_engine(config: LMConfig, *, rules: TestRules | None = None) -> EngineBase:
    """The engine for ``config.mode`` (without the ``dspy.LM`` around it).

    ``rules``: a test's own mock rules, layered over the layer's engine
    (:class:`provisioner.lm.mock.RulesOverEngine`): a request they match is answered by the mock,
    in every mode, and never recorded into a cassette or sent to Gemini.
    """
    engine = _layer_engine(config)
    if rules is not None:
        from provisioner.lm.mock import RulesOverEngine

        return RulesOverEngine(rules, engine)
    return engine


def _layer_engine(config: LMConfig) -> EngineBase:
    if config.mode == "mock":
        from provisioner.lm.mock import MockEngine

        return MockEngine(config.mock_rules, config.mock_default)
    if config.mode == "real":
        from provisioner.lm.gemini import GeminiEngine

        return GeminiEngine(config)
    from provisioner.lm.cached import CachedEngine

    return CachedEngine(config)


def build_lm(config: LMConfig, *, rules: TestRules | None = None, **lm_kwargs: Any) -> dspy.LM:
    """A ``dspy.LM`` that behaves as ``config`` says. Extra keyword arguments go to ``dspy.LM``.

    ``rules``: a test's own mock rules over the layer's (see :func:`build_engine`).

    Apply it per thread with ``with dspy.context(lm=lm):`` (never ``dspy.configure`` from
    request threads).
    """
    import dspy

    from provisioner.lm.engine import AsyncEngineAdapter

    engine = build_engine(config, rules=rules)
    options: dict[str, Any] = {
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "cache": False,
        "num_retries": 0,
    }
    options.update(lm_kwargs)
    return dspy.LM(dspy_model_name(config), engine=engine, async_engine=AsyncEngineAdapter(engine), **options)


def provisioner_error(exc: BaseException) -> BaseException | None:
    """The provisioner error behind a DSPy LM error, if any.

    DSPy re-raises engine failures as its own ``dspy.utils.exceptions.LM*Error`` types (chained
    with ``from``); this walks the ``__cause__``/``__context__`` chain to find e.g. the
    :class:`~provisioner.errors.CassetteMissError` or
    :class:`~provisioner.errors.CostLimitExceeded` that started it.
    """
    from provisioner.errors import ProvisionerError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ProvisionerError):
            return current
        seen.add(id(current))
        kept = getattr(current, PROVISIONER_CAUSE, None)  # a chain cut for display (see cut_repeated_chain)
        current = kept if isinstance(kept, BaseException) else current.__cause__ or current.__context__
    return None


# The attribute that keeps the provisioner error behind a DSPy error whose shown chain was cut.
PROVISIONER_CAUSE = "provisioner_cause"


def cut_repeated_chain(exc: BaseException) -> bool:
    """Cut ``exc``'s exception chain for display when it only repeats ``exc``'s own text.

    DSPy re-raises an engine failure as its own error with the same text (``raise … from``), over
    DSPy's lm15 wrapper of provisioner's error: a traceback then prints a cassette miss — with its
    diff against the nearest recording — three times. When the provisioner error's text is part of
    ``exc``'s, the chain is dropped (``__cause__ = None``, ``__suppress_context__``) and the error
    kept as ``exc.provisioner_cause``, where :func:`provisioner_error` still finds it. Returns
    whether it cut.

    Only cassette errors (whose text carries a multi-line diff against the nearest recording): for
    the others (``CostLimitExceeded``, ``RateLimitExceeded``, ...) the chain is the only place a test's
    failure names the provisioner error, as docs/protocol.md promises, and their text is one line."""
    from provisioner.errors import CassetteError

    cause = provisioner_error(exc)
    if not isinstance(cause, CassetteError) or cause is exc or str(cause).strip() not in str(exc):
        return False
    setattr(exc, PROVISIONER_CAUSE, cause)
    exc.__cause__ = None
    exc.__suppress_context__ = True
    return True
