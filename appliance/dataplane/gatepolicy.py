"""What the gate (appliance/dataplane/gate.py) does for each device behind it: the policy files
the data path writes and the gate reads, and the api_filter's rules. Standard library only: the
supervisor writes these files, the gate (a process of its own) reads them.

One file per gated (or deceived) device, `<dir>/<device IPv4>.json`, written whole (a
temporary file renamed over it), removed when the device's posture has no gate umbox (nor
`deception`) any more:

    {"device": "light1", "port": 80, "auth": false,
     "allow": ["GET *", "PUT /api/*/lights/*/state"],
     "token_guard": {"max_failures": 10, "window_ms": 60000, "block_seconds": 300,
                     "statuses": [401, 403]}}

- `port`: the device's web port nftables steers to the gate; a connection to another port of
  the device finds no policy.
- `auth`: auth_gate, the appliance's own credentials (HTTP Basic) on every request.
- `allow`: api_filter, null for none. Each rule is "METHOD PATH": METHOD an upper-case HTTP
  method or `*` (any); PATH `*` (any path) or an absolute path in which `*` matches within one
  segment (never a `/`) and `**` matches anything, `/` included. "GET *" lets every GET through;
  "PUT /api/*/lights/*/state" the Hue-style state change and nothing below or above it.
  `GET` does not imply `HEAD`. The query string is not matched.
- `token_guard`: null for none; otherwise more than `max_failures` failed answers of the device
  to one source within `window_ms` raise `token-brute-force` and, with `block_seconds` > 0, put
  the source in the drop set for that long. An answer failed when its status is one of
  `statuses`, or when `failure_text` (if not empty) is in the first 8 KiB of its body: a real
  Hue bridge answers a wrong token with status 200 and the error "unauthorized user".

- `decoy`: null for none; otherwise the `deception` umbox's table, {"type": "camera"}: the
  device's type (letters, digits, _ and -, at most 40), which the decoy
  (appliance/dataplane/decoy.py) imitates for a source in the drop set. A file may have a
  decoy and no gate umbox at all, `{"device": "cam1", "decoy": {"type": "camera"}}`: its
  `port` may then be left out (or null), and the gate proxies nothing for it.

A gate umbox is `auth` true, an `allow` list or a `token_guard`; `port` is required with one.
A file that is missing, unreadable, malformed, of another port, with keys this version does
not know, or without a gate umbox (a decoy alone) is no policy for the gate, which then
refuses the request (fails closed). The gate reads the file again for every request, so a
posture change applies to open connections too. The decoy reads the same file for the
device's name and type whatever its port, and answers as `generic` without a usable one.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

MAX_RULES = 100
TOKEN_GUARD_DEFAULTS = {"max_failures": 10, "window_ms": 60_000, "block_seconds": 300,
                        "statuses": [401, 403], "failure_text": ""}
FAILURE_TEXT_MAX = 200          # characters of a failure_text
FAILURE_SCAN_BYTES = 8192       # of an answer's body, searched for failure_text
# (minimum, maximum) of the token_guard's integers
TOKEN_GUARD_BOUNDS = {"max_failures": (1, 1_000_000), "window_ms": (1, 3_600_000),
                      "block_seconds": (0, 86_400)}
KEYS = {"device", "port", "auth", "allow", "token_guard", "decoy"}
DECOY_KEYS = {"type"}
DECOY_TYPE = re.compile(r"[A-Za-z0-9_-]{1,40}")     # a device type's name (as profiles name one)

_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}|\*")
_BAD_PATH_CHARS = re.compile(r"[\x00-\x20\x7f\\?#]")


@dataclass(frozen=True)
class Rule:
    text: str
    method: str           # "*": any
    path: re.Pattern

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and self.path.fullmatch(path) is not None


def _dot_or_empty_segments(path: str) -> bool:
    segments = path.split("/")[1:]
    # an empty last segment is a trailing slash ("/api/"); an empty one inside is "//"
    return any(s in (".", "..") for s in segments) or "" in segments[:-1]


def compile_rule(text) -> Rule:
    """'METHOD PATH' -> Rule; ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f'expected a string "METHOD /path", got {text!r}')
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f'{text!r}: expected "METHOD PATH", e.g. "GET *" or '
                         '"PUT /api/*/lights/*/state"')
    method, path = parts
    if not _METHOD.fullmatch(method):
        raise ValueError(f"{text!r}: {method!r} is not an upper-case HTTP method or *")
    if path == "*":
        return Rule(text, method, re.compile(r".*", re.DOTALL))
    if not path.startswith("/") or _BAD_PATH_CHARS.search(path) or _dot_or_empty_segments(path):
        raise ValueError(f"{text!r}: the path must be * or start with / and have no empty, . or .. "
                         "segments, spaces, backslashes, ? or #")
    if "***" in path:
        raise ValueError(f"{text!r}: use * (within one segment) or ** (across segments)")
    pattern = "".join(".*" if token == "**" else "[^/]*" if token == "*" else re.escape(token)
                      for token in re.split(r"(\*\*|\*)", path) if token)
    return Rule(text, method, re.compile(pattern, re.DOTALL))


def request_path(target: str) -> str | None:
    """The path a request target names, percent-decoded, for matching; None when it cannot be
    matched safely (not origin- or absolute-form, undecodable, control characters, backslashes,
    or empty, . or .. segments, which a device might resolve to another path than the rule saw).
    The asterisk form (OPTIONS *) is "*"."""
    if target == "*":
        return "*"
    if not target.startswith("/"):
        parts = urllib.parse.urlsplit(target)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            return None
        target = parts.path or "/"
        if not target.startswith("/"):
            return None
    raw = target.split("?", 1)[0].split("#", 1)[0]
    try:
        path = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if re.search(r"[\x00-\x1f\x7f\\]", path) or _dot_or_empty_segments(path):
        return None
    return path


@dataclass(frozen=True)
class TokenGuard:
    max_failures: int
    window_ms: int
    block_seconds: int
    statuses: frozenset[int]
    failure_text: bytes = b""


def check_token_guard(value) -> TokenGuard:
    """The token_guard table (defaults filled in) -> TokenGuard; ValueError naming the key."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table, got {value!r}")
    unknown = set(value) - set(TOKEN_GUARD_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    v = {**TOKEN_GUARD_DEFAULTS, **value}
    for key, (low, high) in TOKEN_GUARD_BOUNDS.items():
        n = v[key]
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
            raise ValueError(f"{key}: expected an integer from {low} to {high}, got {n!r}")
    statuses = v["statuses"]
    if (not isinstance(statuses, list) or not statuses
            or not all(isinstance(s, int) and not isinstance(s, bool) and 400 <= s <= 599
                       for s in statuses)):
        raise ValueError(f"statuses: expected a list of HTTP error statuses (400-599), got {statuses!r}")
    text = v["failure_text"]
    if not isinstance(text, str) or len(text) > FAILURE_TEXT_MAX or not text.isprintable():
        raise ValueError(f"failure_text: expected printable text of at most {FAILURE_TEXT_MAX} "
                         f"characters, got {text!r}")
    return TokenGuard(v["max_failures"], v["window_ms"], v["block_seconds"], frozenset(statuses),
                      text.encode())


@dataclass(frozen=True)
class DecoyPolicy:
    type: str = "generic"        # the device's type, which the decoy imitates


def check_decoy(value) -> DecoyPolicy:
    """The decoy table -> DecoyPolicy; ValueError naming the key."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table like {{\"type\": \"camera\"}}, got {value!r}")
    unknown = set(value) - DECOY_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}")
    kind = value.get("type")
    if not isinstance(kind, str) or not DECOY_TYPE.fullmatch(kind):
        raise ValueError(f"type: expected a device type's name (letters, digits, _ and -), got {kind!r}")
    return DecoyPolicy(kind)


@dataclass(frozen=True)
class Policy:
    port: int                    # 0: none (a decoy alone)
    auth: bool = False
    allow: tuple[Rule, ...] | None = None        # None: no api_filter
    token_guard: TokenGuard | None = None
    device: str = ""
    decoy: DecoyPolicy | None = None             # None: no deception

    @property
    def gated(self) -> bool:
        """Whether a gate umbox stands in front of the device: without one the gate passes
        nothing (a file for the decoy alone must not open the device's web port)."""
        return self.auth or self.allow is not None or self.token_guard is not None

    def allows(self, method: str, path: str | None) -> bool:
        if self.allow is None:
            return True
        return path is not None and any(r.matches(method, path) for r in self.allow)

    @classmethod
    def from_json(cls, data) -> Policy:
        """A policy file's content -> Policy; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = set(data) - KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        decoy = None
        if data.get("decoy") is not None:
            try:
                decoy = check_decoy(data["decoy"])
            except ValueError as e:
                raise ValueError(f"decoy: {e}") from None
        gated = (data.get("auth", False) is not False or data.get("allow") is not None
                 or data.get("token_guard") is not None)
        port = data.get("port")
        if port is None and decoy is not None and not gated:
            port = 0            # a decoy alone: no web port for the gate
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port: {port!r}")
        auth = data.get("auth", False)
        if not isinstance(auth, bool):
            raise ValueError(f"auth: {auth!r}")
        allow = data.get("allow")
        rules = None
        if allow is not None:
            if not isinstance(allow, list) or len(allow) > MAX_RULES:
                raise ValueError(f"allow: expected a list of at most {MAX_RULES} rules")
            rules = tuple(compile_rule(r) for r in allow)
        guard = data.get("token_guard")
        device = data.get("device", "")
        if not isinstance(device, str):
            raise ValueError(f"device: {device!r}")
        return cls(port, auth, rules, check_token_guard(guard) if guard is not None else None, device,
                   decoy)


def _write(path: Path, text: str) -> None:
    """The file's whole content: os calls, at half pathlib's cost (a rule that moves 25
    cameras writes 25 of these before they are enforced)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


class PolicyFiles:
    """The directory of policy files. The data path writes and removes them (`write`,
    `remove`); the gate reads them (`load`), and so does the decoy (`read`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        # what this process last wrote, per address; None: it removed the file
        self._written: dict[str, str | None] = {}
        self._loaded: dict[str, tuple[bytes, Policy | None, str]] = {}   # (content, policy, why not)
        self._paths: dict[str, Path] = {}

    def path(self, ip: str) -> Path:
        """The address's file (ValueError if it is not an address). Kept: a posture change
        asks on the way to being enforced, and the parse and the join cost 20 us."""
        path = self._paths.get(ip)
        if path is None:
            if len(self._paths) >= 16384:
                self._paths.clear()
            path = self._paths[ip] = self.directory / f"{ipaddress.IPv4Address(ip)}.json"
        return path

    def write(self, ip: str, policy: dict) -> None:
        """Puts the device's policy in place in one step (OSError if it cannot)."""
        text = json.dumps(policy, sort_keys=True)
        if ip in self._written and self._written[ip] == text:
            return
        path = self.path(ip)
        if ip not in self._written:     # maybe as a previous process left it
            try:
                if path.read_text() == text:
                    self._written[ip] = text
                    return
            except (OSError, UnicodeDecodeError):
                pass
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            _write(tmp, text)
        except FileNotFoundError:       # the directory, made on the first write
            self.directory.mkdir(parents=True, exist_ok=True)
            _write(tmp, text)
        os.replace(tmp, path)
        self._written[ip] = text

    def remove(self, ip: str) -> None:
        if ip in self._written and self._written[ip] is None:
            return      # removed already: every apply of a device without a gate asks again
        try:
            self.path(ip).unlink()
        except FileNotFoundError:
            pass
        self._written[ip] = None

    def load(self, ip: str, port: int) -> tuple[Policy | None, str]:
        """(the device's policy for the gate's connections to `port`, "") or (None, why there
        is none): a file without a gate umbox (a decoy alone) is none."""
        policy, why = self.read(ip)
        if policy is None:
            return None, why
        path = self.path(ip)
        if not policy.gated:
            return None, f"policy file {path} has no gate umbox (auth, allow, token_guard)"
        if policy.port != port:
            return None, f"policy file {path} is for port {policy.port}, not {port}"
        return policy, ""

    def read(self, ip: str) -> tuple[Policy | None, str]:
        """(the device's policy file, whatever its port and umboxes, "") or (None, why there
        is none). The file is read every time (a few hundred bytes) and parsed again only when
        its content changed: no clock or inode number can make a change go unseen."""
        path = self.path(ip)
        try:
            raw = path.read_bytes()
        except OSError as e:
            self._loaded.pop(ip, None)
            return None, f"no policy file {path} ({e.strerror})"
        cached = self._loaded.get(ip)
        if cached is None or cached[0] != raw:
            try:
                cached = (raw, Policy.from_json(json.loads(raw)), "")
            except ValueError as e:      # (JSON and UTF-8 errors are ValueErrors)
                cached = (raw, None, f"unusable policy file {path}: {e}")
            if len(self._loaded) > 65_536:
                self._loaded.clear()
            self._loaded[ip] = cached
        return cached[1], cached[2]
