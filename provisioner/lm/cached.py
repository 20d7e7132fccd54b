"""The cached LM: VCR-like record and replay of an inner engine into the cassette store.

Record modes (``LMConfig.record_mode``, vcrpy's names):

* ``none`` — replay only. A miss raises :class:`~provisioner.errors.CassetteMissError` at once
  (DSPy sees a non-retried ``LMConfigurationError``), naming the request, how to record it and
  the nearest recorded request of the same program (a short diff of the prompts).
* ``once`` — decided once per run and layer, by the first cached LM of the run (in any process or
  worker container: the decision is a file in the run's shared LM directory, taken under its
  lock): if the cassette directory had recordings when the run started, the whole run is
  replay-only; if it was empty, the whole run records. (pytest-recording decides it per
  cassette the same way; here the directory is the cassette.)
* ``new_episodes`` — replay hits, record misses (the default).
* ``all`` — always call the inner engine and overwrite the entry.

A cassette file that is not a valid entry raises :class:`~provisioner.errors.CorruptCassetteError`
(naming the file) in a replay-only run; ``new_episodes``, ``all`` and a recording ``once`` run
re-record it. A miss that should be recorded into a directory that is not writable fails with
:class:`~provisioner.errors.CassetteNotWritableError` before the inner LM is called. Every miss that
fails is written to the ledger (``{"event": "cassette_miss", ...}``) and counts as a cache miss.

The inner engine is ``cached_inner``: ``real`` (Gemini or the stand-in at ``base_url``, with the
run's rate and cost limits) or ``mock``. It is built lazily, on the first miss that records, so a
replay-only run needs no API key at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner._files import atomic_write
from provisioner.errors import (
    CassetteError,
    CassetteMissError,
    CassetteNotWritableError,
    CorruptCassetteError,
)
from provisioner.lm import callstats as _stats
from provisioner.lm.cassettes import (
    FORMAT,
    CassetteStore,
    canonical_request,
    cassette_key,
    describe,
    nearest_recording,
    now_iso,
    request_summary,
)
from provisioner.lm.engine import EngineBase, Generation, message_pairs, system_text
from provisioner.lm.ledger import Ledger, current_test_id, session_tests
from provisioner.lm.limits import locked, resolve_run_dir
from provisioner.lm.pricing import TokenUsage
from provisioner.lmconfig import LMConfig, MockRule
from provisioner.reprs import safe_repr

if TYPE_CHECKING:
    from dspy.lm15 import Request, Response

    from provisioner.lm.gemini import GeminiEngine
    from provisioner.lm.mock import MockEngine

GEMINI_DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com"
ONCE_LOCK = "record-once.lock"


def _dumped_rules(config: LMConfig) -> list[dict[str, Any]]:
    # A rule without `signature` (added later) digests as before: recorded cassettes stay hits.
    return [{k: v for k, v in r.model_dump(mode="json").items() if not (k == "signature" and v is None)}
            for r in config.mock_rules]


def mock_setup(config: LMConfig) -> dict[str, Any]:
    """What a mock-mode identity digests, as a cassette entry keeps it (``mock_setup``) so a later
    miss can say which rule changed: ``{"rules": [<each rule as lm.mock_rules has it>], "default":
    <lm.mock_default>}``."""
    return {"rules": _dumped_rules(config), "default": config.mock_default}


def mock_setup_change(recorded: Mapping[str, Any] | None, config: LMConfig) -> str:
    """Why a mock identity changed since an entry with ``recorded`` (its ``mock_setup``; None for
    entries written before the field) was recorded: the rules added and removed, or the default."""
    if not isinstance(recorded, Mapping):
        return ("lm.mock_rules or lm.mock_default changed since it was recorded (a mock cassette is "
                "keyed by every rule and the default; this recording predates the list of its rules)")
    now = mock_setup(config)
    old_rules = [json.dumps(r, sort_keys=True) for r in recorded.get("rules") or []]
    new_rules = [json.dumps(r, sort_keys=True) for r in now["rules"]]
    parts = [f"removed rule {_shown_rule(r)}" for r in old_rules if r not in new_rules]
    parts += [f"added rule {_shown_rule(r)}" for r in new_rules if r not in old_rules]
    if not parts and old_rules != new_rules:
        parts.append("the rules were reordered (the first matching rule answers)")
    if recorded.get("default") != now["default"]:
        parts.append(f"lm.mock_default {recorded.get('default')!r} → {now['default']!r}")
    return "lm.mock_rules changed since it was recorded: " + "; ".join(parts or ["(no difference found)"])


def _shown_rule(dumped: str) -> str:
    """A rule (as JSON) as the user wrote it: without the fields left at their defaults."""
    try:
        return MockRule.model_validate_json(dumped).model_dump_json(exclude_defaults=True)
    except ValueError:  # a rule of another version's shape: shown whole
        return dumped


def endpoint_identity(config: LMConfig) -> str:
    """What produced the answers: the Gemini endpoint, or the mock with its exact rules and
    default (every rule, also one that cannot match this program: see docs/lm.md)."""
    if config.cached_inner == "mock":
        rules = json.dumps(_dumped_rules(config), sort_keys=True)
        digest = hashlib.sha256(f"{rules}\x00{config.mock_default}".encode()).hexdigest()[:16]
        return f"mock:{digest}"
    if config.endpoint_kind == "standin":
        # The stand-in the run wires in answers alike wherever it runs (on 127.0.0.1 at a free port
        # in-process, at the run network's alias for workers): one identity, so recordings replay in
        # every process and container and in later runs.
        return "gemini-standin"
    return f"gemini@{(config.base_url or GEMINI_DEFAULT_ENDPOINT).rstrip('/')}"


def recording_source(config: LMConfig) -> str:
    """What a recording of ``config`` comes from: ``mock``, ``standin`` or ``gemini``."""
    return "mock" if config.cached_inner == "mock" else config.endpoint_kind


@dataclass(frozen=True)
class OnceDecision:
    """The run's ``once`` decision: ``record`` (the directory was empty) or replay only."""

    record: bool
    decided_at: str
    path: Path


def once_decision(config: LMConfig, store: CassetteStore) -> OnceDecision:
    """Take (or read) the ``once`` decision of ``config``'s run and layer.

    The first caller of a run decides under the run's lock (``record-once.lock`` in the shared LM
    directory ``run_dir``, which every xdist process and worker container of the run sees) and
    writes ``record-once.<layer>.json``; every later caller reads it. Without ``run_dir`` the
    run is this process.
    """
    run_dir = resolve_run_dir(config.run_dir)
    marker = run_dir / f"record-once.{config.layer or 'default'}.json"
    with locked(run_dir, ONCE_LOCK):
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            data = json.loads(marker.read_text(encoding="utf-8"))
            return OnceDecision(bool(data["record"]), str(data["decided_at"]), marker)
        decision = OnceDecision(not store.has_entries(), now_iso(), marker)
        atomic_write(marker, json.dumps({"record": decision.record, "decided_at": decision.decided_at,
                                         "cache_dir": str(config.cache_dir)}) + "\n")
        return decision


def _from_cwd(path: Path) -> str:
    """``path`` relative to the working directory when inside it (what a command run here needs)."""
    with contextlib.suppress(ValueError, OSError):
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    return str(path)


def session_test(run_dir: Path | None, session_id: str) -> str | None:
    """The test that ``session_id`` belongs to (see :func:`~provisioner.lm.ledger.note_session_test`),
    or None."""
    return session_tests(run_dir).get(session_id)


class CachedEngine(EngineBase):
    """A DSPy engine serving recorded answers and recording misses (see the module doc)."""

    kind = "cached"

    def __init__(self, config: LMConfig) -> None:
        self.config = config
        self.store = CassetteStore(config.cache_dir)
        self.identity = endpoint_identity(config)
        self.ledger = Ledger(config.run_dir, run_id=config.run_id, layer=config.layer)
        self.once: OnceDecision | None = None
        if config.record_mode == "once":
            self.once = once_decision(config, self.store)
        self._frozen = config.record_mode == "none" or (self.once is not None and not self.once.record)
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
            try:
                entry = self.store.get(key)
            except CorruptCassetteError as corrupt:
                if self._frozen:
                    raise self._failed(key, "corrupt", corrupt) from None
                entry = None  # a recording run re-records it
            if entry is not None:
                return self._replay(request, key, entry)
        if self._frozen:
            raise self._failed(key, "replay_only", CassetteMissError(self._miss_text(key, canonical)))
        why = self.store.not_writable(key)
        if why is not None:  # found before the inner LM is called: nothing is spent on an answer lost
            error = CassetteNotWritableError(self._not_writable_text(key, canonical, why), why)
            raise self._failed(key, "not_writable", error)
        return self._record(request, key, canonical)

    # -- misses -----------------------------------------------------------------------------------

    def _failed(self, key: str, reason: str, error: CassetteError) -> Exception:
        """Count and book a miss that fails, and wrap it for DSPy (a non-retried configuration error)."""
        from dspy import lm15

        _stats.record_error()
        shown = self._shown(str(error))
        if shown != str(error):  # in a worker: the host folder, not the container's mount point
            error.args = (shown,)
            if isinstance(error, CassetteNotWritableError):
                error.why = self._shown(error.why)
        self.ledger.append({"event": "cassette_miss", "test_id": current_test_id(),
                            "model": self.config.model, "cassette": key, "reason": reason})
        wrapped = lm15.ConfigurationError(str(error), provider="cassette", code=f"cassette_{reason}")
        wrapped.__cause__ = error
        return wrapped

    def _shown(self, text: str) -> str:
        """``text`` naming the cassette folder as the user knows it (``lm.cache_dir_shown``)."""
        shown = self.config.cache_dir_shown
        if not shown:
            return text
        for actual in sorted({str(self.config.cache_dir), str(self.store.root)}, key=len, reverse=True):
            text = text.replace(actual, shown)
        return text

    def record_command(self) -> str:
        """The pytest command that records the current miss: the cassette folder when it is not the
        default (``LM_CACHE_DIR``), the test that missed (when known: the pytest node id, or the test
        that opened the bridge session), the run's layer and ``--lm cached --record-mode
        new_episodes``. Run as written (from the project's root) it records this cassette."""
        config = self.config
        parts: list[str] = []
        shown = config.cache_dir_shown or _from_cwd(config.cache_dir)
        if not shown.rstrip("/").endswith(str(LMConfig.model_fields["cache_dir"].default)):
            parts.append(f"LM_CACHE_DIR={shlex.quote(shown)}")
        parts.append("pytest")
        owner = current_test_id()
        test = owner.split(" (", 1)[0] if owner and "::" in owner else (
            session_test(config.run_dir, owner) if owner else None)
        if test and "::" in test:
            parts.append(shlex.quote(test))
        if config.layer:
            parts += ["--layer", config.layer]
        parts += ["--lm", "cached", "--record-mode", "new_episodes"]
        return " ".join(parts)

    def _record_hint(self) -> str:
        """How to record a miss, true for the configured inner LM."""
        command = f"Record it with `{self.record_command()}`"
        config = self.config
        if config.cached_inner == "mock":
            return f"{command}; the inner LM is the mock (lm.cached_inner='mock'), so no API key is needed"
        if config.endpoint_kind == "standin":
            return (f"{command}; recording calls the run's Gemini stand-in (no API key needed; it bills "
                    "nothing)")
        endpoint = (config.base_url or GEMINI_DEFAULT_ENDPOINT).rstrip("/")
        return (f"{command} with GEMINI_TEST_API_KEY set; recording calls Gemini at {endpoint} "
                "(lm.cached_inner='real') and costs money")

    def _nearest_text(self, canonical: dict[str, Any]) -> str:
        try:
            nearest = nearest_recording(self.store.root, canonical)
        except OSError:
            return ""
        if nearest is not None:
            text = "\n" + nearest.text()
            recorded = nearest.entry.get("request", {}).get("identity")
            if self.config.cached_inner == "mock" and str(recorded).startswith("mock:") \
                    and recorded != canonical.get("identity"):
                text += "\n  " + mock_setup_change(nearest.entry.get("mock_setup"), self.config)
            return text
        summary = request_summary(canonical)
        if "signature" in summary:
            return (f"\nno recording of this program (`{summary['signature']}` on {summary.get('model')}) "
                    f"under {self.store.root}")
        return ""

    def _miss_text(self, key: str, canonical: dict[str, Any]) -> str:
        what = describe(request_summary(canonical))
        mode = self.config.record_mode
        if self.once is not None:
            why = (f"is replay-only for this run (run {self.config.run_id}, layer {self.config.layer}): "
                   f"the cassette directory had recordings when the run started "
                   f"(decided {self.once.decided_at}, {self.once.path})")
        else:
            why = "is replay-only"
        return (f"no cassette for {what} (key {key[:12]}…) under lm.cache_dir={self.config.cache_dir}; "
                f"lm.record_mode={mode!r} {why}. {self._record_hint()}{self._nearest_text(canonical)}")

    def _not_writable_text(self, key: str, canonical: dict[str, Any], why: str) -> str:
        what = describe(request_summary(canonical))
        return (f"cassette dir not writable ({why}); use --record-mode none or fix its permissions — "
                f"{what} (key {key[:12]}…) was not recorded")

    # -- hits and recordings ----------------------------------------------------------------------

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
        booking: dict[str, Any] = {}  # what the ledger line says about a Gemini (or stand-in) answer
        try:
            if isinstance(inner, GeminiEngine):
                outcome = inner.call(request)
                response, usage, cost = outcome.response, outcome.usage, outcome.cost_usd
                booking = {"list_cost_usd": outcome.list_cost_usd, "endpoint": outcome.endpoint,
                           "usage": outcome.usage_source, "estimated": outcome.estimated,
                           "rate_limit_wait_s": outcome.rate_limit_wait_s}
                if outcome.rate_limit_wait_s > 0:  # a recording waits for the run's rate limit too
                    _stats.record_rate_limit_wait(outcome.rate_limit_wait_s)
            else:
                response = inner.complete(request)
                raw = response.usage
                usage = TokenUsage(prompt_tokens=int(raw.input_tokens or 0) if raw else 0,
                                   candidates_tokens=int(raw.output_tokens or 0) if raw else 0)
                cost = 0.0
        except Exception:
            _stats.record_error()
            raise
        owner = current_test_id()
        test_id = session_test(self.config.run_dir, owner) if owner and "::" not in owner else None
        try:
            self.store.put({
                "format": FORMAT,
                "key": key,
                "recorded_at": now_iso(),
                "identity": self.identity,
                "source": recording_source(self.config),
                "summary": request_summary(canonical),
                "request": canonical,
                "response": {"text": response_text(response), "finish_reason": response.finish_reason,
                             "model": response.model, "id": response.id},
                "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.candidates_tokens,
                          "thoughts_tokens": usage.thoughts_tokens, "cached_tokens": usage.cached_tokens},
                "cost_usd": round(cost, 10),
                "test_id": test_id or owner,
                **({"session_id": owner} if test_id else {}),
                **({"mock_setup": mock_setup(self.config)} if self.config.cached_inner == "mock" else {}),
            })
        except CassetteNotWritableError as exc:
            if isinstance(inner, GeminiEngine):  # the call was made (and billed): book it, unrecorded
                self._book(kind="real", key=key, tokens=usage, cost=cost, status="not_recorded", **booking)
            error = CassetteNotWritableError(self._not_writable_text(key, canonical, exc.why), exc.why)
            raise self._failed(key, "not_writable", error) from None
        _stats.record_call("recorded", input_tokens=usage.prompt_tokens, output_tokens=usage.output_tokens,
                           cost_usd=cost)
        self._book(kind="recorded", key=key, tokens=usage, cost=cost, **booking)
        return response

    def _book(self, *, kind: str, key: str, tokens: TokenUsage, cost: float, status: str = "ok",
              **booking: Any) -> None:
        self.ledger.call(model=self.config.model, kind=kind, input_tokens=tokens.prompt_tokens,
                         output_tokens=tokens.candidates_tokens, thoughts_tokens=tokens.thoughts_tokens,
                         cached_tokens=tokens.cached_tokens, cost_usd=cost, cache="miss", cassette=key,
                         status=status, **booking)
