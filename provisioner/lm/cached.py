"""The cached LM: VCR-like record and replay of an inner engine into the cassette store.

Record modes (``LMConfig.record_mode``, vcrpy's names):

* ``none`` — replay only. A miss raises :class:`~provisioner.errors.CassetteMissError` at once
  (DSPy sees a non-retried ``LMConfigurationError``), naming the request and how to record it.
* ``once`` — record only into an empty cache directory (checked when the LM is built); once
  recordings exist, behave like ``none``.
* ``new_episodes`` — replay hits, record misses (the default).
* ``all`` — always call the inner engine and overwrite the entry.

The inner engine is ``cached_inner``: ``real`` (Gemini or the stand-in at ``base_url``, with the
run's rate and cost limits) or ``mock``. It is built lazily, on the first miss that records, so a
replay-only run needs no API key at all.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import TYPE_CHECKING, Any

from provisioner.errors import CassetteMissError
from provisioner.lm import callstats as _stats
from provisioner.lm.cassettes import (
    FORMAT,
    CassetteStore,
    canonical_request,
    cassette_key,
    describe,
    now_iso,
    request_summary,
)
from provisioner.lm.engine import EngineBase, Generation, message_pairs, system_text
from provisioner.lm.ledger import Ledger, current_test_id
from provisioner.lm.pricing import TokenUsage
from provisioner.lmconfig import LMConfig
from provisioner.reprs import safe_repr

if TYPE_CHECKING:
    from dspy.lm15 import Request, Response

    from provisioner.lm.gemini import GeminiEngine
    from provisioner.lm.mock import MockEngine

GEMINI_DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com"


def endpoint_identity(config: LMConfig) -> str:
    """What produced the answers: the Gemini endpoint, or the mock with its exact rules."""
    if config.cached_inner == "mock":
        rules = json.dumps([r.model_dump(mode="json") for r in config.mock_rules], sort_keys=True)
        digest = hashlib.sha256(f"{rules}\x00{config.mock_default}".encode()).hexdigest()[:16]
        return f"mock:{digest}"
    return f"gemini@{(config.base_url or GEMINI_DEFAULT_ENDPOINT).rstrip('/')}"


class CachedEngine(EngineBase):
    """A DSPy engine serving recorded answers and recording misses (see the module doc)."""

    kind = "cached"

    def __init__(self, config: LMConfig) -> None:
        self.config = config
        self.store = CassetteStore(config.cache_dir)
        self.identity = endpoint_identity(config)
        self.ledger = Ledger(config.run_dir, run_id=config.run_id, layer=config.layer)
        # vcrpy's "once": a cassette that already had recordings when the run started is not extended.
        once_and_recorded = config.record_mode == "once" and self.store.has_entries()
        self._frozen = config.record_mode == "none" or once_and_recorded
        self._inner: GeminiEngine | MockEngine | None = None
        self._inner_lock = threading.Lock()

    @safe_repr
    def __repr__(self) -> str:
        config = self.config
        return (f"CachedEngine(cache_dir={str(config.cache_dir)!r}, record_mode={config.record_mode!r}, "
                f"inner={config.cached_inner!r})")

    def _inner_engine(self) -> GeminiEngine | MockEngine:
        with self._inner_lock:
            if self._inner is None:
                if self.config.cached_inner == "mock":
                    from provisioner.lm.mock import MockEngine

                    config = self.config
                    self._inner = MockEngine(config.mock_rules, config.mock_default, count_calls=False)
                else:
                    from provisioner.lm.gemini import GeminiEngine

                    self._inner = GeminiEngine(self.config, record=False)
            return self._inner

    def close(self) -> None:
        with self._inner_lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()

    def canonical(self, request: Request) -> dict[str, Any]:
        generation = Generation.of(request, self.config.max_tokens, self.config.temperature)
        return canonical_request(
            identity=self.identity,
            model=self.config.model,
            system=system_text(request),
            messages=message_pairs(request),
            generation={
                "max_tokens": generation.max_tokens, "temperature": generation.temperature,
                "top_p": generation.top_p, "top_k": generation.top_k, "stop": list(generation.stop),
                "seed": generation.seed, "response_format": generation.response_format,
            },
        )

    def complete(self, request: Request) -> Response:
        canonical = self.canonical(request)
        key = cassette_key(canonical)
        if self.config.record_mode != "all":
            entry = self.store.get(key)
            if entry is not None:
                return self._replay(request, key, entry)
        if self._frozen:
            _stats.record_error()
            raise self._miss(key, canonical)
        return self._record(request, key, canonical)

    def _miss(self, key: str, canonical: dict[str, Any]) -> Exception:
        from dspy import lm15

        what = describe(request_summary(canonical))
        mode = self.config.record_mode
        why = "is replay-only" if mode == "none" else "had recordings already, so 'once' does not add to them"
        miss = CassetteMissError(
            f"no cassette for {what} (key {key[:12]}…) under lm.cache_dir={self.config.cache_dir}; "
            f"lm.record_mode={mode!r} {why}. Record it with `pytest --lm cached --record-mode new_episodes` "
            "(or PROVISION_LM__RECORD_MODE=new_episodes) with GEMINI_TEST_API_KEY set"
        )
        error = lm15.ConfigurationError(str(miss), provider="cassette", code="cassette_miss")
        error.__cause__ = miss
        return error

    def _replay(self, request: Request, key: str, entry: dict[str, Any]) -> Response:
        from dspy.lm15 import Message, Response, TextPart, Usage

        response = entry.get("response") or {}
        usage = entry.get("usage") or {}
        input_tokens = int(usage.get("input_tokens") or 0)
        output_tokens = int(usage.get("output_tokens") or 0)
        _stats.record_call("replayed", input_tokens=input_tokens, output_tokens=output_tokens)
        self.ledger.call(model=self.config.model, kind="replayed", input_tokens=input_tokens,
                         output_tokens=output_tokens, cache="hit", cassette=key)
        return Response(
            id=response.get("id"),
            model=response.get("model") or request.model,
            message=Message.assistant([TextPart(str(response.get("text", "")))]),
            finish_reason=response.get("finish_reason") or "stop",
            usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                        reasoning_tokens=int(usage.get("thoughts_tokens") or 0) or None,
                        cache_read_tokens=int(usage.get("cached_tokens") or 0) or None),
        )

    def _record(self, request: Request, key: str, canonical: dict[str, Any]) -> Response:
        from provisioner.lm.engine import response_text
        from provisioner.lm.gemini import GeminiEngine

        inner = self._inner_engine()
        try:
            if isinstance(inner, GeminiEngine):
                outcome = inner.call(request)
                response, usage, cost = outcome.response, outcome.usage, outcome.cost_usd
            else:
                response = inner.complete(request)
                raw = response.usage
                usage = TokenUsage(prompt_tokens=int(raw.input_tokens or 0) if raw else 0,
                                   candidates_tokens=int(raw.output_tokens or 0) if raw else 0)
                cost = 0.0
        except Exception:
            _stats.record_error()
            raise
        test_id = current_test_id()
        self.store.put({
            "format": FORMAT,
            "key": key,
            "recorded_at": now_iso(),
            "identity": self.identity,
            "summary": request_summary(canonical),
            "request": canonical,
            "response": {"text": response_text(response), "finish_reason": response.finish_reason,
                         "model": response.model, "id": response.id},
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.candidates_tokens,
                      "thoughts_tokens": usage.thoughts_tokens, "cached_tokens": usage.cached_tokens},
            "cost_usd": round(cost, 10),
            "test_id": test_id,
        })
        _stats.record_call("recorded", input_tokens=usage.prompt_tokens, output_tokens=usage.output_tokens,
                           cost_usd=cost)
        self.ledger.call(model=self.config.model, kind="recorded", input_tokens=usage.prompt_tokens,
                         output_tokens=usage.candidates_tokens, thoughts_tokens=usage.thoughts_tokens,
                         cached_tokens=usage.cached_tokens, cost_usd=cost, cache="miss", cassette=key)
        return response
