"""CPU time of one fork-mode child, stage by stage, with each way of warming a spare (issue 12).

Usage::

    .venv/bin/python benchmarks/bench_fork_child.py [--forks 30]

Method: this process does what ``provision worker --fork``'s parent does before its first fork
(:func:`provisioner.bridge.forking.warm_up`, the children's ``BridgeService`` built once,
``gc.collect()`` + ``gc.freeze()``), then forks ``--forks`` children per variant, one at a time. Each
child takes its service as a spare does (the parent's, its clock restarted, ``install_process_lm``,
``gc.freeze()``), warms up
(variant), then does what a test does in-process (``hello``, ``create_program``, ``execute_program``
of a mock ``predict``), timing each stage with ``time.process_time()`` (CPU, not wall: the machine is
shared) and counting minor page faults (``getrusage``: copy-on-write copies). Variants: ``warmup``
(:class:`~provisioner.bridge.forking.WarmUp` creating and executing a program of its own, what
spares ran with the first two-worker pools), ``warm-execute`` (``WarmUp`` re-executing the parent's
program: what spares run), ``exercise`` (a scratch service built in the spare, create + execute +
reset: what spares ran before both), ``none``. Printed: medians
and the load average. No socket and no container: the fork, the exit and the server path are not
in these figures (``bench_fork.py`` has those, end to end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time

from provisioner.bridge import forking
from provisioner.bridge.server import install_process_lm
from provisioner.bridge.service import BridgeService
from provisioner.factories import ProgramFactory
from provisioner.lmconfig import LMConfig

STAGES = ("build", "warm", "serve")


def child(
    variant: str, warm: forking.WarmUp, template: BridgeService, args: dict[str, object]
) -> dict[str, float]:
    out: dict[str, float] = {}
    cpu0 = time.process_time()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def mark(stage: str) -> None:
        out[stage] = (time.process_time() - cpu0) * 1000
        out[stage + "_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0

    service = template  # built in the parent before the fork, as the worker's parent does
    service.restart_clock()
    service.process = {"mode": forking.PROCESS_MODE_FORK, "pid": os.getpid(), "parent_pid": os.getppid()}
    install_process_lm(service)
    gc.freeze()
    mark("build")
    if variant == "warmup":
        warm.run()
    elif variant == "warm-execute":
        warm.run(create=False)
    elif variant == "exercise":
        forking.exercise()
    gc.freeze()
    mark("warm")
    service.call("hello", {})
    service.call("create_program", args)
    service.call("execute_program", {"program_id": "qa", "inputs": {"question": "q1"}})
    mark("serve")
    return out


def measure(forks: int) -> dict[str, object]:
    config = LMConfig(mode="mock")
    warm = forking.warm_up(config)
    template = BridgeService(config, worker_id="bench")
    gc.collect()
    gc.freeze()
    args = ProgramFactory.build(id="qa").create_args()
    results: dict[str, object] = {"load_before": os.getloadavg()[0], "forks": forks}
    for variant in ("warmup", "warm-execute", "exercise", "none"):
        rows = []
        for _ in range(forks):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    os.write(write, json.dumps(child(variant, warm, template, args)).encode())
                finally:
                    os._exit(0)
            os.close(write)
            data = b""
            while chunk := os.read(read, 65536):
                data += chunk
            os.close(read)
            os.waitpid(pid, 0)
            rows.append(json.loads(data))
        figures, previous, previous_faults = {}, 0.0, 0.0
        for stage in STAGES:  # per stage: the medians of the cumulative figures, differenced
            cumulative = statistics.median(r[stage] for r in rows)
            faults = statistics.median(r[stage + "_faults"] for r in rows)
            figures[f"{stage}_cpu_ms"] = round(cumulative - previous, 2)
            figures[f"{stage}_faults"] = faults - previous_faults
            previous, previous_faults = cumulative, faults
        figures["total_cpu_ms"] = round(previous, 2)
        results[variant] = figures
    results["load_after"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forks", type=int, default=30)
    print(json.dumps(measure(parser.parse_args().forks), indent=1))


if __name__ == "__main__":
    main()
