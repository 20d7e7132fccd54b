"""The cassette store itself: writes killed mid-way, read-only directories, the nearest recording."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from provisioner.cli import main
from provisioner.errors import CassetteNotWritableError, CorruptCassetteError
from provisioner.lm.cassettes import (
    FORMAT,
    CassetteStore,
    canonical_request,
    cassette_key,
    nearest_recording,
    request_summary,
    verify_cassettes,
)


def _entry(question: str, system: str = "Answer briefly.") -> dict[str, object]:
    request = canonical_request(identity="mock:x", model="m", system=system,
                                messages=[("user", f"[[ ## question ## ]]\n{question}")], generation={})
    return {"format": FORMAT, "key": cassette_key(request), "recorded_at": "2026-01-01T00:00:00+00:00",
            "identity": "mock:x", "summary": request_summary(request), "request": request,
            "response": {"text": "a"}, "source": "mock"}


# A recorder that gets killed while its temporary file is written (held open and locked).
_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    import provisioner.lm.cassettes as cassettes

    ready = Path(sys.argv[2])

    def stuck_fsync(fd):
        ready.write_text("writing")
        threading.Event().wait()  # never returns: the parent kills this process here

    cassettes.os.fsync = stuck_fsync
    entry = {"format": cassettes.FORMAT, "key": "ab" + "0" * 62, "response": {"text": "x"}}
    cassettes.CassetteStore(Path(sys.argv[1])).put(entry)
    """
)


def test_kill_9_of_a_recorder_leaves_nothing_that_fails_verify(tmp_path: Path) -> None:
    cache, ready = tmp_path / "cassettes", tmp_path / "ready"
    CassetteStore(cache).put(_entry("kept"))
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(cache), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # polling the child's progress with a deadline
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        (temp,) = CassetteStore(cache).temp_files()
        in_flight = verify_cassettes(cache)
        assert in_flight.ok and in_flight.removed_temp == [] and temp.exists()  # a live write is left alone
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert temp.exists()  # kill -9 left it behind
    result = CliRunner().invoke(main, ["cassettes", "verify", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert f"removed {temp}" in result.output and "1 entries checked" in result.output
    assert CassetteStore(cache).temp_files() == []


def test_a_failed_write_leaves_no_temp_file_and_changes_no_mode(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = CassetteStore(tmp_path / "cassettes")
    store.put(_entry("first"))
    entry = _entry("second")
    shard = store.path_for(str(entry["key"])).parent
    shard.mkdir(exist_ok=True)

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    mode = stat.S_IMODE(shard.stat().st_mode)
    monkeypatch.setattr("provisioner.lm.cassettes.os.fsync", no_space)
    with pytest.raises(CassetteNotWritableError, match=r"cassette dir not writable .*No space left"):
        store.put(entry)
    assert store.temp_files() == [] and len(store.keys()) == 1
    assert stat.S_IMODE(shard.stat().st_mode) == mode


def test_get_names_the_corrupt_file(tmp_path: Path) -> None:
    store = CassetteStore(tmp_path)
    entry = _entry("q")
    path = store.put(entry)
    path.write_bytes(b"{\"a\": \"\xc3\x28\"}")
    with pytest.raises(CorruptCassetteError, match=rf"corrupt cassette {path}: not UTF-8"):
        store.get(str(entry["key"]))
    other = _entry("r")
    path.write_text(json.dumps(other))  # valid JSON, but another request's entry under this name
    with pytest.raises(CorruptCassetteError, match="is not the file's name"):
        store.get(str(entry["key"]))


def test_nearest_recording_is_of_the_same_program_and_model(tmp_path: Path) -> None:
    store = CassetteStore(tmp_path)
    store.put(_entry("what is the capital of France?"))
    store.put(_entry("how many legs has a spider?"))
    wanted = _entry("what is the capital of France?", system="Answer briefly and politely.")["request"]
    assert isinstance(wanted, dict)
    nearest = nearest_recording(tmp_path, wanted)
    assert nearest is not None and "capital" in nearest.path.read_text()
    assert "-Answer briefly." in nearest.diff and "+Answer briefly and politely." in nearest.diff
    assert nearest.differences == []
    other_model = {**wanted, "model": "another-model"}
    assert nearest_recording(tmp_path, other_model) is None


# --- edges of the store and its readers (issue 14: the cached store at 100 %) ---------------------


def test_a_response_format_class_is_keyed_by_its_schema_and_anything_else_by_its_repr() -> None:
    import pydantic

    class Answer(pydantic.BaseModel):
        text: str

    class Marker:
        def __repr__(self) -> str:
            return "Marker()"

    def key_of(response_format: object) -> str:
        request = canonical_request(identity="mock:x", model="m", system="", messages=[("user", "q")],
                                    generation={"response_format": response_format, "stop": ("a", "b")})
        return cassette_key(request)

    request = canonical_request(identity="mock:x", model="m", system="", messages=[("user", "q")],
                                generation={"response_format": Answer, "other": Marker()})
    assert request["generation"]["response_format"] == {"json_schema": Answer.model_json_schema()}
    assert request["generation"]["other"] == "Marker()"
    assert key_of(Answer) == key_of(Answer)  # stable across calls

    class Other(pydantic.BaseModel):
        number: int

    assert key_of(Answer) != key_of(Other)  # another schema is another request


def test_entries_from_before_the_source_field_are_read_off_their_identity() -> None:
    from provisioner.lm.cassettes import source_of

    assert source_of({"source": "standin"}) == "standin"
    assert source_of({"identity": "mock:abc"}) == "mock"
    assert source_of({"identity": "gemini@https://generativelanguage.googleapis.com"}) == "gemini"
    assert source_of({"identity": "something else"}) == "?"


@pytest.mark.parametrize(("content", "problem"), [
    (b"[1, 2]", "not a JSON object but list"),
    (json.dumps({"format": FORMAT, "key": "ab" + "0" * 62, "response": {"text": 3}}).encode(),
     "no response text"),
])
def test_valid_json_that_is_not_an_entry_is_corrupt(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "ab" / ("ab" + "0" * 62 + ".json")
    path.parent.mkdir()
    path.write_bytes(content)
    from provisioner.lm.cassettes import list_cassettes

    (info,) = list_cassettes(tmp_path)
    assert info.problem == problem
    report = verify_cassettes(tmp_path)
    assert report.problems == [(path, problem)] and not report.ok


def test_the_store_s_names_and_what_it_ignores(tmp_path: Path) -> None:
    store = CassetteStore(tmp_path / "never-created")
    assert repr(store) == f"CassetteStore({str(tmp_path / 'never-created')!r})"
    assert store.temp_files() == [] and store.keys() == [] and not store.has_entries()
    with pytest.raises(ValueError, match="not a cassette key"):
        store.path_for("../../etc/passwd")
    real = CassetteStore(tmp_path / "c")
    real.put(_entry("kept"))
    (tmp_path / "c" / "README.md").write_text("not a shard")
    (tmp_path / "c" / "abc").mkdir()  # not a two-character shard
    (tmp_path / "c" / "abc" / ("ab" + "1" * 62 + ".json")).write_text("{}")
    assert len(real.keys()) == 1


def test_a_path_through_a_file_is_not_writable_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("a file where the cassette folder should be")
    store = CassetteStore(tmp_path / "c")
    entry = _entry("q")
    assert store.not_writable(str(entry["key"])) == f"{tmp_path / 'c'} is not a directory"
    with pytest.raises(CassetteNotWritableError, match="is not a directory"):
        store.put(entry)


def test_a_write_that_fails_for_another_reason_is_raised_as_is_and_leaves_nothing(tmp_path: Path) -> None:
    store = CassetteStore(tmp_path)
    entry = {**_entry("q"), "response": {"text": object()}}  # not JSON: a bug, not a full disk
    with pytest.raises(TypeError):
        store.put(entry)
    assert store.temp_files() == [] and store.keys() == []


def test_the_nearest_recording_scans_a_bounded_number_skips_corrupt_files_and_clips_long_diffs(
    tmp_path: Path,
) -> None:
    store = CassetteStore(tmp_path)
    long_question = "\n".join(f"line {i}" for i in range(40))
    recorded = store.put(_entry(long_question, system=""))  # no system prompt
    corrupt = store.path_for("00" + "0" * 62)
    corrupt.parent.mkdir(exist_ok=True)
    corrupt.write_text("{not json")
    wanted = _entry(long_question.replace("line", "row"), system="")["request"]
    assert isinstance(wanted, dict)
    nearest = nearest_recording(tmp_path, wanted, max_diff_lines=5)
    assert nearest is not None and nearest.path == recorded
    assert len(nearest.diff) == 6 and nearest.diff[-1].endswith("more diff lines")
    assert "[system]" not in "\n".join(nearest.diff)
    # Only the first file scanned (the corrupt one sorts first): nothing of the program found.
    assert sorted(CassetteStore(tmp_path).paths())[0] == corrupt
    assert nearest_recording(tmp_path, wanted, max_scanned=1) is None


def test_a_temporary_file_gone_before_it_is_checked_is_not_abandoned(tmp_path: Path) -> None:
    from provisioner.lm.cassettes import _abandoned

    assert _abandoned(tmp_path / ".gone.tmp") is False  # its writer renamed it into place meanwhile


def test_prune_with_a_named_run_vouches_only_with_a_complete_run_of_that_folder(tmp_path: Path) -> None:
    from provisioner.errors import ConfigError
    from provisioner.lm.cassettes import prune_unused, read_runs
    from provisioner.lm.ledger import Ledger

    cache = tmp_path / "cassettes"
    used, unused = CassetteStore(cache).put(_entry("used")), CassetteStore(cache).put(_entry("unused"))
    ledger_dir = tmp_path / "run"
    for run_id, complete in (("done", True), ("cut", False)):
        ledger = Ledger(ledger_dir, run_id=run_id, layer="integration")
        ledger.call(model="m", kind="replayed", cassette=used.stem)
        ledger.mark_run_complete(complete=complete, partial=[] if complete else ["-k given"],
                                 cache_dir=cache, started_at="2026-06-01T00:00:00+00:00")
        ledger.close()
    killed = Ledger(ledger_dir, run_id="killed", layer="e2e")  # never said it ended: no folder known
    killed.call(model="m", kind="replayed", cassette=used.stem)
    killed.close()
    sources = [ledger_dir / "ledger.jsonl", ledger_dir / "ledger.jsonl"]  # listed twice: read once
    assert sorted(read_runs(sources)) == ["cut", "done", "killed"]
    with pytest.raises(ConfigError, match="no such run against this directory"):
        prune_unused(cache, sources, run_id="nope")
    with pytest.raises(ConfigError, match=r"cannot vouch .*: -k given"):
        prune_unused(cache, sources, run_id="cut")
    with pytest.raises(ConfigError, match=r"cannot vouch .*no such run against this directory"):
        prune_unused(cache, sources, run_id="killed")
    result = prune_unused(cache, sources, run_id="done", apply=True)
    assert result.vouching == {"integration": "done"} and result.removed == [unused] and result.kept == 1
    assert not unused.exists() and used.exists()


def test_a_recording_time_that_is_no_time_is_unknown() -> None:
    from provisioner.lm.cassettes import _parse_time

    assert _parse_time("yesterday-ish") is None  # a hand-edited entry: never pruned by its age
    assert _parse_time("2026-01-01T00:00:00") is not None  # naive times are read as UTC


def test_cassettes_list_shows_the_recording_test_s_whole_node_id(tmp_path: Path) -> None:
    """The new user's trial: three cassettes of `test_on_worker[...]` all showed
    `tests/test_bridge.py::test_on_worker` (rich read the parametrize id as a style tag)."""
    ids = ["tests/test_bridge.py::test_on_worker[mock]", "tests/test_bridge.py::test_on_worker[a-b]",
           "tests/test_bridge.py::test_on_worker[0]", "tests/test_bridge.py::test_on_worker[:thumbs_up:]"]
    store = CassetteStore(tmp_path / "cass")
    for n, test_id in enumerate(ids):
        store.put({**_entry(f"question {n}"), "test_id": test_id})
    result = CliRunner().invoke(main, ["cassettes", "list", "--cache-dir", str(tmp_path / "cass")])
    assert result.exit_code == 0, result.output
    for test_id in ids:
        assert f" {test_id} " in result.output, result.output
