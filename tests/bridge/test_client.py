"""How the host names a session in what it shows the user (provisioner.bridge.client): the label the
caller gave it next to the id the worker knows, once, never inside another session's id."""

from __future__ import annotations

import pytest

from provisioner.bridge import LocalBridge, SessionClient
from provisioner.bridge.client import name_session_in, name_sessions, session_name
from provisioner.errors import BridgeError, WorkerLostError
from provisioner.lmconfig import LMConfig


def test_a_session_is_named_label_then_id_once() -> None:
    sid = "session_ab12_cd34"
    assert session_name(sid, "smoke") == "smoke (session_ab12_cd34)" and session_name(sid, None) == sid
    once = name_sessions(f"cleanup of {sid} done", {sid: "smoke"})
    assert once == "cleanup of smoke (session_ab12_cd34) done"
    assert name_sessions(once, {sid: "smoke"}) == once  # named already: not again
    assert name_sessions("session_other x", {sid: "smoke"}) == "session_other x"


def test_an_error_is_renamed_in_place_for_any_session_id_and_keeps_its_type() -> None:
    error = BridgeError("Program 'qa' not found in session 'my-test'; my-test-2 is another one",
                        "ProgramNotFound", 7, lm_usage={"mock": 1})
    name_session_in(error, "my-test", "tests/test_x.py::test_a")
    assert error.message == ("Program 'qa' not found in session 'tests/test_x.py::test_a (my-test)'; "
                             "my-test-2 is another one")
    assert str(error).startswith("ProgramNotFound: ")
    assert error.request_id == 7 and error.lm_usage == {"mock": 1}
    lost = WorkerLostError("no live worker for session 's-1': gone")
    name_session_in(lost, "s-1", None)  # no label: unchanged
    assert str(lost) == "no live worker for session 's-1': gone"
    name_session_in(lost, "s-1", "smoke")
    name_session_in(lost, "s-1", "smoke")  # twice: still once
    assert str(lost) == "no live worker for session 'smoke (s-1)': gone"


def test_a_session_client_s_errors_name_its_label() -> None:
    with LocalBridge(LMConfig(mode="mock")) as bridge:
        session = SessionClient(bridge, "s-9", label="smoke")
        assert repr(session) == "SessionClient(session_id='s-9', label='smoke')"
        assert session.name == "smoke (s-9)"
        with pytest.raises(BridgeError, match=r"session 'smoke \(s-9\)'") as info:
            session.get_program_info("nope")
        assert info.value.error_type == "ProgramNotFound"


def test_an_error_without_the_session_id_gets_its_name_appended_once() -> None:
    """A new user's trial: ``BridgeError: InvalidSignature: …`` and ``CostLimitExceeded: program 'qa'
    failed: …`` raised through the plugin's ``isolated`` named no session (the worker's message has
    no id), while the worker log section named ``tests/x.py::test_bad_sig (session_…)``."""
    sid = "session_ab12_cd34"
    label = "tests/x.py::test_bad_sig"
    for error, shown in (
        (BridgeError("bad signature 'question ->'", "InvalidSignature", 3),
         "InvalidSignature: bad signature 'question ->'"),
        (BridgeError("program 'qa' failed: the run's $0.01 limit is spent", "CostLimitExceeded"),
         "CostLimitExceeded: program 'qa' failed: the run's $0.01 limit is spent"),
        (WorkerLostError("the worker died (OOM-killed)"), "the worker died (OOM-killed)"),
    ):
        name_session_in(error, sid, label)
        name_session_in(error, sid, label)  # twice (the API and the session client): once
        assert str(error) == f"{shown} (session {label} ({sid}))"
        if isinstance(error, BridgeError):
            assert error.message.endswith(f" (session {label} ({sid}))") and error.request_id in (3, None)
    unlabelled = BridgeError("bad signature", "InvalidSignature")
    name_session_in(unlabelled, sid, None)
    assert str(unlabelled) == "InvalidSignature: bad signature"


def test_a_session_client_s_error_without_the_id_names_its_label() -> None:
    with LocalBridge(LMConfig(mode="mock")) as bridge:
        session = SessionClient(bridge, "s-9", label="smoke")
        with pytest.raises(BridgeError) as info:
            session.create_program("this is -> not -> a signature", "qa")
        assert "s-9" not in info.value.message.split(" (session ")[0]  # the worker's text has no id
        assert str(info.value).endswith(" (session smoke (s-9))"), str(info.value)
