"""The real LM: Gemini through the official google-genai client, inside a DSPy engine.

Each attempt of a call:

1. reserves the call's worst-case cost (every prompt byte as a token — an upper bound on the token
   count — plus ``max_tokens`` output tokens at the model's price) or refuses with
   :class:`~provisioner.errors.CostLimitExceeded`;
2. takes a slot of the run's request-per-minute budget (:class:`RunLimits.acquire_request`);
3. calls ``models.generate_content``;
4. settles the reservation with the real ``usageMetadata`` (prompt, candidates, thoughts and cached
   token counts) and appends a ledger line. A count the answer does not carry is booked at its
   worst case (fail closed, :func:`usage_of`); the ledger line then says ``usage: "estimated"``.

Money: with ``lm.endpoint_kind="standin"`` (the controller wired the Gemini stand-in in), calls are
not billed — the ledger books ``cost_usd`` 0 (what the monthly budget sums) — but the run's cost
limit still counts them at list prices (``list_cost_usd``), so limits are testable offline.

The key: ``lm.api_key``, else (on the host) ``GEMINI_TEST_API_KEY`` from the environment — that
name only, never ``GOOGLE_API_KEY``/``GEMINI_API_KEY``. A worker calls
:func:`forbid_environment_key` at start-up: its key comes only from its start-up configuration.

429 / RESOURCE_EXHAUSTED and 5xx answers are retried up to ``max_retries`` times, waiting what the
server asks (``Retry-After`` header or a ``google.rpc.RetryInfo`` detail), else
``retry_base_delay_s * 2**attempt``, capped at ``retry_max_delay_s``; after that the error reaches
DSPy as its own type (``LMRateLimitError``, ``LMServerError``). google-genai's own retries are off
(``HttpRetryOptions(attempts=1)``) and the ``dspy.LM`` has ``num_retries=0`` so no layer multiplies
the attempts of another. A rejected key (401, 403, or Google's ``400 API_KEY_INVALID``) becomes an
``LMAuthError`` that says which setting to fix. The API key never appears in an error: the
error raised keeps the SDK's original as its ``__cause__``, but as a redacted copy
(:func:`redact_exception`: args, attributes, details, the HTTP response and request dropped, the
whole ``__cause__``/``__context__`` chain), never the original object.
"""

from __future__ import annotations

import contextvars
import enum
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from provisioner.errors import ConfigError, CostLimitExceeded, RateLimitExceeded
from provisioner.lm import callstats as _stats
from provisioner.lm.engine import EngineBase, Generation, message_pairs, system_text, text_response
from provisioner.lm.ledger import Ledger
from provisioner.lm.limits import RunLimits
from provisioner.lm.pricing import TokenUsage, cost_usd, price_for, worst_case_usd
from provisioner.lmconfig import API_KEY_ENV, LMConfig
from provisioner.reprs import safe_repr

if TYPE_CHECKING:
    from dspy.lm15 import LM15Error, Request, Response

# Per-message framing tokens Gemini adds around each turn; generous, it only feeds the upper bound.
_FRAMING_TOKENS_PER_MESSAGE = 8

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
}


UsageSource = Literal["reported", "estimated"]

_environment_key_allowed = True

# Set while this engine's own HTTP request runs: a test layer's network block lets exactly these
# connections through (provisioner's managed, rate- and cost-limited Gemini calls).
_managed_request: contextvars.ContextVar[bool] = contextvars.ContextVar("provision_managed_request",
                                                                        default=False)


def in_managed_request() -> bool:
    """True inside a :class:`GeminiEngine` request (in the thread that sends it)."""
    return _managed_request.get()


def forbid_environment_key() -> None:
    """Never read ``GEMINI_TEST_API_KEY`` from the environment in this process (a bridge worker:
    its key comes only from its start-up configuration, and no session may inherit it)."""
    global _environment_key_allowed
    _environment_key_allowed = False


def environment_key_allowed() -> bool:
    return _environment_key_allowed


def resolve_api_key(config: LMConfig) -> str:
    """The key real calls use: ``lm.api_key``, else ``GEMINI_TEST_API_KEY`` on the host side.

    Raises:
        ConfigError: no key; the message says where it looked.
    """
    if config.api_key is not None and config.api_key.get_secret_value():
        return config.api_key.get_secret_value()
    use = f"{config.gemini_use}, lm.model={config.model!r}"
    instead = config.gemini_alternatives
    if not _environment_key_allowed:
        # The controller hands a key to every worker that calls Gemini (lmconfig.worker_secrets): the
        # run's stand-in key, or GEMINI_TEST_API_KEY when the workers reach the real API. A worker
        # without one was started by something else (its own `provision worker`, a compose file).
        raise ConfigError(
            f"lm.api_key is not set in this worker's start-up configuration ({use}): the worker calls Gemini "
            f"at {config.base_url or 'the real API'} and gets its key only as {API_KEY_ENV} in its own "
            f"environment when it starts; start the worker with {API_KEY_ENV} set (a run started by "
            f"provisioner sets it), {instead}"
        )
    key = os.environ.get(API_KEY_ENV, "")
    if key:
        return key
    raise ConfigError(
        f"lm.api_key is not set and {API_KEY_ENV} is not in the environment ({use}): Gemini calls need a "
        "key; "
        f"export {API_KEY_ENV}=<your Gemini API key> (other names such as GOOGLE_API_KEY are never read), "
        f"{instead}"
    )


@dataclass(frozen=True)
class CallOutcome:
    """A successful Gemini call.

    ``usage``: the counts booked (reported, or worst case for a count that was missing —
    ``usage_source == "estimated"``). ``list_cost_usd``: the call at list prices (what the run's
    cost limit counts). ``cost_usd``: billed dollars — ``list_cost_usd`` for Gemini, 0 for the
    stand-in. ``endpoint``: ``lm.endpoint_kind``.
    """

    response: Response
    usage: TokenUsage
    cost_usd: float
    list_cost_usd: float = 0.0
    endpoint: str = "gemini"
    usage_source: UsageSource = "reported"
    estimated: tuple[str, ...] = ()
    rate_limit_wait_s: float = 0.0  # seconds its attempts waited for a slot of lm.rate_limit_rpm


def prompt_tokens_upper_bound(request: Request) -> int:
    """At least the number of tokens Gemini will count for the request's prompt."""
    total = len(system_text(request).encode("utf-8")) + _FRAMING_TOKENS_PER_MESSAGE
    for _, text in message_pairs(request):
        total += len(text.encode("utf-8")) + _FRAMING_TOKENS_PER_MESSAGE
    return total


def _parse_delay(value: Any) -> float | None:
    """Seconds from a Retry-After header ("7") or a RetryInfo duration ("7s", "1.5s")."""
    if value is None:
        return None
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s?", text)
    return float(match.group(1)) if match else None


def server_retry_delay(exc: Any) -> float | None:
    """What the server asked us to wait, from the header or the error's RetryInfo detail."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        try:
            delay = _parse_delay(headers.get("retry-after"))
        except Exception:
            delay = None
        if delay is not None:
            return delay
    details = getattr(exc, "details", None)
    error = details.get("error", details) if isinstance(details, dict) else None
    for item in (error or {}).get("details", []) if isinstance(error, dict) else []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            return _parse_delay(item.get("retryDelay"))
    return None


def _is_key_rejection(code: int, exc: Any) -> bool:
    if code in (401, 403):
        return True
    if code != 400:
        return False
    details = getattr(exc, "details", None)
    return "API_KEY_INVALID" in str(details) or "API key not valid" in str(getattr(exc, "message", ""))


_LM15_RETRY_LINE = "    - Retry with backoff in your application layer (lm15 never retries for you)\n"
_GUIDANCE = "\n\n  To fix:"


def retry_wording(message: str, retries: int, max_retries: int) -> str:
    """``message`` (an lm15 error's, with its "To fix" guidance) as true for provisioner, which does
    retry: "(gave up after N retries)" goes on the error's own line, before the guidance, and lm15's
    "Retry with backoff in your application layer (lm15 never retries for you)" (a 429's) says what
    provisioner did instead (a user's trial read both lines, contradicting each other)."""
    head, sep, guidance = message.partition(_GUIDANCE)
    if retries:
        head = f"{head.rstrip()} (gave up after {retries} retries)"
    if _LM15_RETRY_LINE.strip() in guidance:
        truth = (f"    - provisioner retried it {retries} times with backoff (lm.max_retries = "
                 f"{max_retries}, the server's retry delay honoured); lower lm.rate_limit_rpm or raise "
                 "lm.max_retries\n"
                 if max_retries else
                 "    - Set lm.max_retries above 0 to have provisioner retry with backoff\n")
        guidance = guidance.replace(_LM15_RETRY_LINE, truth)
    return head + sep + guidance


class GeminiEngine(EngineBase):
    """A DSPy engine calling Gemini's ``generateContent`` with run-wide limits and a ledger."""

    kind = "real"

    def __init__(self, config: LMConfig, *, record: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._key = resolve_api_key(config)
        self.config = config
        self.billed = config.endpoint_kind == "gemini"
        self.price = price_for(config)  # an unknown model is refused before any call
        self.limits = RunLimits(config.run_dir, rpm=config.rate_limit_rpm,
                                cost_limit_usd=config.cost_limit_usd, wait_s=config.rate_limit_wait_s,
                                reservation_ttl_s=config.request_timeout_s + 60.0, note=config.limits_note)
        self.ledger = Ledger(config.run_dir, run_id=config.run_id, layer=config.layer)
        # ``record=False`` when wrapped by the cached engine, which writes its own ledger/stat lines.
        self.record = record
        self._sleep = sleep
        self._client_lock = threading.Lock()
        self._client: Any = None

    @safe_repr
    def __repr__(self) -> str:
        return f"GeminiEngine(model={self.config.model!r}, base_url={self.config.base_url!r})"

    # -- the google-genai client ------------------------------------------------------------

    def _genai(self) -> Any:
        with self._client_lock:
            if self._client is None:
                from google import genai
                from google.genai import types

                options = types.HttpOptions(
                    base_url=self.config.base_url,
                    timeout=int(self.config.request_timeout_s * 1000),
                    retry_options=types.HttpRetryOptions(attempts=1),
                )
                self._client = genai.Client(api_key=self._key, http_options=options)
            return self._client

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            close = getattr(client, "close", None)
            if callable(close):
                close()

    def _scrub(self, text: str) -> str:
        return scrub(text, (self._key,))

    # -- request translation ----------------------------------------------------------------

    def _generate_args(self, request: Request) -> tuple[list[Any], Any, Generation]:
        from google.genai import types

        generation = Generation.of(request, self.config.max_tokens, self.config.temperature)
        contents = [
            types.Content(role="model" if role == "assistant" else "user", parts=[types.Part(text=text)])
            for role, text in message_pairs(request)
            if role in ("user", "assistant")
        ]
        system = system_text(request)
        response_mime_type = None
        if generation.response_format is not None:
            response_mime_type = "application/json"
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            temperature=generation.temperature,
            max_output_tokens=generation.max_tokens,
            top_p=generation.top_p,
            top_k=generation.top_k,
            stop_sequences=list(generation.stop) or None,
            seed=generation.seed,
            response_mime_type=response_mime_type,
            # DSPy owns tool calling; google-genai's automatic function calling stays out of it.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )
        return contents, config, generation

    # -- the call ---------------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        try:
            outcome = self.call(request)
        except Exception:
            if self.record:
                _stats.record_error()
            raise
        if self.record:
            usage = outcome.usage
            _stats.record_call("real" if self.billed else "standin", input_tokens=usage.prompt_tokens,
                               output_tokens=usage.output_tokens, cost_usd=outcome.cost_usd,
                               list_cost_usd=outcome.list_cost_usd)
            self.ledger.call(model=self.config.model, kind="real", input_tokens=usage.prompt_tokens,
                             output_tokens=usage.candidates_tokens, thoughts_tokens=usage.thoughts_tokens,
                             cached_tokens=usage.cached_tokens, cost_usd=outcome.cost_usd,
                             list_cost_usd=outcome.list_cost_usd, endpoint=outcome.endpoint,
                             usage=outcome.usage_source, estimated=outcome.estimated,
                             rate_limit_wait_s=outcome.rate_limit_wait_s)
            if outcome.rate_limit_wait_s > 0:
                _stats.record_rate_limit_wait(outcome.rate_limit_wait_s)
        return outcome.response

    def call(self, request: Request) -> CallOutcome:
        """One call with limits and retries; raises dspy.lm15 errors DSPy knows how to map."""
        from dspy import lm15

        contents, gen_config, generation = self._generate_args(request)
        max_output = generation.max_tokens or self.config.max_tokens
        prompt_bound = prompt_tokens_upper_bound(request)
        worst = worst_case_usd(self.price, prompt_bound, max_output)
        model = self.config.model
        attempt = 0
        waited = 0.0  # for a slot of the rate limit, over all attempts
        billed_usd = 0.0  # failed attempts the run's cost limit counted (they may have been billed)
        while True:
            # Money first: a call the budget refuses must not use up a slot of the request window.
            try:
                reservation = self.limits.reserve(worst, what=f"a {model} call")
            except CostLimitExceeded as exc:
                # In the run's ledger, so every summary counts it (also from a worker container),
                # with what earlier attempts of this call waited for the rate limit.
                self.ledger.refused(model=model, reason="cost_limit", limit=self.limits.effective()[1],
                                    rate_limit_wait_s=waited)
                _stats.record_refused("cost_limit")
                if waited > 0:
                    _stats.record_rate_limit_wait(waited)
                raise lm15.BillingError(str(exc), provider="gemini", code="cost_limit") from exc
            try:
                waited += self.limits.acquire_request_timed()[1]
            except RateLimitExceeded as exc:
                waited += exc.waited_s
                self.limits.settle(reservation, 0.0)
                self.ledger.refused(model=model, reason="rate_limit", limit=self.limits.effective()[0],
                                    rate_limit_wait_s=waited)
                _stats.record_refused("rate_limit")
                if waited > 0:
                    _stats.record_rate_limit_wait(waited)
                raise lm15.ConfigurationError(str(exc), provider="gemini", code="rate_limit_budget") from exc
            failure: Exception | None = None
            token = _managed_request.set(True)
            try:
                raw = self._genai().models.generate_content(model=model, contents=contents, config=gen_config)
            except Exception as exc:
                failure = exc
            finally:
                _managed_request.reset(token)
            if failure is not None:
                # Handled outside the except block, so the original (key-bearing) SDK error never
                # becomes the implicit __context__ of what we raise: only its redacted copy is chained.
                error, retryable, billed = self._translate(failure)
                # A timed-out request may still have been processed and billed: keep the worst case.
                self.limits.settle(reservation, worst if billed else 0.0)
                billed_usd += worst if billed else 0.0
                if retryable and attempt < self.config.max_retries:
                    delay = server_retry_delay(failure)
                    if delay is None:
                        delay = self.config.retry_base_delay_s * (2 ** attempt)
                    attempt += 1
                    # Backing off before a retry is what the server asked for, not synchronisation.
                    self._sleep(min(delay, self.config.retry_max_delay_s))
                    continue
                error.message = retry_wording(error.message, attempt, self.config.max_retries)
                error.args = (error.message,)
                # One ledger line for the call, as for one that was answered or refused: its error,
                # the attempts, the time it waited for the rate limit, what the cost limit counted.
                self.ledger.error(
                    model=model, kind="real" if self.record else "recorded", error_type=type(error).__name__,
                    status=getattr(error, "status", None), attempts=attempt + 1,
                    endpoint=self.config.endpoint_kind,
                    cost_usd=billed_usd if self.billed else 0.0, list_cost_usd=billed_usd,
                    rate_limit_wait_s=waited,
                )
                if waited > 0:
                    _stats.record_rate_limit_wait(waited)
                cause = redact_exception(failure, (self._key,))
                del failure
                raise error from cause
            usage, estimated = usage_of(raw, prompt_tokens_upper_bound=prompt_bound,
                                        max_output_tokens=max_output)
            list_cost = cost_usd(self.price, usage)
            # The run's cost limit counts every call at list prices (the stand-in's too).
            self.limits.settle(reservation, list_cost)
            return CallOutcome(
                self._to_response(request, raw, usage), usage,
                cost_usd=list_cost if self.billed else 0.0, list_cost_usd=list_cost,
                endpoint=self.config.endpoint_kind, usage_source="estimated" if estimated else "reported",
                estimated=estimated, rate_limit_wait_s=waited,
            )

    def _translate(self, exc: Exception) -> tuple[LM15Error, bool, bool]:
        """(the lm15 error for ``exc``, whether to retry it, whether it may have been billed)."""
        from dspy import lm15
        from google.genai import errors as genai_errors

        model = self.config.model
        if isinstance(exc, genai_errors.APIError):
            code = int(exc.code or 0)
            status = str(exc.status or "")
            message = self._scrub(f"Gemini {code} {status} for model {model!r}: {exc.message or ''}".strip())
            retry_after = server_retry_delay(exc)
            common: dict[str, Any] = {"provider": "gemini", "status": code, "provider_code": status or None,
                                      "retry_after": retry_after}
            if code == 429:
                return lm15.RateLimitError(message, **common), True, False
            if code >= 500:
                return lm15.ServerError(message, **common), True, False
            if _is_key_rejection(code, exc):
                endpoint = f" at lm.base_url={self.config.base_url}" if self.config.base_url else ""
                return lm15.AuthError(
                    f"{message} — the API key was rejected{endpoint}",
                    credential_hint="set GEMINI_TEST_API_KEY (lm.api_key) to a valid Gemini API key",
                    **common,
                ), False, False
            if code == 404:
                return lm15.UnsupportedModelError(message, **common), False, False
            return lm15.InvalidRequestError(message, **common), False, False
        timeouts, transports = _http_exception_types()
        text = self._scrub(f"{type(exc).__name__}: {exc}")
        where = f" at lm.base_url={self.config.base_url}" if self.config.base_url else ""
        if isinstance(exc, timeouts):
            timeout = self.config.request_timeout_s
            return lm15.TimeoutError(
                f"Gemini call for {model!r} timed out after lm.request_timeout_s={timeout:g}s{where}: {text}",
                provider="gemini"), True, True
        if isinstance(exc, transports):
            return lm15.TransportError(f"Gemini unreachable{where}: {text}", provider="gemini"), True, False
        failure = f"Gemini call for {model!r} failed{where}: {text}"
        return lm15.ServerError(failure, provider="gemini"), False, True

    def _to_response(self, request: Request, raw: Any, usage: TokenUsage) -> Response:
        from dspy.lm15 import Message, Response, TextPart, Usage

        texts: list[str] = []
        finish = "stop"
        candidates = getattr(raw, "candidates", None) or []
        if candidates:
            candidate = candidates[0]
            content = getattr(candidate, "content", None)
            for part in getattr(content, "parts", None) or []:
                if getattr(part, "thought", False):
                    continue
                if getattr(part, "text", None):
                    texts.append(part.text)
            reason = getattr(candidate, "finish_reason", None)
            name = getattr(reason, "name", None) or (str(reason) if reason is not None else "STOP")
            finish = _FINISH_REASONS.get(name, "stop")
        return Response(
            id=getattr(raw, "response_id", None),
            model=getattr(raw, "model_version", None) or request.model,
            message=Message.assistant([TextPart("".join(texts))]),
            finish_reason=finish,
            usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.candidates_tokens,
                        reasoning_tokens=usage.thoughts_tokens or None,
                        cache_read_tokens=usage.cached_tokens or None),
        )


def _http_exception_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """Timeout and transport exception classes of the HTTP stacks google-genai may use."""
    timeouts: list[type[BaseException]] = []
    transports: list[type[BaseException]] = []
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transports.append(module.TransportError)
    return tuple(timeouts), tuple(transports)


def usage_of(raw: Any, *, prompt_tokens_upper_bound: int, max_output_tokens: int
             ) -> tuple[TokenUsage, tuple[str, ...]]:
    """The counts to book for an answer, failing closed: ``(usage, names of counts estimated)``.

    Gemini's ``usageMetadata`` (google-genai ``usage_metadata``) should carry ``promptTokenCount``,
    ``candidatesTokenCount``, ``thoughtsTokenCount`` (thinking models), ``cachedContentTokenCount``
    (when context caching applied) and ``totalTokenCount`` (prompt + candidates + thoughts +
    tool-use prompt). A count that is absent (or not a non-negative integer) is never taken as 0:

    * prompt → the request's upper bound (:func:`prompt_tokens_upper_bound`, what was reserved);
    * candidates / thoughts → derived exactly from ``totalTokenCount`` when that and the prompt count
      are reported (Gemini omits ``thoughtsTokenCount`` when nothing was thought); else the output
      is booked at ``max_output_tokens`` (thinking counts against it);
    * cached input → 0, i.e. every prompt token at the full input rate — the most they can cost
      (Gemini omits the count when nothing came from a cache).

    With no ``usageMetadata`` at all, the call is booked at the reserved worst case.
    """
    meta = getattr(raw, "usage_metadata", None)

    def count(name: str) -> int | None:
        value = getattr(meta, name, None) if meta is not None else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        return value

    estimated: list[str] = []
    prompt = count("prompt_token_count")
    prompt_known = prompt is not None
    if prompt is None:
        prompt = prompt_tokens_upper_bound
        estimated.append("promptTokenCount")
    candidates = count("candidates_token_count")
    thoughts = count("thoughts_token_count")
    total = count("total_token_count")
    if candidates is None or thoughts is None:
        output = None
        if total is not None and prompt_known:
            output = total - prompt - (count("tool_use_prompt_token_count") or 0)
            if output < (candidates or 0) + (thoughts or 0):
                output = None  # inconsistent counts: trust none of the derivation
        if output is not None:
            if candidates is None and thoughts is None:
                candidates, thoughts = output, 0  # both are billed at the output rate
            elif candidates is None:
                candidates = output - (thoughts or 0)
            else:
                thoughts = output - candidates
        else:
            if candidates is None:
                estimated.append("candidatesTokenCount")
            if thoughts is None:
                estimated.append("thoughtsTokenCount")
            if candidates is None and thoughts is None:
                candidates, thoughts = max_output_tokens, 0
            elif candidates is None:
                candidates = max(max_output_tokens - (thoughts or 0), 0)
            else:
                thoughts = max(max_output_tokens - candidates, 0)
    cached = count("cached_content_token_count") or 0
    usage = TokenUsage(prompt_tokens=prompt, candidates_tokens=candidates or 0, thoughts_tokens=thoughts or 0,
                       cached_tokens=min(cached, prompt))
    return usage, tuple(estimated)


# -- secrets in errors ---------------------------------------------------------------------------


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


_PLAIN = (int, float, complex, bool, type(None), enum.Enum)


def _scrub_value(value: Any, secrets: tuple[str, ...], seen: dict[int, BaseException], depth: int) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
        for secret in secrets:
            if secret:
                data = data.replace(secret.encode(), b"***")
        return data
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, BaseException):
        return redact_exception(value, secrets, _seen=seen)
    if depth > 12:
        return None
    if isinstance(value, dict):
        return {_scrub_value(k, secrets, seen, depth + 1): _scrub_value(v, secrets, seen, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_scrub_value(v, secrets, seen, depth + 1) for v in value]
        return type(value)(items) if not isinstance(value, tuple) or type(value) is tuple else tuple(items)
    # Anything else (an HTTP response, its request and headers, a client): dropped, never copied.
    return None


def redact_exception(exc: BaseException, secrets: Iterable[str],
                     _seen: dict[int, BaseException] | None = None) -> BaseException:
    """A copy of ``exc`` without the secrets, for chaining as the cause of the error we raise.

    Same class (``isinstance`` checks keep working), ``args`` and instance attributes with every
    secret replaced by ``***`` (strings, bytes, nested dicts/lists such as google-genai's
    ``details``); objects that are not plain data (the HTTP response and request, whose headers
    carry ``x-goog-api-key``) become ``None``; no traceback (its frames hold the SDK's locals);
    ``__cause__``/``__context__`` redacted the same way, recursively. The original is not changed.
    """
    secrets = tuple(s for s in secrets if s)
    seen = {} if _seen is None else _seen
    if id(exc) in seen:
        return seen[id(exc)]
    cls = type(exc)
    try:
        copy: BaseException = cls.__new__(cls)
    except Exception:
        copy = RuntimeError()
    seen[id(exc)] = copy
    copy.args = tuple(_scrub_value(a, secrets, seen, 0) for a in exc.args)
    try:
        attributes = dict(vars(exc))
    except TypeError:
        attributes = {}
    for name, value in attributes.items():
        try:
            setattr(copy, name, _scrub_value(value, secrets, seen, 0))
        except (AttributeError, TypeError):
            continue
    copy.__traceback__ = None
    copy.__cause__ = None if exc.__cause__ is None else redact_exception(exc.__cause__, secrets, seen)
    copy.__context__ = None if exc.__context__ is None else redact_exception(exc.__context__, secrets, seen)
    copy.__suppress_context__ = exc.__suppress_context__
    return copy


__all__ = [
    "CallOutcome",
    "GeminiEngine",
    "forbid_environment_key",
    "in_managed_request",
    "prompt_tokens_upper_bound",
    "redact_exception",
    "resolve_api_key",
    "scrub",
    "server_retry_delay",
    "text_response",
    "usage_of",
]
