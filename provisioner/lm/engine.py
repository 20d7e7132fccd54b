"""What every provisioner engine shares: request reading, token estimates and the DSPy engine shape.

DSPy (3.4) calls a custom engine's ``complete(request) -> Response`` and, when streaming,
``stream(request)``; an async LM call needs a separate ``async_engine``. :class:`EngineBase`
supplies ``stream``/``close`` and :class:`AsyncEngineAdapter` runs a sync engine in a thread.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspy.lm15 import Request, Response


def system_text(request: Request) -> str:
    """The system prompt as one string (DSPy may pass it as a tuple of parts)."""
    system = request.system
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "".join(getattr(part, "text", "") or "" for part in system)


def message_pairs(request: Request) -> list[tuple[str, str]]:
    """The conversation as (role, text) pairs."""
    return [(str(message.role), message.text or "") for message in request.messages]


def estimate_tokens(text: str) -> int:
    """A deterministic token estimate (about four characters per token, as Gemini documents)."""
    return math.ceil(len(text.encode("utf-8")) / 4) if text else 0


def request_input_tokens(request: Request) -> int:
    total = estimate_tokens(system_text(request))
    for _, text in message_pairs(request):
        total += estimate_tokens(text)
    return total


@dataclass(frozen=True)
class Generation:
    """The generation parameters of a request that change its answer."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    seed: int | None
    response_format: Any

    @classmethod
    def of(cls, request: Request, default_max_tokens: int | None = None,
           default_temperature: float | None = None) -> Generation:
        config = request.config
        return cls(
            max_tokens=config.max_tokens if config.max_tokens is not None else default_max_tokens,
            temperature=config.temperature if config.temperature is not None else default_temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            stop=tuple(config.stop or ()),
            seed=config.seed,
            response_format=config.response_format,
        )


def text_response(request: Request, text: str, *, input_tokens: int, output_tokens: int,
                  response_id: str | None = None, finish_reason: str = "stop",
                  model: str | None = None) -> Response:
    from dspy.lm15 import Message, Response, TextPart, Usage

    return Response(
        id=response_id,
        model=model or request.model,
        message=Message.assistant([TextPart(text)]),
        finish_reason=finish_reason,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                    total_tokens=input_tokens + output_tokens),
    )


def response_text(response: Response) -> str:
    """All text parts of a response's message, joined."""
    parts = getattr(response.message, "parts", ()) or ()
    texts = [getattr(part, "text", "") or "" for part in parts if getattr(part, "type", "text") == "text"]
    return "".join(texts)


class EngineBase:
    """``stream`` and ``close`` for engines whose ``complete`` does the work."""

    def complete(self, request: Request) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream(self, request: Request) -> Iterator[Any]:
        from dspy.lm15 import response_to_events

        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        return None


class AsyncEngineAdapter:
    """The async face of a sync engine: each call runs in a worker thread."""

    def __init__(self, sync: EngineBase) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        response = await asyncio.to_thread(self.sync.complete, request)
        from dspy.lm15 import response_to_events

        for event in response_to_events(response):
            yield event

    async def aclose(self) -> None:
        return None
