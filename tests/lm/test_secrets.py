"""The API key never lands in cassettes, ledgers, limit state, logs, reprs or exceptions."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import dspy
import pytest
from google.genai import errors as genai_errors
from pydantic import SecretStr

from provisioner.errors import ConfigError
from provisioner.lm import build_engine, build_lm
from provisioner.lm.gemini import redact_exception
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import API_KEY_ENV, STANDIN_KEY, LMConfig, worker_secrets

SECRET = "AIzaSy-provisioner-secret-value-0123456789"


def test_key_appears_nowhere(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, including httpx and google-genai
    failures: list[str] = []
    with GeminiStandin(api_key=SECRET) as server:
        stopped_url = server.url
        common = {"api_key": SECRET, "base_url": server.url, "run_dir": tmp_path / "run", "max_retries": 1,
                  "retry_base_delay_s": 0.0, "cache_dir": tmp_path / "cassettes"}
        real = LMConfig.model_validate({"mode": "real", **common})
        cached = LMConfig.model_validate({"mode": "cached", **common})
        for config in (real, cached):
            lm = build_lm(config)
            with dspy.context(lm=lm):
                dspy.ChainOfThought("question -> answer")(question=f"{config.mode} question")
                server.fail_next(2, status=429, retry_after=0)
                try:
                    dspy.Predict("question -> answer")(question=f"{config.mode} failing question")
                except Exception as exc:
                    failures.append("".join(traceback.format_exception(exc)))
            failures.append(repr(lm) + repr(build_engine(config)) + repr(config) + str(config.model_dump()))
            failures.append(config.public_json())
            failures.append(str(lm.history))
    # A transport failure and a rejected key are the messages most likely to echo a request.
    for config in (real.model_copy(update={"base_url": stopped_url}),
                   real.model_copy(update={"api_key": SecretStr(SECRET + "-wrong"),
                                           "base_url": "http://127.0.0.1:9/"})):
        with dspy.context(lm=build_lm(config)):
            try:
                dspy.Predict("question -> answer")(question="unreachable")
            except Exception as exc:
                failures.append("".join(traceback.format_exception(exc)))
    assert len(failures) >= 6
    for text in failures:
        assert SECRET not in text
    assert SECRET not in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "ledger.jsonl" for p in files) and any(p.suffix == ".json" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("config", "endpoint", "gets"),
    [
        (LMConfig(mode="mock", api_key=SECRET), "api", None),
        (LMConfig(mode="cached", record_mode="none", api_key=SECRET), "api", None),  # replay only
        (LMConfig(mode="cached", cached_inner="mock", api_key=SECRET), "api", None),  # records the mock
        (LMConfig(mode="cached", api_key=SECRET), "api", SECRET),  # records misses from Gemini
        (LMConfig(mode="cached", api_key=SECRET), "none", None),  # …but cannot reach it: no key
        (LMConfig(mode="real", api_key=SECRET), "api", SECRET),
        (LMConfig(mode="real", api_key=SECRET), "none", None),
        (LMConfig(mode="real", api_key=SECRET), "standin", STANDIN_KEY),  # never the real key
        (LMConfig(mode="real"), "api", None),
        (LMConfig(mode="real"), "standin", STANDIN_KEY),
        (LMConfig(mode="mock"), "standin", None),
    ],
)
def test_one_policy_decides_which_worker_gets_the_key(
    config: LMConfig, endpoint: str, gets: str | None
) -> None:
    secrets = worker_secrets(config, endpoint=endpoint)  # type: ignore[arg-type]
    assert secrets == ({API_KEY_ENV: gets} if gets else {})


def test_the_worker_env_never_holds_the_key_and_the_handover_restores_it() -> None:
    config = LMConfig(mode="real", api_key=SECRET)
    env = config.to_worker_env()
    assert API_KEY_ENV not in env and all(SECRET not in value for value in env.values())
    restored = LMConfig.from_worker_env({**env, **worker_secrets(config, endpoint="api")})
    assert restored is not None and restored.api_key is not None
    assert restored.api_key.get_secret_value() == SECRET


# -- the key from the environment (host side) and only from the start-up configuration (workers) --------


def test_issue_input_the_key_is_read_from_gemini_test_api_key(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, SECRET)
    with GeminiStandin(api_key=SECRET) as server:
        lm = build_lm(LMConfig(mode="real", base_url=server.url, run_dir=tmp_path))
        assert lm("hi")
        assert server.requests[0].key_ok


def test_only_that_name_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    with pytest.raises(ConfigError) as caught:
        build_lm(LMConfig(mode="real", run_dir=tmp_path))
    assert f"{API_KEY_ENV} is not in the environment" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_worker_never_reads_the_key_from_its_environment() -> None:
    # In its own interpreter: forbidding the fallback is process-wide (what `provision worker` does).
    script = f"""
import os
os.environ[{API_KEY_ENV!r}] = {SECRET!r}
from provisioner.lm import gemini
from provisioner.lmconfig import LMConfig
gemini.forbid_environment_key()
try:
    gemini.GeminiEngine(LMConfig(mode="real"))
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError lm.api_key is not set in this worker's start-up configuration")
    assert SECRET not in out.stdout


# -- the whole error chain is redacted ---------------------------------------------------------------------


def _strings_reachable(root: BaseException) -> list[str]:
    """Every string reachable from an exception: str/repr of each exception in the chain, its args, its
    attributes and everything they hold (objects' __dict__, containers, bytes decoded), its notes, and the
    repr of every local of every traceback frame (what --showlocals or a rich traceback prints)."""
    found: list[str] = []
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, type | types.ModuleType | types.FunctionType):
            continue
        seen.add(id(value))
        if isinstance(value, str):
            found.append(value)
            continue
        if isinstance(value, bytes | bytearray):
            found.append(bytes(value).decode("utf-8", "replace"))
            continue
        if isinstance(value, BaseException):
            found += [str(value), repr(value), "".join(traceback.format_exception(value))]
            stack += [value.args, value.__cause__, value.__context__, getattr(value, "__notes__", None)]
            tb = value.__traceback__
            while tb is not None:
                found += [repr(v) for v in tb.tb_frame.f_locals.values()]
                tb = tb.tb_next
        if isinstance(value, dict):
            stack += [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple | set | frozenset):
            stack += list(value)
        with contextlib.suppress(TypeError):
            stack += list(vars(value).values())
        slots = getattr(type(value), "__slots__", ())
        stack += [getattr(value, name, None) for name in ([slots] if isinstance(slots, str) else slots)]
    return found


def _raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


def test_rejected_key_error_chain_holds_the_key_nowhere(tmp_path: Path) -> None:
    # The SDK's original error carries the HTTP response, its request and the x-goog-api-key header.
    with GeminiStandin(api_key="the-right-key") as server:
        config = LMConfig(mode="real", api_key=SECRET, base_url=server.url, run_dir=tmp_path)
        for call in (lambda: dspy.Predict("question -> answer")(question="q"),
                     lambda: build_lm(config)("hi")):
            with dspy.context(lm=build_lm(config)):
                error = _raised(call)
            strings = _strings_reachable(error)
            assert len(strings) > 20
            assert not [s for s in strings if SECRET in s]
            chain = []
            current: BaseException | None = error
            while current is not None:
                chain.append(current)
                current = current.__cause__ or current.__context__
            sdk = [e for e in chain if isinstance(e, genai_errors.ClientError)]
            assert sdk and sdk[0].code == 400 and "API_KEY_INVALID" in str(sdk[0].details)  # kept, redacted


def test_transport_error_chain_holds_the_key_nowhere(tmp_path: Path) -> None:
    # httpx's ConnectError keeps the request (with its key header) — dropped from the redacted copy.
    config = LMConfig(mode="real", api_key=SECRET, base_url="http://127.0.0.1:9/", run_dir=tmp_path,
                      max_retries=0)
    error = _raised(lambda: build_lm(config)("hi"))
    assert not [s for s in _strings_reachable(error) if SECRET in s]
    assert any(type(e).__name__ == "ConnectError" for e in _chain(error))


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def test_the_scanner_finds_a_key_in_an_unredacted_sdk_error() -> None:
    # The test above can fail: the raw SDK error of the same request does hold the key.
    from google import genai
    from google.genai import types as genai_types

    with GeminiStandin(api_key="the-right-key") as server:
        client = genai.Client(api_key=SECRET, http_options=genai_types.HttpOptions(base_url=server.url))
        error = _raised(lambda: client.models.generate_content(model="gemini-2.5-flash-lite", contents="hi"))
    assert [s for s in _strings_reachable(error) if SECRET in s]


def test_redact_exception_keeps_type_and_drops_secrets_everywhere() -> None:
    inner = ValueError(f"inner {SECRET}")
    outer = KeyError({"key": SECRET, "nested": [SECRET.encode()]})
    outer.__cause__ = inner
    outer.response = object()  # type: ignore[attr-defined]
    copy = redact_exception(outer, [SECRET])
    assert type(copy) is KeyError and type(copy.__cause__) is ValueError
    assert copy.args == ({"key": "***", "nested": [b"***"]},)
    assert str(copy.__cause__) == "inner ***" and copy.response is None  # type: ignore[attr-defined]
    assert SECRET in str(outer.args)  # the original is untouched


@pytest.mark.parametrize(("config", "instead"), [
    (LMConfig(mode="real"), "or use --lm mock / --lm cached"),
    (LMConfig(mode="cached", cached_inner="real"),
     "or record from the mock (lm.cached_inner='mock'), or replay only (--record-mode none)"),
])
def test_a_missing_key_says_what_the_mode_calls_gemini_for_and_never_suggests_the_mode_in_use(
    monkeypatch: pytest.MonkeyPatch, config: LMConfig, instead: str
) -> None:
    """The new user's trial in cached mode: "… or use lm.mode='mock'/'cached'" while it was cached."""
    from provisioner.lm.gemini import resolve_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ConfigError) as caught:
        resolve_api_key(config)
    text = str(caught.value)
    assert f"({config.gemini_use}, lm.model='gemini-2.5-flash-lite')" in text and text.endswith(instead)
    assert f"lm.mode='{config.mode}'/" not in text and "use lm.mode" not in text
