"""Bridge worker round trips on loopback: ping and execute_program (mock LM), p50/p99 and throughput.

Usage::

    .venv/bin/python benchmarks/bench_bridge.py [--requests 5000] [--json]

Method: start ``provision worker --port 0`` as a subprocess (mock LM, default settings) on 127.0.0.1;
warm up; then time each request from just before the client sends it to just after the reply is
decoded (``time.perf_counter_ns``), one request at a time on one connection (the latency figures),
in 5 rounds that alternate ping and execute_program so machine noise hits both alike.
Throughput is measured three ways: that same sequential loop, 4 client threads each with its own
connection, and one connection pipelining 32 requests at a time. For scale, the same
``execute_program`` is also timed in-process (``BridgeService.call``, no sockets) and as a bare
``dspy.Predict`` call with the same mock LM. Everything runs on one machine, so client and worker
compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _docs import cpu_model  # run as a script: this folder is on sys.path

from provisioner.bridge import BridgeClient, BridgeService
from provisioner.bridge.protocol import dumps, encode_frame, read_frame
from provisioner.lmconfig import LMConfig
from tests._helpers import without_settings

QA_INT = {"inputs": [{"name": "question"}], "outputs": [{"name": "answer", "type": "int"}]}
INPUTS = {"question": "What is 2+2?"}
ROUNDS = 5


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(name: str, samples_ns: list[int], seconds: float) -> dict[str, Any]:
    ms = [s / 1e6 for s in samples_ns]
    return {
        "name": name,
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "throughput_rps": round(len(ms) / seconds, 1),
    }


def timed_loop(fn: Callable[[], Any], n: int) -> tuple[list[int], float]:
    samples = []
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return samples, time.perf_counter() - started


def start_worker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    ready = workdir / "port"
    env = without_settings()
    env.update(LMConfig(mode="mock").to_worker_env())
    script = Path(sys.executable).with_name("provision")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "provisioner.cli"]
    proc = subprocess.Popen(
        [*command, "worker", "--port", "0", "--ready-file", str(ready)],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the worker did not become ready")
        time.sleep(0.02)
    return proc, int(ready.read_text())


def threaded_throughput(
    port: int, command: Callable[[BridgeClient], Any], threads: int, per_thread: int
) -> float:
    clients = [BridgeClient("127.0.0.1", port) for _ in range(threads)]
    for c in clients:
        c.connect()
    barrier = threading.Barrier(threads + 1)

    def run(c: BridgeClient) -> None:
        barrier.wait()
        for _ in range(per_thread):
            command(c)

    workers = [threading.Thread(target=run, args=(c,)) for c in clients]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    for c in clients:
        c.close()
    return threads * per_thread / elapsed


def pipelined_throughput(port: int, message: dict[str, Any], total: int, depth: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb", buffering=65536)
    frames = [encode_frame(dumps({**message, "id": i})) for i in range(depth)]
    batch = b"".join(frames)
    started = time.perf_counter()
    for _ in range(total // depth):
        sock.sendall(batch)
        for _ in range(depth):
            payload = read_frame(reader)
            assert payload is not None and b'"success":true' in payload
    elapsed = time.perf_counter() - started
    reader.close()
    sock.close()
    return (total // depth) * depth / elapsed


def in_process(n: int) -> list[dict[str, Any]]:
    import dspy

    from provisioner.lm import build_lm

    service = BridgeService(LMConfig(mode="mock"))
    service.call("create_program", {"program_id": "qa", "signature": QA_INT})
    args = {"program_id": "qa", "inputs": INPUTS}
    for _ in range(200):
        service.call("execute_program", args)
    samples, seconds = timed_loop(lambda: service.call("execute_program", args), n)
    out = [summarize("execute_program in-process (BridgeService.call)", samples, seconds)]

    lm = build_lm(LMConfig(mode="mock"))
    fields = {"question": (str, dspy.InputField()), "answer": (int, dspy.OutputField())}
    predict = dspy.Predict(dspy.Signature(fields))
    with dspy.context(lm=lm):
        for _ in range(200):
            predict(**INPUTS)
        samples, seconds = timed_loop(lambda: predict(**INPUTS), n)
    out.append(summarize("bare dspy.Predict, same mock LM", samples, seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    options = parser.parse_args()
    n = options.requests
    load_before = os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    extra: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_worker(Path(tmp))
        try:
            with BridgeClient("127.0.0.1", port) as client:
                client.create_program(QA_INT, "qa")
                for _ in range(500):
                    client.ping()
                    client.execute_program("qa", INPUTS)
                # Rounds alternate the two commands so machine noise hits both alike.
                loops = {
                    "ping over TCP": client.ping,
                    "execute_program over TCP (predict, mock LM)": (
                        lambda: client.execute_program("qa", INPUTS)
                    ),
                }
                collected: dict[str, tuple[list[int], float]] = {name: ([], 0.0) for name in loops}
                for _ in range(ROUNDS):
                    for name, fn in loops.items():
                        samples, seconds = timed_loop(fn, n // ROUNDS)
                        total_samples, total_seconds = collected[name]
                        collected[name] = (total_samples + samples, total_seconds + seconds)
                for name, (samples, seconds) in collected.items():
                    results.append(summarize(name, samples, seconds))
            extra["ping_4_threads_rps"] = threaded_throughput(port, lambda c: c.ping(), 4, n // 4)
            extra["execute_4_threads_rps"] = threaded_throughput(
                port, lambda c: c.execute_program("qa", INPUTS), 4, n // 4
            )
            ping = {"command": "ping", "args": {}}
            extra["ping_pipelined_32_rps"] = pipelined_throughput(port, ping, n, 32)
            execute = {"command": "execute_program", "args": {"program_id": "qa", "inputs": INPUTS}}
            extra["execute_pipelined_32_rps"] = pipelined_throughput(port, execute, n, 32)
            with BridgeClient("127.0.0.1", port) as client:
                client.shutdown()
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    results.extend(in_process(n))

    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    if options.json:
        print(json.dumps({"machine": machine, "latency": results, "throughput": extra}, indent=2))
        return
    print(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']},"
        f" {machine['platform']}; {machine['date']}; {n} requests per row;"
        f" load average (1 min) before/after: {machine['load_before']} / {machine['load_after']}.\n"
    )
    print("| measurement | p50 ms | p99 ms | mean ms | sequential req/s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['name']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f}"
            f" | {r['throughput_rps']:.0f} |"
        )
    print("\n| throughput | req/s |")
    print("|---|---:|")
    for key, value in extra.items():
        print(f"| {key} | {value:.0f} |")


if __name__ == "__main__":
    main()
