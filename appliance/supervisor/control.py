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

# A request is one line of any length up to this (a profile import carries a file of up to
# 1 MB, JSON-escaped); a longer one is read to its end and refused.
MAX_REQUEST = 8 << 20
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


async def read_request(reader: asyncio.StreamReader, maximum: int = MAX_REQUEST) -> tuple[bytes, int]:
    """One line, however long (the reader's own limit, 64 KiB by default, is its buffer's,
    not ours): the line if it fits in `maximum` (b"" if not) and its length; (b"", 0) at the end."""
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await reader.readuntil(b"\n")
            done = True
        except asyncio.IncompleteReadError as e:      # the end, with or without a last line
            chunk, done = e.partial, True
        except asyncio.LimitOverrunError as e:        # more than the buffer holds: take it
            chunk, done = await reader.read(max(1, e.consumed)), False
        size += len(chunk)
        if size <= maximum:
            parts.append(chunk)
        else:
            parts = []
        if done:
            return b"".join(parts), size


async def serve_client(ops: Ops, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line, size = await read_request(reader)
            if not size:
                break
            if size > MAX_REQUEST:
                answer = {"ok": False, "error": f"request too large ({size} bytes; at most {MAX_REQUEST})"}
            else:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ConfigError("a request is a JSON object")
                    result = handle(ops, req)
                    if inspect.isawaitable(result):     # an operation that talks to a device
                        result = await result
                    answer = {"ok": True, "result": result}
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
