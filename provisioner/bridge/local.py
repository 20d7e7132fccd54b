"""The bridge in-process: :class:`LocalBridge` has the client's API but calls a BridgeService directly.

The unit layer uses it where a container would be overkill. It keeps the wire's semantics: args
and results make a round trip through JSON (so a value that could not be sent to a worker fails
here too), errors raise the same :class:`~provisioner.errors.BridgeError` with the same
``error_type``, and executions run under ``dspy.context(lm=...)`` exactly as in the worker.
"""

from __future__ import annotations

import json
from typing import Any

from provisioner.bridge.client import BridgeCommands, check_json
from provisioner.bridge.protocol import dumps
from provisioner.bridge.service import Access, BridgeService, LMFactory
from provisioner.lmconfig import LMConfig
from provisioner.reprs import safe_repr


class LocalBridge(BridgeCommands):
    """An in-process worker. ``lm_config`` is its start-up LM (default: the mock, like a bare
    ``provision worker``). Use :meth:`session` for a session-bound view, as with a BridgeClient.

    ``control``: whether requests may use the worker-wide commands (``reset_state``, ``shutdown``,
    the worker-default LM, other sessions' ids). A LocalBridge shared by many tests' sessions is
    made with ``control=False``, like a worker's network client without the run's token; its owner
    still resets it through :meth:`close`."""

    def __init__(
        self,
        lm_config: LMConfig | None = None,
        *,
        lm_factory: LMFactory | None = None,
        worker_id: str | None = None,
        control: bool = True,
    ) -> None:
        self._access = Access(control=control)
        self.service = BridgeService(
            lm_config or LMConfig(mode="mock"),
            lm_factory=lm_factory,
            worker_id=worker_id or "in-process",
            record_history=True,  # in-process, dspy.inspect_history() works as usual
        )
        self.closed = False

    @safe_repr
    def __repr__(self) -> str:
        return f"LocalBridge(worker_id={self.service.worker_id!r})"

    def request(self, command: str, **args: Any) -> dict[str, Any]:
        result = self.service.call(command, check_json(args), self._access)
        decoded: dict[str, Any] = json.loads(dumps(result))
        return decoded

    def close(self) -> None:
        """Drop every session and program; from then on new work is refused with ``ShuttingDown``
        (like a worker after ``shutdown``), while session clean-ups still succeed."""
        if not self.closed:
            self.closed = True
            self.service.call("reset_state", {})
            self.service.begin_shutdown()

    def __enter__(self) -> LocalBridge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
