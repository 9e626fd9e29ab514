"""The supervisor's control socket: one JSON request per line, one JSON answer per line.

A root-only unix socket. The `kalki` command (appliance.client), the lab and dnsmasq's lease
script talk to the running supervisor through it; each request is one of `ops.CONTROL`, so the
socket, the web page and the button carry out the same code.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging

from appliance.errors import ConfigError, KalkiError
from appliance.supervisor.ops import CONTROL, Ops

MAX_REQUEST = 1 << 20
log = logging.getLogger("kalki.control")
# Argument names on the wire that are Python keywords.
_RENAMED = {"for": "for_"}


def handle(ops: Ops, req: dict):
    """Carries out one request on the supervisor's loop; returns the result or raises."""
    op = req.get("op")
    args = req.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ConfigError("args must be an object")
    if op not in CONTROL:
        raise ConfigError(f"unknown request {op!r}")
    method = getattr(ops, op)
    kwargs: dict[str, object] = {_RENAMED.get(str(k), str(k)): v for k, v in args.items()}
    try:
        inspect.signature(method).bind(**kwargs)
    except TypeError as e:
        missing = str(e).removeprefix("missing a required argument: ")
        problem = f"missing argument {missing}" if missing != str(e) else str(e)
        raise ConfigError(f"{op}: {problem}") from None
    return method(**kwargs)


async def serve_client(ops: Ops, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if len(line) > MAX_REQUEST:
                answer = {"ok": False, "error": "request too large"}
            else:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ConfigError("a request is a JSON object")
                    answer = {"ok": True, "result": handle(ops, req)}
                except json.JSONDecodeError as e:
                    answer = {"ok": False, "error": f"malformed request: {e}"}
                except RecursionError:
                    answer = {"ok": False, "error": "malformed request: nested too deeply"}
                except (KalkiError, ValueError) as e:
                    answer = {"ok": False, "error": str(e)}
                except Exception as e:     # noqa: BLE001 - the caller always gets an answer
                    log.exception("control: %s", line[:200])
                    answer = {"ok": False, "error": f"internal error ({type(e).__name__}: {e}); "
                                                    "see the supervisor's log"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
