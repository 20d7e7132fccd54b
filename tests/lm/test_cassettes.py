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
