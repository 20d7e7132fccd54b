"""Docker HEALTHCHECK for the bridge worker: one ``ping`` over the framed JSON protocol.

Stdlib only (it starts in milliseconds, no dspy import): 4-byte big-endian length + UTF-8 JSON.
Healthy = the reply is a success and the worker's LM is configured. Exit 0 healthy, 1 not.
"""

import json
import socket
import struct
import sys

# Seconds to connect and get the ping's reply: below the HEALTHCHECK's --timeout (10 s), so a slow
# worker is reported with this script's reason rather than killed by the engine mid-probe.
TIMEOUT_S = 8.0


def main() -> int:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8765
    request = json.dumps({"id": "healthcheck", "command": "ping", "args": {}}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
            sock.sendall(struct.pack(">I", len(request)) + request)
            header = _read(sock, 4)
            (size,) = struct.unpack(">I", header)
            reply = json.loads(_read(sock, size))
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}")
        return 1
    if not reply.get("success"):
        print(f"unhealthy: {reply.get('error_type')}: {reply.get('error')}")
        return 1
    if not (reply.get("result") or {}).get("lm_configured", False):
        print("unhealthy: LM not configured")
        return 1
    return 0


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


if __name__ == "__main__":
    sys.exit(main())
