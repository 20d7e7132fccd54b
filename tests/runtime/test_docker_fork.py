"""Against the real engine: a layer with isolation ``process`` — fork-mode worker containers, each test
on its own forked process (issue 12).

Proven here, inside a worker container: two tests on one worker see different processes and none of
each other's state; a child that crashes fails only its own session, with an error naming the
worker; after 1,000 connections the container's process table holds no zombie and no orphan.
Everything is removed by the environment's close, also when a test fails.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from provisioner.api import Environment, open_environment
from provisioner.bridge.client import BridgeClient
from provisioner.bridge.protocol import decode_reply, dumps, encode_frame, read_frame
from provisioner.errors import BridgeError, ProcessGoneError

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]
QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}
LAYER = """
[project]
name = "scratch"

[tool.provisioner.layers.proc]
description = "a forked process per test"
adapter = "bridge"
python = true
pooling_enabled = true
lm_mode = "mock"
isolation = "process"
workers = 1

[[tool.provisioner.lm.mock_rules]]
match = {question = "2+2"}
outputs = {answer = 4}

[[tool.provisioner.lm.mock_rules]]
match = {question = "slow"}
outputs = {answer = 7}
latency_ms = 3000
"""
# Reads the container's process table: (pid, ppid, state, command) of every process.
PROCESS_TABLE = """
import json, os
rows = []
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            stat = open(f"/proc/{name}/stat").read()
            cmd = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        rows.append([int(name), int(fields[1]), fields[0], cmd])
print(json.dumps(rows))
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Environment]:
    (tmp_path / "pyproject.toml").write_text(LAYER)
    environment = open_environment("proc", project_dir=tmp_path)
    try:
        yield environment
    finally:
        environment.close()


def _worker(env: Environment) -> tuple[Any, str, int]:
    """(container id, host, port) of the pool's one worker."""
    pool = env.pool
    info = pool.environment.workers[0]
    return info.container_id, info.host, info.port


def _control_token(env: Environment) -> str:
    run_env = env.containers._pool_env
    assert run_env is not None
    return run_env.plan.control_token


def _process_table(env: Environment, container_id: str) -> list[list[Any]]:
    import json

    code, output = env.containers.runtime.exec(container_id, ["python3", "-I", "-c", PROCESS_TABLE])
    assert code == 0, output
    rows: list[list[Any]] = json.loads(output)
    # Not the exec'd reader itself, nor the engine's `runc init` that sets an exec up (seen once as
    # an extra row with ppid 0 in the 1000-connection test's settled table).
    return [r for r in rows if "-c" not in r[3] and r[3] != "runc init"]


def _settled_table(env: Environment, container_id: str, parent_pid: int) -> list[list[Any]]:
    """The process table once the worker has no child left but its one spare, which waits for the
    next connection, and no zombie (or after 60 s: the caller asserts). A child that has just exited
    is a zombie until the parent's loop reaps it: on a busy machine the table can catch that moment
    (the spare before it already served, the next one not forked yet)."""
    deadline = time.monotonic() + 60
    while True:
        table = _process_table(env, container_id)
        children = [r for r in table if r[1] == parent_pid]
        settled = len(children) <= 1 and not [r for r in table if r[2] == "Z"]
        if settled or time.monotonic() > deadline:
            return table
        time.sleep(0.2)


def test_two_tests_on_one_worker_share_no_process_state(env: Environment) -> None:
    container_id, host, port = _worker(env)
    token = _control_token(env)
    with env.session("test1") as test1:
        process1 = test1.adapter.bridge.process
        # Test 1 changes the worker-default LM (no session: needs the run's token) and fills the
        # `anonymous` session.
        with BridgeClient(host, port, token=token) as same_worker:
            same_worker.configure_lm(mock_rules=[{"match": {"question": "2+2"}, "outputs": {"answer": 5}}])
            same_worker.create_program(QA_INT, "qa")
            assert same_worker.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 5}
            process1_default = same_worker.process
        test1.adapter.create_program(QA_INT, "qa")
        assert test1.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
    with env.session("test2") as test2:
        process2 = test2.adapter.bridge.process
        assert process2["pid"] not in (process1["pid"], process1_default["pid"])
        assert process2["parent_pid"] == process1["parent_pid"] == process1_default["parent_pid"]
        assert process2["worker_id"] == process1["worker_id"]
        assert test2.adapter.list_programs()["programs"] == []
        with BridgeClient(host, port, token=token) as same_worker:
            assert same_worker.list_programs()["programs"] == []  # the `anonymous` session is empty
            stats = same_worker.get_stats()
            assert stats["program_count"] == 0 and stats["parent_pid"] == process2["parent_pid"]
            assert stats["lm"]["mock_rules"][0]["outputs"] == {"answer": 4}  # the start-up default LM
    # An Erlang-style client (raw frames, `packet: 4`, no hello) gets a fresh process per connection.
    raw_pids = []
    for _ in range(2):
        with socket.create_connection((host, port), timeout=30) as sock, sock.makefile("rb") as reader:
            sock.sendall(encode_frame(dumps({"id": 1, "command": "ping", "args": {}})))
            payload = read_frame(reader)
            assert payload is not None
            result = decode_reply(payload).unwrap()
            assert result["process"]["parent_pid"] == process1["parent_pid"]
            raw_pids.append(result["pid"])
    assert raw_pids[0] != raw_pids[1]
    # The worker's process table: the parent only, again (every child ends with its connection and
    # is reaped; the ending is asynchronous, so poll).
    table = _settled_table(env, container_id, process1["parent_pid"])
    assert not [r for r in table if r[2] == "Z"], table
    assert len([r for r in table if r[1] == process1["parent_pid"]]) == 1, table  # the spare


def test_a_test_sets_its_process_default_lm_without_the_token(env: Environment) -> None:
    """What a test under pytest can do (its adapter has no control token): set the default LM of its
    own process from its own connection; the next test's process has the layer's LM again; the
    worker (other processes, the parent) stays out of its reach."""
    with env.session("test1") as test1:
        five = [{"match": {"question": "2+2"}, "outputs": {"answer": 5}}]
        test1.adapter.bridge.configure_lm(mock_rules=five)
        test1.adapter.create_program(QA_INT, "qa")
        assert test1.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 5}
        with pytest.raises(BridgeError, match="reset_state acts on the whole fork-mode worker"):
            test1.adapter.bridge.reset_state()
    with env.session("test2") as test2:
        assert test2.adapter.bridge.get_stats()["lm"]["mock_rules"][0]["outputs"] == {"answer": 4}
        test2.adapter.create_program(QA_INT, "qa")
        assert test2.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}


def test_a_crashed_process_fails_only_its_own_session(env: Environment) -> None:
    container_id, _, _ = _worker(env)
    with env.session("victim") as victim, env.session("bystander") as bystander:
        victim.adapter.create_program(QA_INT, "qa")
        bystander.adapter.create_program(QA_INT, "qa")
        pid = victim.adapter.bridge.process["pid"]
        errors: list[BaseException] = []

        def slow() -> None:
            try:
                victim.adapter.execute_program("qa", {"question": "slow"})
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        try:
            # A segfault of that process alone (same uid as the worker: no root needed).
            code, output = env.containers.runtime.exec(
                container_id, ["python3", "-I", "-c", f"import os, signal; os.kill({pid}, signal.SIGSEGV)"])
            assert code == 0, output
        finally:
            thread.join(60)
        assert len(errors) == 1 and isinstance(errors[0], ProcessGoneError), errors
        assert victim.adapter.bridge.process["worker_id"] in str(errors[0])
        assert f"process {pid}" in str(errors[0]) and "ended by signal SIGSEGV" in str(errors[0]), errors[0]
        assert bystander.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
    with env.session("after") as after:
        assert after.adapter.ping()["status"] == "ok"
        stats = after.adapter.bridge.get_stats()
        assert stats["fork"]["crashed_total"] >= 1


@pytest.mark.slow
def test_no_zombies_or_orphans_in_the_container_after_1000_connections(env: Environment) -> None:
    container_id, host, port = _worker(env)
    before = _process_table(env, container_id)
    parents: set[int] = set()

    busy: list[str] = []

    def connect(i: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                with BridgeClient(host, port) as client:
                    if i % 20 == 0:
                        client.create_program(QA_INT, "qa")
                        client.execute_program("qa", {"question": "2+2"})
                    parents.add(client.ping()["process"]["parent_pid"])
                    return
            except BridgeError as exc:  # processes of earlier connections still ending: try again
                if exc.error_type != "TooManyConnections" or time.monotonic() > deadline:
                    raise
                busy.append(exc.message)
                time.sleep(0.05)

    # Four clients at a time: forks and reaps overlap, as under a parallel suite.
    with ThreadPoolExecutor(4) as clients:
        list(clients.map(connect, range(1000)))
    assert len(parents) == 1
    assert all("busy" in message for message in busy)
    parent_pid = parents.pop()
    deadline_rows = _settled_table(env, container_id, parent_pid)
    assert not [r for r in deadline_rows if r[2] == "Z"], deadline_rows  # no zombie
    # Every child ended but the one spare waiting for the next connection.
    assert len([r for r in deadline_rows if r[1] == parent_pid]) == 1, deadline_rows
    # No orphan: the same processes as before the connections (init, the worker, its spare), and
    # every one of them is init's or the worker's.
    assert len(deadline_rows) == len(before), (before, deadline_rows)
    assert {r[1] for r in deadline_rows} <= {0, 1, parent_pid, *(r[0] for r in deadline_rows)}
    with BridgeClient(host, port, fork=True) as client:
        fork = client.get_stats()["fork"]
    assert fork["crashed_total"] == 0 and fork["accepted_total"] >= 1001


def test_a_process_pool_starts_two_workers_and_a_sequential_suite_alternates(tmp_path: Path) -> None:
    """A serial suite on a `process` layer: two fork-mode workers start together (not one, not all
    of `workers`); the first test runs on whichever is ready first while the other finishes its
    start-up and then joins (Deployment's ready_slots, WorkerPool.grow), and from then on tests
    alternate between them, so each connects to a worker whose next process had the previous
    test's time to warm up (runtime/workers.py PROCESS_POOL_START, WorkerPool's least_recently_used)."""
    (tmp_path / "pyproject.toml").write_text(LAYER.replace("workers = 1", "workers = 3"))
    environment = open_environment("proc", project_dir=tmp_path)
    try:
        with environment.session("first") as first:
            assert first.adapter.ping()["status"] == "ok"
        pool = environment.pool
        # Both containers were started with the pool: the second only needs its start-up to end.
        started = sorted(n.rsplit("-", 1)[1] for n in pool.environment.container_ids if "-w" in n)  # type: ignore[attr-defined]
        assert started == ["w0", "w1"], started
        assert pool.wait_replacements(180), pool.stats()
        parents = []
        for i in range(6):
            with environment.session(f"t{i}") as test:
                parents.append(test.adapter.bridge.process["worker_id"])
                test.adapter.create_program(QA_INT, "qa")
                assert test.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
        assert len(pool.environment.workers) == 2, pool.stats()
        assert pool.environment.pending_slots() == [2]  # type: ignore[attr-defined]
        assert pool.added <= 1  # the second joined when ready (0: it was ready as soon as the first)
        assert environment.containers.workers_started == 2  # both, whenever the second joined
        assert len(set(parents)) == 2 and all(a != b for a, b in itertools.pairwise(parents)), parents
    finally:
        environment.close()


def test_a_process_session_is_never_pinned_to_a_dead_worker(tmp_path: Path) -> None:
    """The pool asks the engine nothing when it pins a `process` session (the new connection is the
    check): a worker killed between two tests costs the next test nothing — its connection fails,
    the engine confirms the death, the worker is replaced and the test runs on a live one."""
    (tmp_path / "pyproject.toml").write_text(LAYER.replace("workers = 1", "workers = 2"))
    environment = open_environment("proc", project_dir=tmp_path)
    try:
        with environment.session("first") as first:
            used = first.adapter.bridge.process["worker_id"]
        pool = environment.pool
        assert pool.wait_replacements(180), pool.stats()  # the second worker joined
        checks = pool.engine_checks
        [victim] = [w for w in pool.environment.workers if w.name != used]  # the next one's pick
        runtime = environment.containers.runtime
        runtime.client.api.kill(victim.container_id)
        runtime.client.api.wait(victim.container_id, timeout=60)  # kill returns before it stopped
        for i in range(3):
            with environment.session(f"after-{i}") as test:
                test.adapter.create_program(QA_INT, "qa")
                assert test.adapter.execute_program("qa", {"question": "2+2"})["outputs"] == {"answer": 4}
        assert pool.engine_checks == checks  # pinning asked the engine nothing
        assert pool.wait_replacements(120)
        assert pool.stats()["replaced"] >= 1, pool.stats()
    finally:
        environment.close()
