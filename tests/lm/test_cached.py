"""The cached mode: record/replay, every record mode, concurrent writers, and no secrets on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import LMConfigurationError, is_retryable_lm_error

from provisioner.errors import CassetteMissError
from provisioner.lm import build_lm, provisioner_error, stats
from provisioner.lm.cached import CachedEngine
from provisioner.lm.cassettes import CassetteStore, verify_cassettes
from provisioner.lm.ledger import read_ledger
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig, MockRule

KEY = "cassette-test-key-AbCdEf0123456789"


@pytest.fixture
def standin() -> Iterator[GeminiStandin]:
    with GeminiStandin(api_key=KEY) as server:
        yield server


def _config(tmp_path: Path, standin: GeminiStandin | None, **updates: object) -> LMConfig:
    values: dict[str, object] = {
        "mode": "cached", "cache_dir": tmp_path / "cassettes", "run_dir": tmp_path / "run", "run_id": "r",
        "api_key": KEY, "base_url": standin.url if standin else "http://127.0.0.1:9/",
        "record_mode": "new_episodes", "rate_limit_rpm": 1000,
    }
    values.update(updates)
    return LMConfig.model_validate(values)


def _ask(lm: dspy.LM, question: str) -> dspy.Prediction:
    with dspy.context(lm=lm):
        return dspy.ChainOfThought("question -> answer")(question=question)


def test_record_then_replay_with_the_server_stopped(tmp_path: Path) -> None:
    with GeminiStandin(api_key=KEY) as server:
        server.script("[[ ## reasoning ## ]]\nbecause\n\n[[ ## answer ## ]]\nrecorded answer\n\n"
                      "[[ ## completed ## ]]")
        config = _config(tmp_path, server)
        recorded = _ask(build_lm(config), "what is recorded?")
        assert server.request_count == 1
    assert recorded.answer == "recorded answer"
    # The server is gone; a replay-only LM without any API key answers from the cassette.
    replay = build_lm(config.model_copy(update={"record_mode": "none", "api_key": None}))
    before = stats()
    assert _ask(replay, "what is recorded?").answer == "recorded answer"
    delta = stats() - before
    assert (delta.replayed, delta.recorded, delta.real) == (1, 0, 0)
    (entry_path,) = CassetteStore(config.cache_dir).paths()
    entry = json.loads(entry_path.read_text())
    assert entry["summary"]["inputs"] == {"question": "what is recorded?"}
    assert entry["summary"]["signature"] == "question -> reasoning, answer"
    assert entry["usage"]["input_tokens"] > 0 and entry["cost_usd"] > 0
    kinds = [(e["kind"], e["cache"]) for e in read_ledger(tmp_path / "run" / "ledger.jsonl")]
    assert kinds == [("recorded", "miss"), ("replayed", "hit")]


def test_replay_only_miss_fails_at_once_naming_request_and_command(tmp_path: Path,
                                                                    standin: GeminiStandin) -> None:
    lm = build_lm(_config(tmp_path, standin, record_mode="none"))
    before = stats()
    with pytest.raises(LMConfigurationError) as caught:
        _ask(lm, "never recorded")
    assert standin.request_count == 0
    assert (stats() - before).errors == 1  # one attempt: DSPy did not retry it
    assert not is_retryable_lm_error(caught.value)
    miss = provisioner_error(caught.value)
    assert isinstance(miss, CassetteMissError)
    assert "question='never recorded'" in str(miss)
    assert "--record-mode new_episodes" in str(miss) and "lm.cache_dir=" in str(miss)


def test_new_episodes_replays_hits_and_records_misses(tmp_path: Path, standin: GeminiStandin) -> None:
    lm = build_lm(_config(tmp_path, standin))
    _ask(lm, "one")
    _ask(lm, "one")
    _ask(lm, "two")
    assert standin.request_count == 2
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 2


def test_once_records_into_an_empty_directory_only(tmp_path: Path, standin: GeminiStandin) -> None:
    first = build_lm(_config(tmp_path, standin, record_mode="once"))
    _ask(first, "a")
    _ask(first, "b")  # still the same session: the directory was empty when it started
    assert standin.request_count == 2
    second = build_lm(_config(tmp_path, standin, record_mode="once"))
    assert _ask(second, "a").answer == "mock_response"
    with pytest.raises(LMConfigurationError, match="'once' does not add to them"):
        _ask(second, "c")
    assert standin.request_count == 2


def test_all_rerecords_every_request(tmp_path: Path, standin: GeminiStandin) -> None:
    _ask(build_lm(_config(tmp_path, standin)), "q")
    standin.script("[[ ## reasoning ## ]]\nr\n\n[[ ## answer ## ]]\nfresh\n\n[[ ## completed ## ]]")
    rerecord = build_lm(_config(tmp_path, standin, record_mode="all"))
    assert _ask(rerecord, "q").answer == "fresh"
    assert standin.request_count == 2
    replay = build_lm(_config(tmp_path, standin, record_mode="none"))
    assert _ask(replay, "q").answer == "fresh"
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 1


def test_key_ignores_secrets_but_not_endpoint_or_parameters(tmp_path: Path) -> None:
    from dspy.lm15 import Config, Message, Request

    request = Request(model="m", system="s", messages=(Message.user("u"),), config=Config(temperature=0.0))
    hot = Request(model="m", system="s", messages=(Message.user("u"),), config=Config(temperature=0.7))

    def key(config: LMConfig, req: Request = request) -> str:
        from provisioner.lm.cassettes import cassette_key

        return cassette_key(CachedEngine(config).canonical(req))

    base = _config(tmp_path, None)
    assert key(base) == key(base.model_copy(update={"api_key": "another-key"}))
    assert key(base) == key(base.model_copy(update={"run_id": "other", "layer": "e2e"}))
    assert key(base) != key(base.model_copy(update={"base_url": "http://127.0.0.1:10/"}))
    assert key(base) != key(base.model_copy(update={"model": "gemini-2.5-flash"}))
    assert key(base) != key(base, hot)
    mock_a = base.model_copy(update={"cached_inner": "mock"})
    mock_b = mock_a.model_copy(update={"mock_rules": [MockRule(match={"q": "x"}, outputs={"a": 1})]})
    assert key(mock_a) != key(mock_b) != key(base)


def test_no_api_key_anywhere_on_disk(tmp_path: Path, standin: GeminiStandin) -> None:
    lm = build_lm(_config(tmp_path, standin))
    for question in ("first", "second", "third"):
        _ask(lm, question)
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 3
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert verify_cassettes(tmp_path / "cassettes", secrets=[KEY]).ok


def test_cached_mock_inner_records_without_network(tmp_path: Path) -> None:
    config = _config(tmp_path, None, cached_inner="mock", api_key=None,
                     mock_rules=[MockRule(match={"question": "hi"}, outputs={"answer": "hello"})])
    assert _ask(build_lm(config), "hi").answer == "hello"
    replay = build_lm(config.model_copy(update={"record_mode": "none"}))
    assert _ask(replay, "hi").answer == "hello"
    lines = read_ledger(tmp_path / "run" / "ledger.jsonl")
    assert [line["kind"] for line in lines] == ["recorded", "replayed"]
    assert lines[0]["cassette"] == lines[1]["cassette"] and lines[0]["cost_usd"] == 0


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import dspy
    from provisioner.lm import build_lm
    from provisioner.lmconfig import LMConfig

    cache_dir, run_dir, worker = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    lm = build_lm(LMConfig(mode="cached", cached_inner="mock", cache_dir=cache_dir, run_dir=run_dir))
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        for i in range(20):
            qa(question=f"shared question {i % 10}")      # all four writers record these
            qa(question=f"own question {worker}-{i}")     # only this writer records these
    print("done")
    """
)


def test_four_processes_recording_at_once_lose_nothing(tmp_path: Path) -> None:
    cache_dir, run_dir = tmp_path / "cassettes", tmp_path / "run"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache_dir), str(run_dir), str(n)],
                                stdout=subprocess.PIPE, text=True) for n in range(4)]
    for writer in writers:
        out, _ = writer.communicate(timeout=180)
        assert writer.returncode == 0 and out.strip() == "done"
    store = CassetteStore(cache_dir)
    assert len(store.keys()) == 4 * 20 + 10  # every distinct request once: none lost, none duplicated
    report = verify_cassettes(cache_dir)
    assert report.ok, report.problems  # no torn entries, no leftover temporary files
    assert report.checked == 90
    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert len(ledger) == 4 * 40  # one whole line per call, none interleaved
    assert {line["cassette"] for line in ledger} == set(store.keys())
    # Everything that was recorded replays.
    replay = build_lm(LMConfig(mode="cached", cached_inner="mock", cache_dir=cache_dir, record_mode="none"))
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=replay):
        for n in range(4):
            assert qa(question=f"own question {n}-19").answer == "mock_response"
