"""Where each device is plugged in, as the hardware below the gateway tells it, and the one
thing that tells: two stations using one device's MAC (and so its address).

At the gateway a clone is invisible: its frames carry the victim's MAC and address, so every
packet it sends is counted against the victim, and a clone that attacks gets the victim
quarantined. Only the layer below sees two stations:

- a bridge's forwarding table (the Pi's own wired ports, or the lab's switch): the MAC moves
  to another port while the port it was on still has a link, or flaps between ports;
- hostapd's station events: one MAC associating again and again (two radios taking the
  association from each other).

`CloneDetector` judges sightings; `BridgeWatch` and `HostapdWatch` produce them. Both read the
hardware's own tools (`bridge monitor fdb`, hostapd's control socket) on the loop, and
`cut_port` switches a bridge port off, which stops the clone and leaves the victim alone.

What this is not: a way to tell the two stations apart at the gateway. Behind one Wi-Fi
access point there is no port to cut; the alert says so, and the victim's protection stays.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("kalki.stations")

MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
FLAP_MOVES = 2            # moves within the window that make a flap
HOSTAPD_ASSOCIATIONS = 3  # associations of one MAC within the window that make a clone


@dataclass(frozen=True)
class Clone:
    mac: str
    home_port: str          # where the MAC was first, the victim's port as far as anyone can tell
    other_port: str         # where it appeared too; "" when the hardware has no ports (Wi-Fi)
    why: str

    def words(self) -> str:
        return self.why


@dataclass
class _Seen:
    port: str
    moves: list[float] = field(default_factory=list)
    home: str = ""
    flagged_until: float = 0.0


class CloneDetector:
    """Judges (MAC, port) sightings. A move is innocent when the port the MAC left has lost its
    link (the device was plugged elsewhere); a move away from a port that is still up, or a
    flap between ports, is two stations with one MAC."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self._clock = clock
        self._seen: dict[str, _Seen] = {}
        self._associations: dict[str, list[float]] = {}

    def port_of(self, mac: str) -> str | None:
        seen = self._seen.get(mac)
        return seen.port if seen else None

    def known(self, mac: str, port: str) -> None:
        """A sighting from the table's first dump: where the MAC is, no move."""
        self._seen.setdefault(mac, _Seen(port, home=port))

    def forget(self, mac: str) -> None:
        self._seen.pop(mac, None)

    def moved(self, mac: str, port: str, left_port_up: Callable[[str], bool]) -> Clone | None:
        now = self._clock()
        seen = self._seen.get(mac)
        if seen is None:
            self._seen[mac] = _Seen(port, home=port)
            return None
        if seen.port == port:
            return None
        left, seen.port = seen.port, port
        seen.moves = [t for t in seen.moves if now - t < self.window] + [now]
        if seen.flagged_until > now:
            return None     # told already: the two keep taking the MAC from each other
        clone = None
        if left_port_up(left):
            home = seen.home if seen.home != port else left
            clone = Clone(mac, home, port, f"{mac} appeared on port {port} while port {left} "
                                           f"is still up: two stations use one identity")
        elif len(seen.moves) >= FLAP_MOVES:
            home = seen.home if seen.home != port else left
            clone = Clone(mac, home, port, f"{mac} moved between ports {left} and {port} "
                                           f"{len(seen.moves)} times within {self.window:g} s")
        if clone is None:
            seen.home = port    # a device plugged elsewhere: its new port is its own
            return None
        seen.flagged_until = now + self.window
        return clone

    def associated(self, mac: str, interface: str) -> Clone | None:
        now = self._clock()
        times = [t for t in self._associations.get(mac, []) if now - t < self.window] + [now]
        self._associations[mac] = times
        if len(times) >= HOSTAPD_ASSOCIATIONS:
            self._associations[mac] = []
            return Clone(mac, interface, "", f"{mac} associated {len(times)} times within "
                                             f"{self.window:g} s on {interface}: two radios "
                                             f"take the association from each other")
        return None


# ---------------------------------------------------------------- a bridge's forwarding table

def _in_namespace(namespace: str, argv: list[str]) -> list[str]:
    # nsenter switches only the network namespace; `ip netns exec` would also remount /sys.
    return ["nsenter", f"--net={namespace}", *argv] if namespace else argv


def parse_fdb_line(line: str, bridge: str) -> tuple[str, str, bool] | None:
    """(MAC, port, deleted) of a learnt entry in `bridge monitor fdb` output, or None for the
    bridge's own, permanent and foreign entries."""
    words = line.split()
    deleted = bool(words) and words[0] == "Deleted"
    if deleted:
        words = words[1:]
    if len(words) < 5 or words[1] != "dev" or "master" not in words:
        return None
    if words[words.index("master") + 1] != bridge or {"permanent", "static", "self"} & set(words):
        return None
    mac = words[0].lower()
    return (mac, words[2], deleted) if MAC.match(mac) else None


class BridgeWatch:
    """Follows `bridge monitor fdb` for one bridge, in the gateway's namespace or another
    (a path such as /run/netns/NAME), and reports moves to `on_clone` through the detector."""

    def __init__(self, bridge: str, namespace: str, detector: CloneDetector,
                 on_clone: Callable[[Clone, str | None], None], cut: bool = True):
        self.bridge = bridge
        self.namespace = namespace
        self.detector = detector
        self.on_clone = on_clone
        self.cut = cut
        self.fault: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(_in_namespace(self.namespace, argv), capture_output=True,
                              text=True, timeout=5)

    def port_up(self, port: str) -> bool:
        proc = self._run(["ip", "-j", "link", "show", "dev", port])
        if proc.returncode != 0:
            return False        # the port is gone
        try:
            flags = json.loads(proc.stdout)[0]["flags"]
        except (ValueError, LookupError):
            return False
        return "LOWER_UP" in flags and "UP" in flags

    def dump(self) -> None:
        proc = self._run(["bridge", "-j", "fdb", "show", "br", self.bridge])
        if proc.returncode != 0:
            raise OSError(f"bridge {self.bridge}: {proc.stderr.strip() or 'cannot read its table'}")
        for entry in json.loads(proc.stdout or "[]"):
            if entry.get("master") == self.bridge and not entry.get("state") \
                    and "self" not in entry.get("flags", []):
                self.detector.known(entry["mac"].lower(), entry["ifname"])

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while not self._closed:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *_in_namespace(self.namespace, ["bridge", "monitor", "fdb"]),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                await asyncio.to_thread(self.dump)
                self.fault = None
                assert self._proc.stdout is not None
                while line := await self._proc.stdout.readline():
                    await self._line(line.decode(errors="replace"))
                self.fault = f"bridge {self.bridge}: its monitor ended"
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                self.fault = f"bridge {self.bridge}: {e}"
            if self._proc and self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
            if not self._closed:
                log.warning("%s; watching again in 5 s", self.fault)
                await asyncio.sleep(5)

    async def _line(self, line: str) -> None:
        parsed = parse_fdb_line(line, self.bridge)
        if parsed is None:
            return
        mac, port, deleted = parsed
        if deleted:
            return      # aged out: where it shows up next is a move judged then
        previous = self.detector.port_of(mac)
        up = True
        if previous is not None and previous != port:
            up = await asyncio.to_thread(self.port_up, previous)
        clone = self.detector.moved(mac, port, lambda _left: up)
        if clone is None:
            return
        action = None
        if self.cut:
            action = await asyncio.to_thread(self.cut_port, clone.other_port)
        self.on_clone(clone, action)

    def cut_port(self, port: str) -> str:
        """Switches the port off (link down); says what was done."""
        proc = self._run(["ip", "link", "set", "dev", port, "down"])
        if proc.returncode == 0:
            return f"port {port} of bridge {self.bridge} switched off"
        return f"port {port} could not be switched off: {proc.stderr.strip() or 'refused'}"

    def close(self) -> None:
        self._closed = True
        if self._proc and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        if self._task:
            self._task.cancel()
            self._task = None


# ---------------------------------------------------------------- hostapd's station events

def parse_hostapd_event(message: bytes) -> tuple[str, str] | None:
    """('connected'|'disconnected', MAC) of an AP-STA-* event ("<3>AP-STA-CONNECTED mac ...")."""
    text = message.decode(errors="replace")
    if text.startswith("<") and ">" in text:
        text = text.split(">", 1)[1]
    words = text.split()
    if len(words) >= 2 and words[0] in ("AP-STA-CONNECTED", "AP-STA-DISCONNECTED") \
            and MAC.match(words[1].lower()):
        return ("connected" if words[0] == "AP-STA-CONNECTED" else "disconnected"), words[1].lower()
    return None


class HostapdWatch:
    """Attached to hostapd's control socket (ctrl_interface), read on the loop."""

    def __init__(self, control_path: str, detector: CloneDetector,
                 on_clone: Callable[[Clone, str | None], None], local_dir: str = "/run/kalki"):
        self.control_path = control_path
        self.interface = os.path.basename(control_path)
        self.detector = detector
        self.on_clone = on_clone
        self.local_dir = local_dir
        self.fault: str | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local = ""

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Attaches (hostapd answers at once; 2 s at most) and reads on `loop`."""
        self._loop = loop or asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._local = os.path.join(self.local_dir, f"hostapd-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._local)
        try:
            sock.bind(self._local)
            sock.connect(self.control_path)
            sock.settimeout(2)
            sock.send(b"ATTACH")
            if sock.recv(64).strip() != b"OK":
                raise OSError("hostapd refused ATTACH")
        except OSError as e:
            sock.close()
            self.fault = f"hostapd {self.control_path}: {e}"
            raise
        sock.setblocking(False)
        self._sock = sock
        self._loop.call_soon_threadsafe(self._loop.add_reader, sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                message = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError as e:
                self.fault = f"hostapd {self.control_path}: {e}"
                self.close()
                return
            event = parse_hostapd_event(message)
            if event and event[0] == "connected":
                clone = self.detector.associated(event[1], self.interface)
                if clone:
                    self.on_clone(clone, None)

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            with contextlib.suppress(OSError):
                self._sock.send(b"DETACH")
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._local)
