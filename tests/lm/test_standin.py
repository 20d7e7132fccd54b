"""The Gemini stand-in speaks Gemini's REST shape, to raw HTTP and to the real google-genai client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from provisioner.lm.standin import GeminiStandin, StandinReply

from .conftest import STANDIN_KEY

KEY = STANDIN_KEY


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any],
                                                                                           dict[str, str]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _client(standin: GeminiStandin, key: str = KEY) -> genai.Client:
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=standin.url, retry_options=types.HttpRetryOptions(attempts=1)))


@pytest.mark.parametrize("version", ["v1", "v1beta"])
@pytest.mark.parametrize("casing", ["camel", "snake"])
def test_rest_shape_with_header_key(standin: GeminiStandin, version: str, casing: str) -> None:
    system_key = "systemInstruction" if casing == "camel" else "system_instruction"
    config_key = "generationConfig" if casing == "camel" else "generation_config"
    body = {
        system_key: {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
        config_key: {"temperature": 0, "maxOutputTokens": 50},
    }
    status, reply, _ = _post(f"{standin.url}{version}/models/gemini-2.5-flash-lite:generateContent", body,
                             {"x-goog-api-key": KEY})
    assert status == 200
    candidate = reply["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    assert candidate["content"]["role"] == "model"
    assert candidate["content"]["parts"][0]["text"] == "mock_response"
    usage = reply["usageMetadata"]
    assert usage["promptTokenCount"] > 0 and usage["candidatesTokenCount"] > 0
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert reply["modelVersion"] == "gemini-2.5-flash-lite"
    seen = standin.requests[-1]
    assert (seen.model, seen.version, seen.key_source, seen.key_ok) == ("gemini-2.5-flash-lite", version,
                                                                        "header", True)


def test_key_in_query_string(standin: GeminiStandin) -> None:
    status, _, _ = _post(f"{standin.url}v1beta/models/m:generateContent?key={KEY}",
                         {"contents": [{"parts": [{"text": "hi"}]}]})
    assert status == 200
    assert standin.requests[-1].key_source == "query"


def test_missing_and_wrong_keys_are_refused_like_google(standin: GeminiStandin) -> None:
    url = f"{standin.url}v1beta/models/m:generateContent"
    status, reply, _ = _post(url, {"contents": []})
    assert status == 403 and reply["error"]["status"] == "PERMISSION_DENIED"
    status, reply, _ = _post(url, {"contents": []}, {"x-goog-api-key": "nope"})
    assert status == 400 and reply["error"]["status"] == "INVALID_ARGUMENT"
    assert reply["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert standin.request_count == 2


def test_revoked_key_variant_answers_403() -> None:
    with GeminiStandin(api_key=KEY, wrong_key_status=403) as server:
        status, reply, _ = _post(f"{server.url}v1beta/models/m:generateContent", {"contents": []},
                                 {"x-goog-api-key": "revoked"})
    assert status == 403 and reply["error"]["code"] == 403


def test_unknown_route_is_404(standin: GeminiStandin) -> None:
    status, reply, _ = _post(f"{standin.url}v1beta/models/m:embedContent", {}, {"x-goog-api-key": KEY})
    assert status == 404 and reply["error"]["status"] == "NOT_FOUND"


def test_injected_429_carries_retry_after_and_retry_info(standin: GeminiStandin) -> None:
    standin.fail_next(1, status=429, retry_after=7)
    status, reply, headers = _post(f"{standin.url}v1beta/models/m:generateContent",
                                   {"contents": [{"parts": [{"text": "x"}]}]}, {"x-goog-api-key": KEY})
    assert status == 429
    assert reply["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert headers["Retry-After"] == "7"
    assert reply["error"]["details"][0]["retryDelay"] == "7s"
    # The failure was used up: the next request succeeds.
    status, _, _ = _post(f"{standin.url}v1beta/models/m:generateContent",
                         {"contents": [{"parts": [{"text": "x"}]}]}, {"x-goog-api-key": KEY})
    assert status == 200


def test_real_genai_client_scripted_reply_and_usage(standin: GeminiStandin) -> None:
    standin.script("scripted text")
    standin.set_usage(thoughts_tokens=5, cached_tokens=2)
    client = _client(standin)
    response = client.models.generate_content(
        model="gemini-2.5-flash-lite", contents="Hello there, stand-in",
        config=types.GenerateContentConfig(system_instruction="Be kind.", max_output_tokens=100))
    assert response.text == "scripted text"
    assert response.model_version == "gemini-2.5-flash-lite"
    meta = response.usage_metadata
    assert meta is not None
    assert meta.thoughts_token_count == 5 and meta.cached_content_token_count == 2
    assert meta.total_token_count == (meta.prompt_token_count or 0) + (meta.candidates_token_count or 0) + 5
    body = standin.requests[-1].body
    assert body["systemInstruction"]["parts"][0]["text"] == "Be kind."
    assert body["generationConfig"]["maxOutputTokens"] == 100


def test_real_genai_client_sees_errors(standin: GeminiStandin) -> None:
    bad_client, client = _client(standin, "bad-key"), _client(standin)
    with pytest.raises(genai_errors.ClientError) as wrong:
        bad_client.models.generate_content(model="m", contents="x")
    assert wrong.value.code == 400 and "API key not valid" in str(wrong.value.message)
    standin.fail_next(1, status=500)
    with pytest.raises(genai_errors.ServerError) as server_error:
        client.models.generate_content(model="m", contents="x")
    assert server_error.value.code == 500


def test_max_output_tokens_cuts_the_answer(standin: GeminiStandin) -> None:
    standin.script(StandinReply(text="word " * 100))
    client = _client(standin)
    response = client.models.generate_content(
        model="m", contents="x", config=types.GenerateContentConfig(max_output_tokens=5))
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.usage_metadata and response.usage_metadata.candidates_token_count == 5


def test_any_nonempty_key_when_none_required() -> None:
    with GeminiStandin() as server:
        status, _, _ = _post(f"{server.url}v1beta/models/m:generateContent",
                             {"contents": [{"parts": [{"text": "x"}]}]}, {"x-goog-api-key": "whatever"})
        assert status == 200
        assert "whatever" not in repr(server.requests[-1])


def test_serve_in_process_restores_the_signal_handlers_it_installs(tmp_path: Path) -> None:
    """``serve()`` (``provision standin gemini``) installs SIGTERM/SIGINT handlers to stop; called
    in-process (from a test) it left them behind, so the caller's Ctrl-C only set a dead Event. A
    SIGTERM stops it, and the handlers are the caller's again afterwards."""
    import os
    import signal
    import threading

    from provisioner.lm.standin import serve
    from provisioner.runtime.polling import poll_until

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ready = tmp_path / "port"
    stop = threading.Event()

    def terminate_once_ready() -> None:
        try:
            poll_until(ready.exists, 60, 0.02)
        finally:  # a stand-in that never got ready still ends the test
            if ready.exists():
                os.kill(os.getpid(), signal.SIGTERM)  # through serve()'s handler
            else:
                stop.set()

    helper = threading.Thread(target=terminate_once_ready)
    helper.start()
    try:
        serve(host="127.0.0.1", port=0, api_key=None, ready_file=ready, stop=stop)
    finally:
        stop.set()
        helper.join(60)
    assert stop.is_set() and int(ready.read_text()) > 0
    assert {sig: signal.getsignal(sig) for sig in before} == before
