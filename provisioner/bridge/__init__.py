"""The DSPy bridge worker: a DSPex-compatible framed-JSON server, its client, and an in-process twin.

* :mod:`~provisioner.bridge.protocol` — framing (4-byte big-endian length + UTF-8 JSON) and envelopes
* :mod:`~provisioner.bridge.programs` — signature specs to typed DSPy signatures; session namespaces
* :mod:`~provisioner.bridge.service` — :class:`BridgeService`, the command handlers (no sockets)
* :mod:`~provisioner.bridge.server` — threaded TCP server and ``--stdio``
* :mod:`~provisioner.bridge.forking` — ``--fork``: a process per connection
* :mod:`~provisioner.bridge.worker` — ``run_worker``, the ``provision worker`` entry point (all three)
* :mod:`~provisioner.bridge.client` — :class:`BridgeClient`, :class:`SessionClient`
* :mod:`~provisioner.bridge.local` — :class:`LocalBridge`, the same API in-process

This package runs inside worker containers: it never imports the runtime, the CLI, docker or pytest.
See docs/protocol.md for the wire protocol.
"""

from provisioner.bridge.client import BridgeClient, BridgeCommands, SessionClient
from provisioner.bridge.local import LocalBridge
from provisioner.bridge.protocol import ErrorType
from provisioner.bridge.service import COMMANDS, BridgeService

__all__ = [
    "COMMANDS",
    "BridgeClient",
    "BridgeCommands",
    "BridgeService",
    "ErrorType",
    "LocalBridge",
    "SessionClient",
]
