"""Remote engines (issue 13): the worker image to an engine without a registry, and a killed
controller's run on it.

Usage::

    .venv/bin/python benchmarks/bench_remote.py [--rounds 3] [--no-build] [--json] [--write-docs]

Needs root, ``ip``, ``nsenter``, ``dockerd`` and the worker image on the local engine (``bash
.ci/setup`` builds it). Method (wall clock, ``time.perf_counter``): a second dockerd in a network
namespace of its own, reached over TCP with TLS through a veth pair (tests/runtime/engine/
namespaced.py, the remote-engine tests' engine), then

* **dockerd start** — from ``nsenter … dockerd`` to "API listen" on its TLS socket;
* **send** — :func:`provisioner.runtime.images.transfer_image`: the local engine's ``docker save``
  streamed into the remote engine's ``docker load`` through the image store (what ``provision up``
  does when the remote engine lacks the image); the image is removed from the remote engine
  between rounds, so every round moves every layer;
* **build there instead** (one round; ``--no-build`` skips it) — what a remote engine without an
  image source would do: the base image sent the same way (a remote engine on the internet would
  pull it), then ``build_worker_image`` on the remote engine, its context (recipe, wheelhouse,
  provisioner's wheel) streamed over the engine API and ``pip install --no-index`` run there;
* **kill → gone** — ``provision run --layer integration --lm mock --workers 1 -- <a command that
  holds>`` against the remote engine, SIGKILL of the ``provision run`` process once its command
  runs, then a poll every 50 ms until no container or network labelled with the run is left on
  the remote engine (the run's watchdog removes it, through the same DOCKER_HOST).
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Remote engines (issue 13)"
sys.path.insert(0, str(ROOT / "tests" / "runtime" / "engine"))

from _docs import run  # noqa: E402 - run as a script: this folder is on sys.path
from namespaced import RemoteEngine, missing_tools, namespaced_engine  # noqa: E402

from provisioner.runtime import images  # noqa: E402
from provisioner.runtime import labels as L  # noqa: E402
from provisioner.runtime.engine import open_runtime, remove_by_selector  # noqa: E402
from provisioner.runtime.polling import poll_until  # noqa: E402
from tests._helpers import without_settings  # noqa: E402

HOLDER = """
import os, sys, threading
open(sys.argv[1], "w").write(os.environ["PROVISION_RUN_ID"])
threading.Event().wait()
"""


def _send_rounds(engine: RemoteEngine, tag: str, rounds: int) -> list[float]:
    local, remote = open_runtime(), engine.runtime()
    try:
        out = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            images.transfer_image(local, remote, tag)
            out.append(time.perf_counter() - t0)
            remote.remove_image(tag)
        return out
    finally:
        remote.close()
        local.close()


def _build_there(engine: RemoteEngine) -> dict[str, float]:
    local, remote = open_runtime(), engine.runtime(remote=False)
    try:
        base_ref, _ = images.resolve_base(local, allow_build=False)
        t0 = time.perf_counter()
        images.transfer_image(local, remote, base_ref)
        base_s = time.perf_counter() - t0
        for image in remote.list_images(images.WORKER_REPO):  # sent by the rounds before: gone
            for tag in image.tags:
                remote.remove_image(tag)
        t0 = time.perf_counter()
        built = images.build_worker_image(remote, force=True, progress=lambda _m: None)
        build_s = time.perf_counter() - t0
        remote.remove_image(built.tag)
        remote.remove_image(base_ref)
        return {"base_send_s": base_s, "build_s": build_s}
    finally:
        remote.close()
        local.close()


def _kill_rounds(engine: RemoteEngine, rounds: int) -> list[float]:
    remote = engine.runtime()
    project = Path(tempfile.mkdtemp(prefix="provision-bench-remote-"))
    (project / "provision.toml").write_text("")
    (project / "holder.py").write_text(HOLDER)
    env = without_settings(also=lambda name: name.startswith("DOCKER_"))  # the remote engine's own
    env.update(engine.env)
    out = []
    try:
        for n in range(rounds):
            out.append(_kill_once(remote, project, env, project / f"ready-{n}"))
        return out
    finally:
        remove_by_selector(remote, L.selector())
        remote.close()


def _kill_once(remote: Any, project: Path, env: dict[str, str], ready: Path) -> float:
    provision = str(Path(sys.executable).parent / "provision")
    proc = subprocess.Popen(
        [provision, "run", "--layer", "integration", "--lm", "mock", "--workers", "1", "--",
         sys.executable, str(project / "holder.py"), str(ready)],
        cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        poll_until(lambda: ready.exists() or proc.poll() is not None, 900, 0.05)
        if not ready.exists():
            raise RuntimeError("provision run did not start its command on the remote engine")
        run_id = ready.read_text().strip()
        proc.send_signal(signal.SIGKILL)
        t0 = time.perf_counter()
        if not poll_until(lambda: remote.list_resources(L.selector(run_id)) == [], 120, 0.05):
            raise RuntimeError(f"run {run_id} was still on the remote engine after 120 s")
        return time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def measure(rounds: int, build: bool) -> dict[str, Any]:
    problem = missing_tools()
    if problem:
        raise SystemExit(problem)
    local = open_runtime()
    try:
        tag = images.ensure_worker_image(local)
        found = local.image(tag)
        size = found.size if found else 0
        docker_version = local.engine_info().version
    finally:
        local.close()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="provision-bench-remote-") as work, \
            namespaced_engine(Path(work)) as engine:
        results: dict[str, Any] = {
            "image": tag, "image_mb": size / 1e6, "docker_version": docker_version,
            "dockerd_start_s": engine.start_s, "load_before": load_before,
        }
        results["send_s"] = _send_rounds(engine, tag, rounds)
        results["kill_to_gone_s"] = _kill_rounds(engine, rounds)  # the image is there from here on
        if build:
            results.update(_build_there(engine))
    results["load_after"] = os.getloadavg()[0]
    return results


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def markdown(results: dict[str, Any], rounds: int) -> str:
    send = results["send_s"]
    rate = results["image_mb"] / statistics.median(send)
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python benchmarks/bench_remote.py --rounds {rounds} --write-docs` — a second dockerd "
        "in a network namespace, reached over TCP with TLS through a veth pair (the remote-engine tests' "
        f"engine); median (min to max) of {rounds} rounds; the script's docstring says what each row times.",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} vCPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, Docker {results['docker_version']} (both engines); image "
        f"{results['image']} ({results['image_mb']:.0f} MB). Date: {time.strftime('%Y-%m-%d %H:%M')} UTC. "
        f"Load average (1 min) before/after: {results['load_before']:.1f} / {results['load_after']:.1f}.",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| second dockerd: start to its TLS API listening | {results['dockerd_start_s']:.2f} |",
        f"| worker image sent: save on the local engine streamed into load on the remote one "
        f"(through the image store; {rate:.0f} MB/s) | {_spread(send)} |",
        f"| SIGKILL of `provision run`'s controller → nothing of the run left on the remote engine "
        f"(issue: within 10 s) | {_spread(results['kill_to_gone_s'])} |",
    ]
    if "build_s" in results:
        lines += [
            f"| instead, build there: the base image sent (1 round) | {results['base_send_s']:.2f} |",
            f"| instead, build there: `build_worker_image` on the remote engine, context streamed (1 round) "
            f"| {results['build_s']:.2f} |",
        ]
    lines += [
        "",
        "- Why save | load is the default (a remote engine with a local engine beside the controller):",
        "  the image is built once, where the wheelhouse is, and the remote engine needs neither a base",
        "  image nor a registry; a build there needs the base first (pulled, or sent as here) and runs",
        "  `pip install` on the remote host. Without a local engine (or with another architecture) the",
        "  build there is what happens (`ImageStore.image_source`, docs/containers.md).",
        "- The shell figure before this (`docker save | docker load`, one run at load ≈ 10): 18.6 s.",
        "- Load is sampled before and after only; on a shared machine other suites run meanwhile (the",
        "  build-there row is the most sensitive: `pip install` of the whole wheelhouse on 2 cores).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    # A SIGTERM (timeout(1), a CI cancel) unwinds like Ctrl-C: the second dockerd and its namespace go.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(SECTION, lambda args: measure(args.rounds, not args.no_build),
        lambda results, args: markdown(results, args.rounds), rounds=3,
        options=lambda parser: parser.add_argument(
            "--no-build", action="store_true", help="skip the build-on-the-remote-engine row"))


if __name__ == "__main__":
    main()
