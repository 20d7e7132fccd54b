"""``provision worker``: one bridge worker in the foreground — TCP, ``--stdio`` or ``--fork``.

The entry point sits above both ways of serving: :mod:`provisioner.bridge.server` (one process,
threads per connection, or the one ``--stdio`` connection) and :mod:`provisioner.bridge.forking`
(a process per connection, forked from a parent built on the server's pieces). It lived in
``server`` until the architecture test's cycle check named ``server -> forking -> server``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from provisioner import _dspy_import
from provisioner.bridge.programs import DEFAULT_MAX_PROGRAMS, DEFAULT_MAX_SESSIONS
from provisioner.bridge.protocol import BRIDGE_TOKEN_ENV, CONTROL_TOKEN_ENV, DEFAULT_MAX_FRAME_BYTES
from provisioner.bridge.server import (
    DEFAULT_FRAME_TIMEOUT_S,
    DEFAULT_MAX_INFLIGHT_BYTES,
    READY_PREFIX,
    WORKER_ID_ENV,
    BridgeServer,
    PipeReader,
    install_process_lm,
    pids_limit,
    write_ready_file,
)
from provisioner.bridge.service import BridgeService
from provisioner.errors import ConfigError
from provisioner.lmconfig import LMConfig

# In the worker's own process only (none of the imports above imports DSPy): `import dspy` without
# five full stack walks (see the module).
# Not at `import provisioner`: a user's pytest process keeps DSPy exactly as they installed it.
_dspy_import.install()

log = logging.getLogger("provisioner.bridge")


def run_worker(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_file: Path | None = None,
    stdio: bool = False,
    lm_config: LMConfig | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_inflight: int = 8,
    max_connections: int = 256,
    request_timeout_s: float = 30.0,
    worker_id: str | None = None,
    control_token: str | None = None,
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
    frame_timeout_s: float = DEFAULT_FRAME_TIMEOUT_S,
    max_programs: int = DEFAULT_MAX_PROGRAMS,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_inflight_per_session: int | None = None,
    fork: bool = False,
) -> int:
    """Run a bridge worker in the foreground until ``shutdown``, SIGTERM/SIGINT or (stdio) EOF.

    ``fork``: every connection gets its own process, forked from this one after it imported
    everything (:mod:`provisioner.bridge.forking`); not with ``stdio``.

    Prints exactly one stdout line ``PROVISION_WORKER_READY port=<n>`` once it accepts requests
    (with ``stdio`` that line goes to stderr, as ``port=stdio``: stdout carries only frames).
    ``control_token`` (default: ``$PROVISION_CONTROL_TOKEN``, which is then removed from the
    environment) guards the worker-wide commands; without one every connection may use them.
    ``$PROVISION_BRIDGE_TOKEN`` (read and removed the same way; set for runs published off
    loopback) makes every TCP connection start with a ``hello`` carrying it.
    Returns the exit code: 0 after a clean shutdown.

    Raises:
        ConfigError: ``fork`` with ``stdio``.
        ForkUnsafeError: ``fork`` and the process runs more than one thread before serving.
    """
    if fork and stdio:
        raise ConfigError("--fork serves TCP connections (a process per connection); it cannot be combined"
                          " with --stdio, which serves the one connection of the host that spawned it")
    _configure_logging()
    # A worker's key comes only from its start-up configuration, never from a later env lookup.
    from provisioner.lm.gemini import forbid_environment_key

    forbid_environment_key()
    worker_id = worker_id or os.environ.get(WORKER_ID_ENV) or None
    # Read once and dropped from the environment: nothing the worker runs later inherits it.
    from_env = os.environ.pop(CONTROL_TOKEN_ENV, None)
    control_token = control_token or from_env or None
    bridge_token = os.environ.pop(BRIDGE_TOKEN_ENV, None) or None
    if fork:
        from provisioner.bridge.forking import run_fork_worker

        return run_fork_worker(
            host=host, port=port, ready_file=ready_file, lm_config=lm_config or LMConfig(mode="mock"),
            worker_id=worker_id, control_token=control_token, bridge_token=bridge_token,
            server_options={
                "max_frame_bytes": max_frame_bytes, "max_inflight": max_inflight,
                "request_timeout_s": request_timeout_s, "max_inflight_bytes": max_inflight_bytes,
                "frame_timeout_s": frame_timeout_s, "max_inflight_per_session": max_inflight_per_session,
            },
            service_options={"max_programs": max_programs, "max_sessions": max_sessions},
            max_connections=max_connections, pids=pids_limit(),
            ready_line=lambda bound: print(f"{READY_PREFIX} port={bound}", flush=True),
        )
    protocol_out: BinaryIO | None = None
    if stdio:
        # stdout belongs to the protocol. Anything else that prints (DSPy, a stray print) must not
        # corrupt the frames, so fd 1 is pointed at stderr and the protocol keeps a private copy.
        sys.stdout.flush()
        protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    # A worker is never up without an LM: a bare `provision worker` gets the mock. Its call path
    # (DSPy's; google-genai for real and recording layers) is imported before the ready line, so
    # the first request does not pay it inside its request timeout (about 30 s on a loaded 1-CPU
    # container: the worker start-up deadline is the one sized for imports).
    lm_config = lm_config or LMConfig(mode="mock")
    from provisioner.lm import preload

    preload(lm_config)
    service = BridgeService(
        lm_config,
        worker_id=worker_id,
        control_token=control_token,
        bridge_token=bridge_token if not stdio else None,  # stdio: the spawner owns the pipes
        max_programs=max_programs,
        max_sessions=max_sessions,
    )
    install_process_lm(service)
    server = BridgeServer(
        service,
        max_frame_bytes=max_frame_bytes,
        max_inflight=max_inflight,
        max_connections=max_connections,
        request_timeout_s=request_timeout_s,
        max_inflight_bytes=max_inflight_bytes,
        frame_timeout_s=frame_timeout_s,
        max_inflight_per_session=max_inflight_per_session,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing in-flight requests, then exiting", signal.Signals(signum).name)
        server.request_stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_wakeup_fd = signal.set_wakeup_fd(server.signal_wakeup_fd)
    try:
        if stdio:
            assert protocol_out is not None
            server.serve_stdio(PipeReader(os.dup(0)), protocol_out)
            print(f"{READY_PREFIX} port=stdio", file=sys.stderr, flush=True)
        else:
            bound = server.listen(host, port)
            if ready_file is not None:
                write_ready_file(ready_file, bound)
            print(f"{READY_PREFIX} port={bound}", flush=True)
        server.wait_for_stop()
        # The wake-up fd is about to be closed: never let a late signal write to it.
        signal.set_wakeup_fd(previous_wakeup_fd)
        clean = server.close()
    finally:
        signal.set_wakeup_fd(previous_wakeup_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("bridge worker stopped (%s)", "clean" if clean else "abandoned stuck work")
    if not clean:
        # Threads stuck in an LM call would keep the interpreter alive; their replies are already sent.
        sys.stderr.flush()
        os._exit(0)
    return 0


class _WriteTimeFormatter(logging.Formatter):
    """Each line starts with its own UTC write time to the microsecond (``2026-12-01
    00:41:36,984123``): the host's log windows (:mod:`provisioner.runtime.logs`) place a line by
    it, not by the engine's later stamp; requests a millisecond apart fall on either side of a
    window's edge."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        micros = int(record.created * 1_000_000)  # truncated, as the seconds are
        seconds, fraction = divmod(micros, 1_000_000)
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f",{fraction:06d}"


def _configure_logging() -> None:
    """Worker logs go to stderr (stdout is for the ready line, or the frames with --stdio)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_WriteTimeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
