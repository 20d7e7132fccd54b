"""Fork mode (`provision worker --fork`): a fresh process per connection, on a real host subprocess.

What is proven here: every connection (BridgeClient or raw frames, as Erlang's gen_tcp sends them)
gets its own process whose parent is the worker; no state crosses between them (the worker-default
LM, programs in the `anonymous` session); a child that crashes fails only its own connection with an
error naming the worker; live children are bounded with a "busy" reply; shutdown / reset_state /
SIGTERM act on the worker; children die with the parent; every child is reaped; the parent refuses
to fork when it is not single-threaded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from provisioner.bridge import BridgeClient
from provisioner.bridge.forking import child_limit, require_single_threaded
from provisioner.bridge.protocol import CONTROL_TOKEN_ENV
from provisioner.errors import BridgeConnectionError, BridgeError, ForkUnsafeError, ProcessGoneError

from .conftest import clean_env, wait_until, worker_command

TOKEN = "fork-mode-control-token-0b7e1f"
QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}
FORK_ENV = {CONTROL_TOKEN_ENV: TOKEN, "PROVISION_WORKER__MAX_INFLIGHT": "2"}


@pytest.fixture(scope="module")
def worker(spawn_module_worker: Any) -> Any:
    # gated: the "slow" rule's latency waits for worker.release() (or the process's death), not 1.5 s
    return spawn_module_worker("--fork", env=FORK_ENV, gated=True)


def gone(pid: int) -> bool:
    """The process has ended and been reaped (a zombie still counts as there)."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def forked_from(worker: Any) -> list[psutil.Process]:
    """Every process running the worker's command line except the worker itself: its children,
    zombies, or orphans re-parented elsewhere."""
    cmdline = psutil.Process(worker.proc.pid).cmdline()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["cmdline"] == cmdline and proc.info["pid"] != worker.proc.pid:
            found.append(proc)
    return found


def live_children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def ended_every_process_itself(worker: Any) -> None:
    """Every process ended on the parent's SIGTERM: the parent did not wait out its stop grace
    (request timeout + 5 s) and kill one (a lost SIGTERM made that a random ≈ 35 s stop)."""
    log = worker.stderr_bytes().decode(errors="replace")
    assert "still busy at shutdown" not in log, log


def test_every_connection_is_a_fresh_process_forked_from_the_worker(worker: Any) -> None:
    with worker.client() as one, worker.client() as two:
        first, second = one.ping(), two.ping()
        assert first["pid"] != second["pid"]
        for reply in (first, second):
            assert reply["process"] == {"mode": "fork", "pid": reply["pid"], "parent_pid": worker.proc.pid}
            assert psutil.Process(reply["pid"]).ppid() == worker.proc.pid
        stats = one.get_stats()
        assert stats["pid"] == first["pid"] and stats["parent_pid"] == worker.proc.pid
        assert stats["fork"]["serving"] == 2 and stats["fork"]["max_processes"] >= 3
        # The next connection's process is forked once the last one answered, ahead of the next
        # connection: the fork is off its path (on a busy machine the parent may not have run yet).
        wait_until(lambda: one.get_stats()["fork"]["spare"] == 1, 30, "the next spare to be forked")
        assert stats["lm_configured"] is True and stats["max_connections"] == 1
    # Closing the connection ends its process, and the parent reaps it.
    wait_until(lambda: gone(first["pid"]) and gone(second["pid"]), 30, "both processes to end")


def test_no_state_crosses_between_two_connections(worker: Any) -> None:
    """Test 1 changes the worker-default LM (no session) and creates programs in `anonymous`; test 2,
    on the same worker, sees neither."""
    with worker.client(token=TOKEN) as test1:
        test1.configure_lm(mock_rules=[{"match": {"question": "2+2"}, "outputs": {"answer": 5}}])
        test1.create_program(QA_INT, "qa")
        assert test1.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 5}
        assert test1.get_stats()["lm"]["mock_rules"][0]["outputs"] == {"answer": 5}
        pid1 = test1.process["pid"] if test1.process else None
        started1 = test1.get_stats()["started_at"]
    with worker.client(token=TOKEN) as test2:
        assert test2.process is not None and test2.process["pid"] != pid1
        assert test2.list_programs()["programs"] == []
        assert test2.list_programs(all_sessions=True)["total_count"] == 0
        stats = test2.get_stats()
        assert stats["program_count"] == 0 and stats["session_count"] == 0
        # Its service came from the parent by fork(), its clock did not: test 2's process started
        # after test 1's first reply (the next spare is forked then).
        assert stats["started_at"] > started1
        assert [r["outputs"] for r in stats["lm"]["mock_rules"]] == [{"answer": 4}, {"answer": "Paris"},
                                                                    {"answer": 7}, {"answer": 8}]
        test2.create_program(QA_INT, "qa")  # the same id: no clash, the first one is gone
        assert test2.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}


def test_a_process_sets_its_own_default_lm_without_the_token(worker: Any) -> None:
    """A test on its own process (isolation `process`: no control token under pytest) changes the
    worker-default LM of that process from its own connection; what reaches beyond the process
    (reset_state, shutdown) stays gated; the next connection's process has the start-up LM again."""
    with worker.client(fork=True) as test1:
        assert test1.hello()["capabilities"] == ["session", "process"]
        configured = test1.configure_lm(mock_rules=[{"match": {"question": "2+2"}, "outputs": {"answer": 5}}])
        assert configured["session_id"] is None
        session = test1.session("t1")  # a session without an LM of its own uses the process's default
        session.create_program(QA_INT, "qa")
        assert session.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 5}
        stats = test1.get_stats()
        assert stats["scope"] == "process" and stats["lm"]["mock_rules"][0]["outputs"] == {"answer": 5}
        assert list(stats["sessions"]) == ["t1"]
        assert test1.list_programs(all_sessions=True)["total_count"] == 1
        for call, what in ((test1.reset_state, "reset_state"), (test1.shutdown, "shutdown")):
            error = error_of(call)
            assert error.error_type == "Unauthorized" and what in error.message
            assert "acts on the whole fork-mode worker" in error.message
        pid1 = test1.process["pid"] if test1.process else None
    assert worker.proc.poll() is None
    with worker.client(fork=True) as test2:
        assert test2.process is not None and test2.process["pid"] != pid1
        stats = test2.get_stats()
        assert stats["lm"]["mock_rules"][0]["outputs"] == {"answer": 4} and stats["sessions"] == {}
        session = test2.session("t2")
        session.create_program(QA_INT, "qa")
        assert session.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}


def error_of(call: Any) -> BridgeError:
    with pytest.raises(BridgeError) as info:
        call()
    return info.value


# docs/protocol.md, "Fork mode", "What a child reports"
FORK_STATS = {"serving", "spare", "max_processes", "forks_total", "accepted_total", "refused_busy",
              "crashed_total", "exited_total", "ended"}


def test_a_connection_s_first_get_stats_counts_its_process_as_serving_not_spare(worker: Any) -> None:
    """The parent learns that a spare serves only after its first reply: a connection whose first
    request is get_stats must still count its own process as serving (a new user's trial saw it
    counted as the spare), under the field names docs/protocol.md gives."""
    with worker.raw() as raw:
        raw.send({"id": 1, "command": "get_stats", "args": {}})
        fork = raw.receive()["result"]["fork"]
        assert set(fork) == FORK_STATS
        # Its own process serves (the old count had it as the spare: serving 0, spare 1). A spare
        # may be there too: the next one is forked 50 ms after an accept without a request yet.
        assert fork["serving"] >= 1 and fork["spare"] in (0, 1), fork
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    listed = re.search(r"`fork: \{([^}]*)\}`", " ".join(doc.split()))
    assert isinstance(fork["ended"], list)
    assert listed is not None and {f.strip() for f in listed.group(1).split(",")} == FORK_STATS


def test_a_raw_socket_client_gets_a_fresh_process(worker: Any) -> None:
    """What an Erlang `gen_tcp` client with `packet: 4` does: frames, no client library, no hello."""
    pids = []
    for _ in range(2):
        with worker.raw() as raw:
            create = {"signature": QA_INT, "program_id": "qa"}
            raw.send({"id": 1, "command": "create_program", "args": create})
            assert raw.receive()["success"] is True
            raw.send({"id": 2, "command": "ping", "args": {}})
            reply = raw.receive()
            assert reply["id"] == 2 and reply["result"]["process"]["parent_pid"] == worker.proc.pid
            pids.append(reply["result"]["pid"])
    assert pids[0] != pids[1]


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["segfault", "oom-kill"])
def test_a_crashed_process_fails_only_its_own_connection(worker: Any, sig: signal.Signals) -> None:
    with worker.client(fork=True) as victim, worker.client(fork=True) as bystander:
        bystander.create_program(QA_INT, "qa")
        victim.create_program(QA_INT, "qa")
        assert victim.process is not None
        victim_pid = victim.process["pid"]
        crashed_before = bystander.get_stats()["fork"]["crashed_total"]
        errors: list[BaseException] = []

        def run_slow() -> None:
            try:
                victim.execute_program("qa", {"question": "slow"})
            except BaseException as exc:
                errors.append(exc)

        slow = threading.Thread(target=run_slow)
        slow.start()
        # Idle, a process runs one thread; an execution adds the deadline watch and a pool thread.
        # Its LM call is held at the gate: still running when the signal comes, however loaded the host.
        wait_until(lambda: psutil.Process(victim_pid).num_threads() >= 3, 30, "the slow execution to start")
        os.kill(victim_pid, sig)  # a segfault, or the OOM killer's SIGKILL
        slow.join(30)
        assert len(errors) == 1 and isinstance(errors[0], ProcessGoneError)
        message = str(errors[0])
        assert worker_id_of(bystander) in message and f"process {victim_pid}" in message
        assert "does not reconnect" in message and f"ended by signal {sig.name} " in message, message
        with pytest.raises(ProcessGoneError):  # and it stays gone: no silent fresh process
            victim.ping()
        assert bystander.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
        wait_until(lambda: bystander.get_stats()["fork"]["crashed_total"] == crashed_before + 1, 30,
                   "the parent to reap the crashed process")
        assert gone(victim_pid)
    assert b"ended by signal " + sig.name.encode() in worker.stderr_bytes()


def test_a_process_killed_while_its_client_is_idle_is_named_as_ended(worker: Any) -> None:
    """A new user's trial: SIGKILL a test's process between two requests. The error starts with what
    happened (not "ConnectionError:"), names the process, its parent and the worker, says where its
    exit signal is (the worker's log, which has it) and what to do."""
    with worker.client(fork=True) as client:
        assert client.process is not None
        pid, parent = client.process["pid"], client.process["parent_pid"]
        worker_id = worker_id_of(client)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 30, "the process to be reaped")
        with pytest.raises(ProcessGoneError) as info:
            client.ping()
    message = str(info.value)
    assert message.startswith(f"process {pid} (forked from {parent}) of fork-mode worker {worker_id} at ")
    # How it ended: the client asked the worker (a new connection's get_stats, fork.ended).
    assert "ended by signal SIGKILL while this client was idle" in message, message
    assert "closed the connection while idle" not in message and "open a new BridgeClient" in message
    assert info.value.error_type == "ConnectionError" and isinstance(info.value, BridgeConnectionError)
    # The parent logs the line after it reaped the process: poll for it.
    ended = re.compile(rf"process {pid} serving .* ended by signal SIGKILL".encode())
    wait_until(lambda: ended.search(worker.stderr_bytes()) is not None, 30, "the parent's log line")


def worker_id_of(client: BridgeClient) -> str:
    return str(client.ping()["worker_id"])


def test_a_client_that_did_not_know_never_continues_on_a_fresh_process(worker: Any) -> None:
    with worker.client() as client:  # fork=None: learns it on reconnecting
        client.create_program(QA_INT, "qa")
        pid = client.ping()["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 30, "the process to be reaped")
        with pytest.raises(BridgeConnectionError) as first:
            client.execute_program("qa", {"question": "2+2"})
        # Whichever request noticed first, the client ends up refusing with ProcessGoneError.
        if not isinstance(first.value, ProcessGoneError):
            with pytest.raises(ProcessGoneError, match="fresh process"):
                client.execute_program("qa", {"question": "2+2"})
        with pytest.raises(ProcessGoneError, match="open a new BridgeClient"):
            client.ping()


def test_past_the_limit_a_connection_gets_a_busy_reply(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork", env={"PROVISION_WORKER__MAX_CONNECTIONS": "2"})
    with worker.client() as one, worker.client() as two:
        pids = [one.ping()["pid"], two.ping()["pid"]]
        with worker.raw() as third:
            reply = third.receive()
            assert reply["id"] is None and reply["error_type"] == "TooManyConnections"
            assert "busy" in reply["error"] and "at most 2 processes" in reply["error"]
            assert third.at_eof()
        assert one.get_stats()["fork"]["refused_busy"] == 1
    # Once a process ends, a new connection gets one again (a spare is forked for it).
    wait_until(lambda: all(gone(pid) for pid in pids), 30, "the processes to end and be reaped")
    with worker.client() as again:
        assert again.ping()["status"] == "ok"


def test_shutdown_from_one_process_stops_the_worker_and_every_process(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork", env={CONTROL_TOKEN_ENV: TOKEN})
    with worker.client() as other, worker.client(token=TOKEN) as controller:
        other_pid = other.ping()["pid"]
        with worker.client() as no_token, pytest.raises(BridgeError, match="control token"):
            no_token.shutdown()
        assert controller.shutdown()["status"] == "shutting_down"
        assert worker.wait_exit(60) == 0
    assert gone(other_pid)
    ended_every_process_itself(worker)


def test_reset_state_ends_every_other_process(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork", env={CONTROL_TOKEN_ENV: TOKEN})
    with worker.client(fork=True) as other, worker.client(token=TOKEN) as controller:
        other.create_program(QA_INT, "qa")
        controller.create_program(QA_INT, "mine")
        assert other.process is not None
        other_pid = other.process["pid"]
        assert controller.reset_state()["programs_removed"] == 1
        assert controller.list_programs()["programs"] == []
        wait_until(lambda: gone(other_pid), 30, "the other process to end")
        with pytest.raises(ProcessGoneError):
            other.list_programs()
        assert controller.ping()["status"] == "ok"  # the caller's own process carries on, reset


def test_sigterm_ends_every_process_and_the_worker(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork")
    with worker.client() as idle:
        pid = idle.ping()["pid"]
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.wait_exit(60) == 0
        assert gone(pid)
    ended_every_process_itself(worker)


def test_processes_die_with_a_killed_parent(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork")
    with worker.client() as one, worker.client() as two:
        pids = [one.ping()["pid"], two.ping()["pid"]]
        worker.proc.kill()  # SIGKILL: no chance to end them itself
        worker.wait_exit(30)
        wait_until(lambda: all(gone(p) for p in pids), 30, "PR_SET_PDEATHSIG to end the processes")


def test_a_process_stray_subprocesses_are_killed_with_it(spawn_worker: Any) -> None:
    """A child leads its own process group; the parent kills the group when the child ends."""
    worker = spawn_worker("--fork")
    with worker.client() as client:
        pid = client.ping()["pid"]
        # Stand in for a program's subprocess: a process in the child's group (its pgid).
        stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 process_group=pid)
    try:
        wait_until(lambda: gone(pid), 30, "the process to end")
        assert stray.wait(30) == -signal.SIGKILL
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait(10)


def test_the_worker_refuses_to_fork_when_its_parent_runs_threads(tmp_path: Path) -> None:
    """A thread started at import time (here by a sitecustomize) makes the worker refuse to start."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import threading\n"
        "threading.Thread(target=threading.Event().wait, name='import-time-thread', daemon=True).start()\n"
    )
    env = clean_env(PYTHONPATH=str(site))
    done = subprocess.run(worker_command("--fork"), env=env, cwd=tmp_path, capture_output=True, timeout=180,
                          check=False)
    assert done.returncode != 0
    err = done.stderr.decode()
    assert "ForkUnsafeError" in err or "must run exactly one" in err
    assert "import-time-thread" in err and "without --fork" in err


def test_require_single_threaded_names_the_threads() -> None:
    stop = threading.Event()
    intruder = threading.Thread(target=stop.wait, name="intruder")
    intruder.start()
    try:
        with pytest.raises(ForkUnsafeError, match="intruder"):
            require_single_threaded("test")
    finally:
        stop.set()
        intruder.join()


def test_fork_and_stdio_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(worker_command("--fork", "--stdio"), env=clean_env(), cwd=tmp_path,
                          capture_output=True, timeout=180, check=False)
    assert done.returncode != 0 and b"--fork" in done.stderr and b"--stdio" in done.stderr


def test_child_limit_fits_every_process_threads_below_the_pids_limit() -> None:
    assert child_limit(256, 8, None) == 256
    limit = child_limit(256, 8, 256)
    assert limit == (256 - 16) // (8 + 6)
    assert limit * (8 + 6) + 16 <= 256
    assert child_limit(5, 8, 10_000) == 5
    assert child_limit(256, 8, 10) == 1  # never zero: a worker serves at least one connection


@pytest.mark.slow
def test_no_zombies_or_orphans_after_1000_connections(spawn_worker: Any) -> None:
    worker = spawn_worker("--fork")
    for i in range(1000):
        with BridgeClient("127.0.0.1", worker.port) as client:
            if i % 10 == 0:
                client.create_program(QA_INT, "qa")
                client.execute_program("qa", {"question": "2+2"})
            assert client.ping()["process"]["parent_pid"] == worker.proc.pid
    # Every process ended and was reaped but the one spare waiting for the next connection (waited
    # for exactly that: "at most one" passed at 0, between the last exit and the spare's fork).
    wait_until(lambda: len(live_children(worker.proc.pid)) == 1 and len(forked_from(worker)) == 1, 60,
               "every process to end but the next spare")
    # Nothing of ours is left anywhere: no zombie child, no orphan re-parented elsewhere.
    left = forked_from(worker)
    assert len(left) == 1 and left[0].ppid() == worker.proc.pid, left
    assert left[0].status() != psutil.STATUS_ZOMBIE
    with worker.client() as client:
        # The next spare is forked after this connection's first reply (bfe8e81), and the counters
        # (children = live processes serving a connection: this one) are written when it is.
        wait_until(lambda: client.get_stats()["fork"]["forks_total"] == 1002, 60, "the next spare")
        fork = client.get_stats()["fork"]
    assert fork["accepted_total"] == 1001 and fork["forks_total"] == 1002 and fork["serving"] == 1
    assert fork["crashed_total"] == 0 and fork["exited_total"] == 1000


def test_the_worker_is_ready_only_once_a_process_waits_for_the_first_connection(spawn_worker: Any) -> None:
    """The ready file appears after the first spare built its service and LM: the connection that
    follows (the host's readiness ping) is served by that process, not one forked for it."""
    worker = spawn_worker("--fork")
    waiting = [p.pid for p in live_children(worker.proc.pid)]
    assert len(waiting) == 1
    with worker.client() as client:
        assert client.ping()["pid"] == waiting[0]


def test_a_waiting_process_starts_its_execution_threads_before_its_connection(spawn_worker: Any) -> None:
    """The spare starts its execution thread and deadline watch while it waits (after its warm-up):
    a test's first execute_program starts no thread on the connection's path."""
    worker = spawn_worker("--fork")
    [spare] = live_children(worker.proc.pid)
    wait_until(lambda: spare.num_threads() == 3, 60, "the waiting process to start its 2 threads")
    with worker.client() as client:
        client.create_program(QA_INT, "qa")
        assert client.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
        assert client.ping()["pid"] == spare.pid
        assert spare.num_threads() == 3  # main, bridge-exec, bridge-deadlines: none started since


def test_out_of_file_descriptors_the_parent_refuses_and_recovers(spawn_worker: Any) -> None:
    """Issue 14 item 7 in the fork-mode parent: at its process limit it accepts to refuse; with
    accept() failing with EMFILE its refusal loop spun forever. Now each queued connection gets a
    TooManyConnections reply naming the limit and the parent keeps reaping and forking."""
    worker = spawn_worker("--fork", env={"PROVISION_WORKER__MAX_CONNECTIONS": "1"})
    parent = psutil.Process(worker.proc.pid)
    old = parent.rlimit(psutil.RLIMIT_NOFILE)
    with worker.client() as holder:
        holder_pid = holder.ping()["pid"]  # the only process: the parent answers the next ones itself
        wait_until(lambda: not live_children(worker.proc.pid)[1:], 30, "no spare (at the limit)")
        parent.rlimit(psutil.RLIMIT_NOFILE, (parent.num_fds(), old[1]))
        try:
            for _ in range(3):
                with worker.raw() as refused:
                    reply = refused.receive()
                    assert reply["error_type"] == "TooManyConnections"
                    assert "out of file descriptors" in reply["error"]
                    assert refused.at_eof()
        finally:
            parent.rlimit(psutil.RLIMIT_NOFILE, old)
        assert holder.get_stats()["fork"]["refused_busy"] >= 3
    wait_until(lambda: gone(holder_pid), 30, "the process to end and be reaped")
    with worker.client() as again:
        assert again.ping()["status"] == "ok"



# Fork-mode parents with a trivial child (no DSPy), forked from this one pre-imported script so a
# round costs milliseconds: each child answers one byte and releases the spare (its parent forks the
# next one at once, as after a real first reply), then serves until EOF. The script stops each
# parent right then (SIGTERM), which used to race the new spare's fork, and prints one JSON line per
# round: the parent's exit code and how long it took to stop.
LIGHT_PARENTS = """
import json, os, signal, socket, sys, time
from provisioner.bridge.forking import ForkingWorker

def make_child(parent):
    def serve(sock, peer):
        sock.recv(1)
        sock.sendall(b"x")
        parent.release_spare()
        while sock.recv(1):
            pass
        return 0
    return serve

rounds, grace = int(sys.argv[1]), float(sys.argv[2])
for _ in range(rounds):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        worker = ForkingWorker(make_child, max_children=8, worker_id="light", stop_timeout_s=grace)
        port = worker.listen("127.0.0.1", 0)
        worker.serve_forever(on_ready=lambda: os.write(ready_w, b"%d\\n" % port))
        os._exit(0)
    os.close(ready_w)
    port = int(os.read(ready_r, 64))
    os.close(ready_r)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"p")
        assert sock.recv(1) == b"x"
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status),
                          "stop_ms": (time.monotonic() - started) * 1000}), flush=True)
"""


def test_a_stop_signal_during_a_spare_s_fork_still_ends_it() -> None:
    """A SIGTERM reaching a child between ``fork()`` and the child resetting its handlers ran the
    parent's handler there and was lost; the parent then waited out its stop grace for a spare that
    never ended (the random ≈ 30 s stops of this file). Now the stop signals are blocked across the
    fork: every stop here ends every child without the parent having to kill one (its "still busy
    at shutdown; killing it" warning)."""
    grace_s = 20.0
    done = subprocess.run([sys.executable, "-c", LIGHT_PARENTS, "60", str(grace_s)], env=clean_env(),
                          capture_output=True, text=True, timeout=60 * (grace_s + 10), check=False)
    assert done.returncode == 0, done.stderr
    assert "still busy at shutdown" not in done.stderr, done.stderr
    rounds = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rounds) == 60 and all(r["exit"] == 0 for r in rounds), rounds
    stops = sorted(r["stop_ms"] for r in rounds)
    print(f"stop after SIGTERM, ms: p50 {stops[len(stops) // 2]:.0f}, max {stops[-1]:.0f}"
          f" (load {os.getloadavg()[0]:.1f})")


# A fork-mode parent whose child fails with an exception while serving its connection (a trivial
# child, as LIGHT_PARENTS): the first connection's byte "!" makes it raise.
FAILING_CHILD = """
import logging, os, signal, socket, sys
from provisioner.bridge.forking import ForkingWorker
logging.basicConfig(level=logging.INFO, stream=sys.stderr)

def make_child(parent):
    def serve(sock, peer):
        if sock.recv(1) == b"!":
            raise RuntimeError("the program crashed the child")
        sock.sendall(b"x")
        parent.release_spare()
        while sock.recv(1):
            pass
        return 0
    return serve

ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(ready_r)
    worker = ForkingWorker(make_child, max_children=8, worker_id="failing", stop_timeout_s=20)
    port = worker.listen("127.0.0.1", 0)
    worker.serve_forever(on_ready=lambda: os.write(ready_w, b"%d\\n" % port))
    os._exit(0)
os.close(ready_w)
port = int(os.read(ready_r, 64))
with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
    sock.sendall(b"!")
    print("crashed:", sock.recv(1), flush=True)   # EOF: the child failed and exited
with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
    sock.sendall(b"p")
    print("next:", sock.recv(1), flush=True)
os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
print("parent exit:", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_child_that_raises_while_serving_exits_70_and_logs_it_and_the_next_connection_is_served() -> None:
    """An exception escaping a child's serving code (``_run_child``'s last resort) never returns into
    the copy of the parent's loop: the child logs it with its traceback and exits 70, its peer sees
    the connection close, the parent names the exit code, and the next connection gets a new child."""
    done = subprocess.run([sys.executable, "-c", FAILING_CHILD], env=clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["crashed: b''", "next: b'x'", "parent exit: 0"], done.stdout
    assert re.search(r"worker failing: process (\d+) failed\nTraceback", done.stderr), done.stderr
    assert "RuntimeError: the program crashed the child" in done.stderr
    failed = re.search(r"process (\d+) failed", done.stderr)
    assert failed and f"process {failed[1]} serving" in done.stderr and "ended by exit code 70" in done.stderr

