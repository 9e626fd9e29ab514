"""The control socket's client: what the `kalki` command, the lab and dnsmasq's lease script use
to ask the running supervisor (appliance.supervisor.control serves it)."""
from __future__ import annotations

import json
import socket

from appliance.errors import KalkiError


def request(socket_path: str, op: str, timeout: float = 30.0, **args):
    """One request to a running supervisor; raises KalkiError with its message on refusal."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise KalkiError(f"no supervisor listening on {socket_path} (is `kalki run` running?)") from None
    try:
        s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data:
        raise KalkiError(f"the supervisor on {socket_path} closed the connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise KalkiError(answer.get("error", "refused"))
    return answer["result"]
