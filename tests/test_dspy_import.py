"""A worker's process imports DSPy without its full stack walks (provisioner/_dspy_import.py); a user's
process that imports provisioner keeps DSPy as installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import inspect, sys
real = inspect.stack
calls = []
inspect.stack = lambda *a, **k: calls.append(1) or real(*a, **k)
import provisioner.bridge.worker
import dspy
print("walks", len(calls))
from dspy.utils.lazy_import import require
missing = require("a_module_that_is_not_installed_7f3e")
try:
    missing.anything
except ImportError as exc:
    print(exc)
"""


def run(script: Path) -> str:
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_dspy_walks_no_stack_and_a_missing_module_still_names_its_caller(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    out = run(script)
    assert "walks 0" in out  # DSPy 3.x walked the whole stack 5 times (numpy is not installed)
    # DSPy's own error on use: the file and line of the require() call, and that line's code.
    assert f"File {script}, line 10, in <module>" in out
    assert 'missing = require("a_module_that_is_not_installed_7f3e")' in out


def test_the_real_inspect_is_untouched(tmp_path: Path) -> None:
    script = tmp_path / "check.py"
    script.write_text("import inspect\nimport provisioner\nimport dspy\n"
                      "print(inspect.stack.__module__, len(inspect.stack()) == 1)\n")
    assert run(script).split() == ["inspect", "True"]


USER = """
import inspect
real = inspect.stack
calls = []
inspect.stack = lambda *a, **k: calls.append(1) or real(*a, **k)
import provisioner, provisioner.pytest_plugin
import dspy
import dspy.utils.lazy_import as lazy
print("walks", len(calls), lazy.inspect is inspect)
"""


def test_a_users_process_importing_provisioner_keeps_dspy_as_installed(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(USER)
    out = run(script)
    assert "walks 0" not in out and out.strip().endswith("True"), out


GATE = """
import inspect, sys
real = inspect.stack
calls = []
inspect.stack = lambda *a, **k: calls.append(1) or real(*a, **k)
sys.path.insert(0, sys.argv[1])
import netguard
sys.argv = ["netguard.py"]
try:
    netguard.wait_for_guard(["provision", "--version"], timeout_s=30, preload=sys.argv_preload,
                            route_file=sys.argv_routes)
except SystemExit:
    pass
import dspy.utils.lazy_import as lazy
print("walks", len(calls), lazy.inspect is inspect)
"""


def test_a_guarded_workers_gate_preloads_dspy_after_the_hook(tmp_path: Path) -> None:
    # A worker on an internal run network starts behind the gate (runtime/netguard.py), which imports
    # the worker's modules while the egress guard runs: DSPy must not come in before the hook does.
    from provisioner.runtime import netguard
    from provisioner.runtime.recipes import WORKER_PRELOAD

    routes = tmp_path / "route"  # /proc/net/route with the guard in place: no default route, a reject route
    routes.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "*\t010012AC\t00000000\t0201\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n"
    )
    script = tmp_path / "gate.py"
    script.write_text(GATE.replace("sys.argv_preload", repr(list(WORKER_PRELOAD)))
                      .replace("sys.argv_routes", repr(str(routes))))
    done = subprocess.run([sys.executable, str(script), str(Path(netguard.__file__).parent)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["walks", "0", "False"], done.stdout  # the proxy, not inspect
