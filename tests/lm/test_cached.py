"""The cached mode: record/replay, every record mode, concurrent writers, and no secrets on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dspy
import pytest
from dspy.utils.exceptions import LMConfigurationError, is_retryable_lm_error

from provisioner.errors import CassetteMissError, CassetteNotWritableError, CorruptCassetteError
from provisioner.lm import build_lm, provisioner_error, stats
from provisioner.lm.cached import CachedEngine
from provisioner.lm.cassettes import CassetteStore, list_cassettes, verify_cassettes
from provisioner.lm.ledger import read_ledger
from provisioner.lm.standin import GeminiStandin
from provisioner.lmconfig import LMConfig, MockRule

from .._helpers import LatencyGate

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


def test_a_miss_in_a_worker_names_the_host_cassette_folder_not_the_mount(tmp_path: Path) -> None:
    """The reported case: a miss inside a worker said `lm.cache_dir=/provision/cassettes` (the
    container's mount point); the user knows `test/fixtures/lm_responses`. The controller passes
    that as lm.cache_dir_shown (runtime.recipes.worker_lm_config), and every miss message uses it."""
    mount = tmp_path / "provision" / "cassettes"  # stands for the mount point inside the container
    shown = "test/fixtures/lm_responses"
    with pytest.raises(LMConfigurationError) as caught:
        _ask(build_lm(_mock_config(tmp_path, cache_dir=mount, cache_dir_shown=shown, record_mode="none")),
             "q")
    for text in (str(caught.value), str(provisioner_error(caught.value))):
        assert f"lm.cache_dir={shown};" in text and str(mount) not in text, text
    _ask(build_lm(_mock_config(tmp_path, cache_dir=mount, cache_dir_shown=shown)), "q")  # recorded
    (path,) = CassetteStore(mount).paths()
    path.write_text("{")  # a corrupt cassette names its file under the host folder too
    with pytest.raises(LMConfigurationError) as caught:
        _ask(build_lm(_mock_config(tmp_path, cache_dir=mount, cache_dir_shown=shown, record_mode="none")),
             "q")
    relative = path.relative_to(mount)
    assert f"corrupt cassette {shown}/{relative}" in str(caught.value) and str(mount) not in str(caught.value)
    mount.chmod(0o555)  # read-only, as a replay-only mount is: the not-writable message too
    try:
        with pytest.raises(LMConfigurationError) as caught:
            _ask(build_lm(_mock_config(tmp_path, cache_dir=mount, cache_dir_shown=shown)), "another")
    finally:
        mount.chmod(0o755)
    error = provisioner_error(caught.value)
    assert isinstance(error, CassetteNotWritableError)
    assert shown in str(error) and str(mount) not in str(error)
    assert str(mount) not in error.why


def test_new_episodes_replays_hits_and_records_misses(tmp_path: Path, standin: GeminiStandin) -> None:
    lm = build_lm(_config(tmp_path, standin))
    _ask(lm, "one")
    _ask(lm, "one")
    _ask(lm, "two")
    assert standin.request_count == 2
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 2


def test_once_is_decided_once_per_run_not_per_lm(tmp_path: Path) -> None:
    """Issue 9, kind 1: an empty directory, two tests (two LMs) of one run asking different
    questions, 'once' with the mock inner LM -> both record; the next run replays both and a third
    request is a miss that says why."""
    def run_config(run: str) -> LMConfig:
        return _config(tmp_path, None, record_mode="once", cached_inner="mock", api_key=None,
                       run_dir=tmp_path / run / "lm", run_id=run, layer="unit")

    for question in ("first question", "second question"):  # two tests: a fresh LM each
        assert _ask(build_lm(run_config("run-1")), question).answer == "mock_response"
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 2
    decision = json.loads((tmp_path / "run-1" / "lm" / "record-once.unit.json").read_text())
    assert decision["record"] is True

    before = stats()
    for question in ("first question", "second question"):
        assert _ask(build_lm(run_config("run-2")), question).answer == "mock_response"
    assert (stats() - before).replayed == 2
    with pytest.raises(LMConfigurationError) as caught:
        _ask(build_lm(run_config("run-2")), "third question")
    message = str(provisioner_error(caught.value))
    assert "is replay-only for this run (run run-2, layer unit)" in message
    assert "had recordings when the run started" in message
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 2
    kinds = [(e["event"], e.get("reason")) for e in read_ledger(tmp_path / "run-2" / "lm" / "ledger.jsonl")]
    assert kinds == [("call", None), ("call", None), ("cassette_miss", "replay_only")]


_ONCE_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import dspy
    from provisioner.lm import build_lm
    from provisioner.lmconfig import LMConfig

    cache_dir, run_dir, question = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    lm = build_lm(LMConfig(mode="cached", cached_inner="mock", record_mode="once", cache_dir=cache_dir,
                           run_dir=run_dir, run_id="r", layer="integration"))
    with dspy.context(lm=lm):
        print(dspy.Predict("question -> answer")(question=question).answer)
    """
)


def test_once_decision_is_shared_by_the_processes_of_a_run(tmp_path: Path) -> None:
    """xdist processes and worker containers of one run share its LM dir: the first decides."""
    cache_dir, run_dir = tmp_path / "cassettes", tmp_path / "run" / "lm"
    for n in range(3):  # one after another: each later process sees the earlier ones' recordings
        done = subprocess.run([sys.executable, "-c", _ONCE_PROCESS, str(cache_dir), str(run_dir), f"q{n}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "mock_response", done.stderr[-2000:]
    assert len(CassetteStore(cache_dir).keys()) == 3
    other_run = subprocess.run(
        [sys.executable, "-c", _ONCE_PROCESS, str(cache_dir), str(tmp_path / "r2"), "q9"],
        capture_output=True, text=True, timeout=120)
    assert other_run.returncode != 0 and "replay-only for this run" in other_run.stderr


def test_once_in_a_run_that_started_with_recordings_records_nothing(tmp_path: Path) -> None:
    seeded = _config(tmp_path, None, cached_inner="mock", api_key=None)
    _ask(build_lm(seeded), "seed")
    once = seeded.model_copy(update={"record_mode": "once", "run_dir": tmp_path / "run-b"})
    assert _ask(build_lm(once), "seed").answer == "mock_response"
    with pytest.raises(LMConfigurationError, match="replay-only for this run"):
        _ask(build_lm(once), "new")
    assert len(CassetteStore(tmp_path / "cassettes").keys()) == 1


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


# -- cassette errors name the file (issue 9) -------------------------------------------------------


def _mock_config(tmp_path: Path, **updates: object) -> LMConfig:
    return _config(tmp_path, None, cached_inner="mock", api_key=None, **updates)


def test_a_corrupt_entry_names_the_file_and_recording_modes_rerecord_it(tmp_path: Path) -> None:
    _ask(build_lm(_mock_config(tmp_path)), "q")
    (path,) = CassetteStore(tmp_path / "cassettes").paths()
    path.write_text('{"format": "provisioner-cassette/1", "key": ')  # a torn write
    with pytest.raises(LMConfigurationError) as caught:
        _ask(build_lm(_mock_config(tmp_path, record_mode="none")), "q")
    corrupt = provisioner_error(caught.value)
    assert isinstance(corrupt, CorruptCassetteError) and corrupt.path == path
    assert str(corrupt) == (f"corrupt cassette {path}: not valid JSON (Expecting value at line 1 column 45); "
                            "delete it to re-record (or provision cassettes verify)")
    assert not isinstance(caught.value, json.JSONDecodeError)
    for mode in ("new_episodes", "all"):
        path.write_text("not json at all")
        assert _ask(build_lm(_mock_config(tmp_path, record_mode=mode)), "q").answer == "mock_response"
        assert verify_cassettes(tmp_path / "cassettes").ok, mode  # re-recorded in place
    entry = json.loads(path.read_text())
    entry["format"] = "something-else/9"
    path.write_text(json.dumps(entry))
    with pytest.raises(LMConfigurationError, match=r"corrupt cassette .*: format 'something-else/9' is not"):
        _ask(build_lm(_mock_config(tmp_path, record_mode="none")), "q")


@pytest.mark.parametrize("frozen", ["root", "shard"])
def test_a_read_only_cassette_dir_is_never_widened_and_a_miss_says_so(
    tmp_path: Path, standin: GeminiStandin, frozen: str
) -> None:
    cache = tmp_path / "cassettes"
    config = _config(tmp_path, standin)  # records from the (stand-in) Gemini API: a miss would cost money
    _ask(build_lm(config), "recorded before freezing")
    (entry,) = CassetteStore(cache).paths()
    target = cache if frozen == "root" else entry.parent
    if frozen == "root":
        shutil.rmtree(entry.parent)  # the new request's shard does not exist: it would be created in root
    target.chmod(0o555)
    modes = {p: p.stat().st_mode for p in (cache, *cache.rglob("*"))}
    requests = standin.request_count
    try:
        before = stats()
        with pytest.raises(LMConfigurationError) as caught:
            if frozen == "shard":  # re-recording writes into the frozen shard
                _ask(build_lm(config.model_copy(update={"record_mode": "all"})), "recorded before freezing")
            else:
                _ask(build_lm(config), "new question")
        assert {p: p.stat().st_mode for p in modes} == modes  # nothing was made writable
    finally:
        target.chmod(0o755)
    error = provisioner_error(caught.value)
    assert isinstance(error, CassetteNotWritableError) and isinstance(error, CassetteMissError)
    assert f"cassette dir not writable ({target} is read-only (mode 555))" in str(error)
    assert "use --record-mode none or fix its permissions" in str(error)
    assert standin.request_count == requests  # refused before the inner LM was called: nothing spent
    assert (stats() - before).errors == 1
    misses = [e for e in read_ledger(tmp_path / "run" / "ledger.jsonl") if e["event"] == "cassette_miss"]
    assert [m["reason"] for m in misses] == ["not_writable"]
    from provisioner.lm.ledger import ledger_usage

    usage = ledger_usage(tmp_path / "run")
    assert usage is not None and usage.cache_misses == 2  # the first recording and the refused one


def test_the_replay_miss_hint_matches_the_inner_lm(tmp_path: Path) -> None:
    def hint(**updates: object) -> str:
        config = _config(tmp_path, None, record_mode="none", **updates)
        with pytest.raises(LMConfigurationError) as caught:
            _ask(build_lm(config), "unrecorded")
        return str(provisioner_error(caught.value))

    mock = hint(cached_inner="mock", api_key=None)
    assert "no API key is needed" in mock and "GEMINI_TEST_API_KEY" not in mock
    standin = hint(endpoint_kind="standin", base_url="http://127.0.0.1:9/")
    assert "the run's Gemini stand-in (no API key needed" in standin and "GEMINI_TEST_API_KEY" not in standin
    real = hint(base_url=None)
    assert "GEMINI_TEST_API_KEY set" in real and "generativelanguage.googleapis.com" in real


def test_a_miss_shows_the_nearest_recording_of_the_same_program(tmp_path: Path) -> None:
    """A DSPy upgrade that rewords prompts changes every key: the miss shows how the prompt changed."""

    class Old(dspy.Signature):
        """Answer the question briefly."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    class New(dspy.Signature):
        """Answer the question briefly and politely."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    class Other(dspy.Signature):
        """Translate."""

        text: str = dspy.InputField()
        translation: str = dspy.OutputField()

    recorder = build_lm(_mock_config(tmp_path))
    with dspy.context(lm=recorder):
        dspy.Predict(Old)(question="what is the capital of France?")
        dspy.Predict(Old)(question="something else entirely, unrelated and long")
        dspy.Predict(Other)(text="hello")
    replay = build_lm(_mock_config(tmp_path, record_mode="none"))
    with dspy.context(lm=replay), pytest.raises(LMConfigurationError) as caught:
        dspy.Predict(New)(question="what is the capital of France?")
    message = str(provisioner_error(caught.value))
    nearest = next(p for p in CassetteStore(tmp_path / "cassettes").paths() if "capital" in p.read_text())
    assert f"nearest recording of the same program: {nearest}" in message
    assert "--- recorded" in message and "+++ requested" in message
    assert "-        Answer the question briefly." in message or "-Answer the question briefly." in message
    assert "politely" in message
    with dspy.context(lm=replay), pytest.raises(LMConfigurationError) as other:
        dspy.Predict("city -> country")(city="Paris")
    assert "no recording of this program (`city -> country`" in str(provisioner_error(other.value))


@pytest.mark.parametrize(("updates", "source"), [
    ({"cached_inner": "mock", "api_key": None}, "mock"),
    ({"endpoint_kind": "standin"}, "standin"),
    ({}, "gemini"),
])
def test_entries_say_what_answered(tmp_path: Path, standin: GeminiStandin, updates: dict[str, object],
                                   source: str) -> None:
    _ask(build_lm(_config(tmp_path, standin, **updates)), "q")
    (path,) = CassetteStore(tmp_path / "cassettes").paths()
    assert json.loads(path.read_text())["source"] == source
    (info,) = list_cassettes(tmp_path / "cassettes")
    assert info.source == source and "test_entries_say_what_answered" in str(info.test_id)


@pytest.mark.parametrize("inner", ["real", "mock"])
def test_a_folder_made_read_only_during_the_call_fails_the_write_and_books_a_billed_call(
    tmp_path: Path, standin: GeminiStandin, inner: str, latency_gate: LatencyGate
) -> None:
    """The folder was writable when the miss was checked, but not once the answer came back (a
    mount remounted read-only, a disk filled up): the recording fails as not writable, and an
    answer that was billed (the Gemini inner LM) is still booked — as ``not_recorded``."""
    import threading

    cache = tmp_path / "cassettes"
    cache.mkdir()
    # The inner call's latency is held by latency_gate until the folder is read-only (the 1 ms only
    # makes the stand-in / the mock rule wait): "still under way" is the gate, not a 3 s margin.
    if inner == "real":
        standin.set_latency(1)
        config = _config(tmp_path, standin)
    else:
        config = _config(tmp_path, None, cached_inner="mock", api_key=None, mock_rules=[
            MockRule(match={"question": "made read-only"}, outputs={"answer": "a"}, latency_ms=1)])
    lm = build_lm(config)
    engine = lm.engine
    assert isinstance(engine, CachedEngine)
    caught: list[BaseException] = []

    def ask() -> None:
        try:
            _ask(lm, "made read-only")
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        # Past the writability check: the inner call is under way, held at the gate.
        deadline = time.monotonic() + 60
        while latency_gate.waiting != 1:
            assert time.monotonic() < deadline and thread.is_alive(), ("the inner call never started", caught)
            time.sleep(0.01)
        assert standin.request_count == (1 if inner == "real" else 0)
        cache.chmod(0o555)
        latency_gate.release()
        thread.join(60)
    finally:
        cache.chmod(0o755)
    (error,) = caught
    assert isinstance(error, LMConfigurationError)
    assert isinstance(provisioner_error(error), CassetteNotWritableError)
    assert "is read-only (mode 555)" in str(error)
    assert list(CassetteStore(cache).paths()) == [] and CassetteStore(cache).temp_files() == []
    lines = read_ledger(tmp_path / "run" / "ledger.jsonl")
    booked = [(e["event"], e.get("kind"), e.get("status")) for e in lines]
    if inner == "real":
        assert booked == [("call", "real", "not_recorded"), ("cassette_miss", None, None)]
    else:  # the mock costs nothing: only the miss is booked
        assert booked == [("cassette_miss", None, None)]


def test_a_replay_miss_of_a_raw_prompt_names_it_and_no_program(tmp_path: Path) -> None:
    config = _config(tmp_path, None, record_mode="none", cached_inner="mock", api_key=None)
    lm = build_lm(config)
    with pytest.raises(LMConfigurationError) as caught:
        lm("a plain prompt, not a DSPy signature")
    text = str(provisioner_error(caught.value))
    assert "prompt 'a plain prompt, not a DSPy signature'" in text
    assert "no recording of this program" not in text and "nearest recording" not in text


def test_closing_a_cached_lm_closes_its_inner_lm_once(tmp_path: Path) -> None:
    config = _config(tmp_path, None, cached_inner="mock", api_key=None)
    engine = CachedEngine(config)
    engine.close()  # nothing built yet: nothing to close
    lm = build_lm(config)
    _ask(lm, "records through the inner mock")
    cached = lm.engine
    assert isinstance(cached, CachedEngine) and cached._inner is not None
    cached.close()
    assert cached._inner is None
    cached.close()
    assert _ask(lm, "records through the inner mock").answer  # a replay needs no inner LM


def test_a_mock_miss_after_a_rule_change_says_which_rule_changed(tmp_path: Path) -> None:
    """A user's trial: one rule added to lm.mock_rules made every replay miss with only "differs in
    identity: 'mock:b04a…' → 'mock:1164…' (same prompt text)". The miss names the rule added or
    removed (the identity still depends on every rule: docs/lm.md says why)."""
    question = "what is the capital of France?"
    _ask(build_lm(_mock_config(tmp_path)), question)
    extra = MockRule(match={"summary": "never"}, outputs={"answer": "x"})
    with pytest.raises(LMConfigurationError) as caught:
        _ask(build_lm(_mock_config(tmp_path, record_mode="none", mock_rules=[extra])), question)
    message = str(provisioner_error(caught.value))
    assert "differs in identity" in message and "(same prompt text)" in message
    assert 'lm.mock_rules changed since it was recorded: added rule {' in message
    assert 'added rule {"match":{"summary":"never"},"outputs":{"answer":"x"}}' in message  # as written
    # recorded with that rule, replayed without it: the rule is named as removed
    other = tmp_path / "other"
    other.mkdir()
    _ask(build_lm(_mock_config(other, mock_rules=[extra])), question)
    with pytest.raises(LMConfigurationError) as removed:
        _ask(build_lm(_mock_config(other, record_mode="none", mock_default="changed")), question)
    text = str(provisioner_error(removed.value))
    assert "removed rule {" in text and "lm.mock_default 'mock_response' → 'changed'" in text
    # an entry from before `mock_setup` still says what the identity digests
    (path,) = CassetteStore(other / "cassettes").paths()
    entry = json.loads(path.read_text())
    del entry["mock_setup"]
    path.write_text(json.dumps(entry))
    with pytest.raises(LMConfigurationError) as old:
        _ask(build_lm(_mock_config(other, record_mode="none")), question)
    assert "lm.mock_rules or lm.mock_default changed since it was recorded" in \
        str(provisioner_error(old.value))
