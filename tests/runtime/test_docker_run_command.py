"""`provision run -- CMD` heals its run while CMD runs: a killed worker and a killed relay (the
published path) are replaced/re-created behind the same addresses, and stderr says why. Real engine,
through the CLI, with a command that keeps talking to the bridge as a test suite would."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from provisioner.runtime import labels as L
from provisioner.runtime.engine import DockerRuntime, remove_by_selector
from provisioner.runtime.polling import poll_until

from .._helpers import scratch_env
from .conftest import leftovers

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

# The command under `provision run`: pings every worker through PROVISION_BRIDGE_ADDRS until all
# answer, says so (ready), then — once the test has broken the run (the `broken` file) — pings until
# every address answers again and a program runs on each, and exits 0; 1 at its deadline.
POLLER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from provisioner.bridge.client import BridgeClient

    here = Path(sys.argv[1])
    addresses = os.environ["PROVISION_BRIDGE_ADDRS"].split(",")

    def answers(address, run):
        host, port = address.rsplit(":", 1)
        try:
            with BridgeClient(host, int(port), request_timeout=10) as client:
                if not run:
                    return client.ping().get("status") == "ok"
                session = client.session(f"after-{port}")
                session.create_program("question -> answer", "p")
                return "answer" in session.execute_program("p", {"question": "q"})["outputs"]
        except Exception as exc:
            print(f"poller: {address}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return False

    deadline = time.monotonic() + 300
    while not all(answers(a, False) for a in addresses):
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.2)  # poll interval
    (here / "ready").write_text(os.environ["PROVISION_RUN_ID"])
    while not (here / "broken").exists():
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)  # poll interval
    pending = list(addresses)
    while pending:
        pending = [a for a in pending if not answers(a, True)]
        if pending and time.monotonic() > deadline:
            print(f"poller: never answered again: {pending}", file=sys.stderr, flush=True)
            sys.exit(1)
        time.sleep(0.2)  # poll interval
    (here / "healed").write_text("ok")
''')


def test_provision_run_replaces_a_killed_worker_and_recreates_a_killed_relay_while_cmd_runs(
    docker_engine: Any, worker_image: str, tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'runheal'\n")
    (tmp_path / "poller.py").write_text(POLLER)
    env = scratch_env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "provisioner.cli", "run", "--layer", "integration", "--lm", "mock",
         "--workers", "2", "--", sys.executable, str(tmp_path / "poller.py"), str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run_id = ""
    rt = DockerRuntime(docker_engine)
    try:
        assert poll_until(lambda: (tmp_path / "ready").exists() or proc.poll() is not None, 300, 0.1)
        assert proc.poll() is None, proc.communicate()
        run_id = (tmp_path / "ready").read_text()
        found = {ref.name: ref for ref in rt.list_resources(L.selector(run_id)) if ref.kind == "container"}
        victim = next(name for name in found if name.endswith("-w0"))
        relay = next(name for name in found if name.endswith("-relay"))
        docker_engine.api.kill(victim)
        docker_engine.api.kill(relay)
        (tmp_path / "broken").write_text("")
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out + err
        assert (tmp_path / "healed").exists()
        # Why, in the engine's words, and what was done. (When a check falls between the two kills,
        # the worker's first replacement waits on the dead relay and fails, and the next check,
        # after the relay, replaces it: the note of the replacement then says the container is gone.)
        # When each died (UTC, as the CLI shows times) and when it served again, how long that took.
        clock = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
        name = re.escape(victim)
        took = r"the repair took \d+\.\d s"
        died = rf"exited with code 137 \(SIGKILL\) at {clock}"
        assert re.search(rf"worker {name} \(slot 0\) {died}; replac", err), err
        assert re.search(rf"worker {name} \(slot 0\) [^\n]*; replaced it with {name}-[^\n]*; "
                         rf"back at {clock}: (down \d+\.\d s, )?{took}\n", err), err
        relay_name = re.escape(relay)
        assert re.search(rf"the relay {relay_name} {died}; re-created the relay {relay_name} on the same "
                         rf"ports; back at {clock}: down \d+\.\d s, {took}", err), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if run_id:
            remove_by_selector(rt, L.selector(run_id))
    assert run_id and leftovers(docker_engine, run_id) == []
