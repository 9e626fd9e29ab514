"""The devices' name server: a thin front on the device side's port 53, before dnsmasq.

dnsmasq still resolves and caches; this front passes each query on to it and, before the
answer goes back to the device, hands the answer's addresses to the data path
(Dataplane.answer), which binds them for that device if its profile names them. So:
- every answer is seen, from dnsmasq's cache as well as fresh (dnsmasq's own nftset/ipset
  hooks fire only on cache misses, and Debian's dnsmasq drops CAP_NET_ADMIN, so its set
  writes can fail silently);
- the binding is in the kernel before the device can connect;
- a CNAME chain is followed from the question to the addresses;
- a device's DNS to any other resolver is redirected here by nftables (chain "resolver").

A bad packet is counted and dropped (a query) or passed on unbound (an answer: the device's
connection then meets the closed default, never an open one). The front is threads, not the
supervisor's loop, so a busy loop does not delay a lookup.
"""
from __future__ import annotations

import collections
import logging
import selectors
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable

from dnslib import QTYPE, DNSRecord

log = logging.getLogger("kalki.resolver")

MAX_CHAIN = 16              # CNAMEs followed from the question
PENDING_S = 10.0            # a query dnsmasq has not answered by then is forgotten
MAX_PENDING = 4096
MAX_TCP_CLIENTS = 64
TCP_IDLE_S = 10.0

# (device address, [question, cname, ...], [addresses], ttl) -> bound?
OnAnswer = Callable[[str, list[str], list[str], int], bool]


def _name(label) -> str:
    return str(label).lower().rstrip(".")


def read_answer(wire: bytes) -> tuple[list[str], list[str], int] | None:
    """([question, CNAME targets...], [IPv4 addresses], ttl) of an answer, or None when its
    question is not for IPv4 addresses. Only the chain from the question counts: records for
    other names in the same answer are ignored. Raises DNSError (or another error on
    garbage) when the wire is not a DNS message."""
    msg = DNSRecord.parse(wire)
    if not msg.questions or msg.q.qtype != QTYPE.A:
        return None
    current = _name(msg.q.qname)
    chain, ttls = [current], []
    for _ in range(MAX_CHAIN):
        cname = next((r for r in msg.rr if r.rtype == QTYPE.CNAME and _name(r.rname) == current), None)
        if cname is None:
            break
        ttls.append(cname.ttl)
        current = _name(cname.rdata.label)
        chain.append(current)
    addresses = [str(r.rdata) for r in msg.rr if r.rtype == QTYPE.A and _name(r.rname) == current]
    if not addresses:
        return chain, [], 0
    ttls += [r.ttl for r in msg.rr if r.rtype == QTYPE.A and _name(r.rname) == current]
    return chain, addresses, min(ttls)


class Resolver:
    """Listens on (listen_ip, port), UDP and TCP; forwards to dnsmasq at `upstream`."""

    def __init__(self, listen_ip: str, upstream: tuple[str, int], on_answer: OnAnswer,
                 port: int = 53, namespace: str | None = None):
        self.listen = (listen_ip, port)
        self.upstream = upstream
        self.on_answer = on_answer
        self.namespace = namespace
        self.counts: collections.Counter = collections.Counter()
        self._pending: dict[int, tuple[tuple, bytes, float]] = {}
        self._next_id = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._up: socket.socket | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._tcp_clients = threading.BoundedSemaphore(MAX_TCP_CLIENTS)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> Resolver:
        """Listens now, or raises OSError (leaving nothing open)."""
        from appliance import netns
        try:
            with netns.entered(self.namespace):
                self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._udp.bind(self.listen)
                self._up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._up.connect(self.upstream)
                self._tcp = _TcpServer(self.listen, _TcpHandler)
                self._tcp.front = self
        except OSError:
            for s in (self._udp, self._up):
                if s:
                    s.close()
            self._udp = self._up = self._tcp = None
            raise
        self._threads = [threading.Thread(target=self._udp_loop, name="resolver-udp", daemon=True),
                         threading.Thread(target=self._tcp.serve_forever, kwargs={"poll_interval": 0.5},
                                          name="resolver-tcp", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def start_when_possible(self, retry_s: float = 2.0) -> Resolver:
        """Starts now or, while the devices' address is not up yet (a boot where the
        interface comes late), keeps trying; until then devices resolve nothing."""
        def run() -> None:
            said = False
            while not self._stop.is_set():
                try:
                    self.start()
                    if said:
                        log.warning("the devices' resolver listens on %s:%d now", *self.listen)
                    return
                except OSError as e:
                    if not said:
                        log.error("the devices' resolver cannot listen on %s:%d yet (%s): retrying",
                                  *self.listen, e)
                        said = True
                    self._stop.wait(retry_s)
        threading.Thread(target=run, name="resolver-start", daemon=True).start()
        return self

    def close(self) -> None:
        """Stops answering; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._tcp and self._threads:
            self._tcp.shutdown()
        if self._tcp:
            self._tcp.server_close()
        for t in self._threads:
            t.join(timeout=2)
        for s in (self._udp, self._up):
            if s:
                s.close()

    # -- answers --------------------------------------------------------------------------
    def _bind(self, client_ip: str, wire: bytes) -> None:
        """Hands the answer to the data path; whatever goes wrong, the answer still goes on."""
        try:
            read = read_answer(wire)
        except Exception as e:      # noqa: BLE001 - whatever garbage raises, the answer goes on
            self.counts["unparsable-answer"] += 1
            log.debug("answer for %s not understood: %s", client_ip, e)
            return
        if read is None:
            self.counts["not-ipv4"] += 1
            return
        chain, addresses, ttl = read
        if not addresses:
            self.counts["no-address"] += 1
            return
        try:
            bound = self.on_answer(client_ip, chain, addresses, ttl)
        except Exception:       # the lookup must be answered; the binding is what failed
            self.counts["bind-failed"] += 1
            log.exception("binding %s for %s failed", chain[0], client_ip)
            return
        self.counts["bound" if bound else "refused"] += 1

    # -- UDP ------------------------------------------------------------------------------
    def _udp_loop(self) -> None:
        assert self._udp and self._up
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "client")
        sel.register(self._up, selectors.EVENT_READ, "upstream")
        last_purge = time.monotonic()
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.5):
                try:
                    if key.data == "client":
                        self._from_client(*self._udp.recvfrom(65535))
                    else:
                        self._from_upstream(self._up.recv(65535))
                except OSError as e:
                    if self._stop.is_set():
                        return
                    self.counts["socket-error"] += 1
                    log.debug("resolver socket: %s", e)
            if time.monotonic() - last_purge > 1.0:
                last_purge = time.monotonic()
                old = last_purge - PENDING_S
                for qid in [q for q, (_, _, t) in self._pending.items() if t < old]:
                    del self._pending[qid]
                    self.counts["upstream-timeout"] += 1
        sel.close()

    def _from_client(self, data: bytes, addr) -> None:
        if len(data) < 12:
            self.counts["malformed-query"] += 1
            return
        if len(self._pending) >= MAX_PENDING:
            self.counts["overloaded"] += 1
            return
        for _ in range(65536):       # an id no query in flight has
            self._next_id = (self._next_id + 1) & 0xFFFF
            if self._next_id not in self._pending:
                break
        qid = self._next_id
        self._pending[qid] = (addr, data[:2], time.monotonic())
        assert self._up
        self._up.send(struct.pack("!H", qid) + data[2:])
        self.counts["queries"] += 1

    def _from_upstream(self, data: bytes) -> None:
        if len(data) < 12:
            self.counts["malformed-answer"] += 1
            return
        pending = self._pending.pop(struct.unpack("!H", data[:2])[0], None)
        if pending is None:
            self.counts["unexpected-answer"] += 1
            return
        addr, original_id, _ = pending
        self._bind(addr[0], data)
        assert self._udp
        self._udp.sendto(original_id + data[2:], addr)


class _TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    front: Resolver


def _read_message(sock: socket.socket) -> bytes | None:
    head = _read_exactly(sock, 2)
    if head is None:
        return None
    return _read_exactly(sock, struct.unpack("!H", head)[0])


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _TcpHandler(socketserver.BaseRequestHandler):
    """DNS over TCP (RFC 7766): several queries per connection, one upstream connection."""

    def handle(self) -> None:
        front: Resolver = self.server.front     # type: ignore[attr-defined]
        if not front._tcp_clients.acquire(blocking=False):
            front.counts["tcp-refused"] += 1
            return
        try:
            self.request.settimeout(TCP_IDLE_S)
            with socket.create_connection(front.upstream, timeout=PENDING_S) as up:
                while True:
                    query = _read_message(self.request)
                    if query is None:
                        return
                    front.counts["queries"] += 1
                    up.sendall(struct.pack("!H", len(query)) + query)
                    answer = _read_message(up)
                    if answer is None:
                        return
                    front._bind(self.client_address[0], answer)
                    self.request.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            front.counts["tcp-error"] += 1
        finally:
            front._tcp_clients.release()
