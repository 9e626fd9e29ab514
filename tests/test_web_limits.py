"""The page's limits per source address (open connections, failed logins), connections counted
until they really end (TLS handshakes and close_notify, clients that stop reading), and the
Origin check on state changes, against a real server on 127.0.0.1. Loopback answers the whole
127/8, so a client socket bound to 127.0.0.2 is a second source."""
import asyncio
import contextlib
import json
import socket
import ssl

import aiohttp
import pytest
import test_web
from microdot import Response
from test_web import PASSWORD, aiotest, csrf_of, login, served, set_admin

from appliance.faces.web import create_app, listening_socket, serve, server
from appliance.faces.web.http import route
from appliance.faces.web.server import ssl_context
from appliance.supervisor import accounts
from appliance.supervisor.ops import Ops

sup = test_web.sup      # the web tests' supervisor (real store, profiles, rules; fake data path)
A, B, C = "127.0.0.1", "127.0.0.2", "127.0.0.3"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def raw_from(source, port, data: bytes, timeout=5.0) -> bytes:
    """Sends bytes from `source` and returns what the server answers before it closes."""
    return await test_web.raw(port, data, timeout, source=source)


async def refused_at_once(source, port) -> bool:
    """A new connection from `source` is closed without an answer, well before REQUEST_SECONDS."""
    return await raw_from(source, port, HEALTHZ, timeout=2.0) == b""


async def served_ok(source, port) -> bool:
    return b" 200 " in (await raw_from(source, port, HEALTHZ))[:20]


async def hold(source, port, n, partial=b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
    """n connections from `source` that send part of a head and then nothing (a slow loris)."""
    held = []
    for _ in range(n):
        r, w = await asyncio.open_connection(A, port, local_addr=(source, 0))
        w.write(partial)
        held.append((r, w))
    await asyncio.sleep(0.2)
    return held


def close_all(held):
    for _, w in held:
        w.close()


async def until(predicate, seconds=3.0):
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@contextlib.asynccontextmanager
async def session(port, source=A, scheme="http"):
    """A browser-like client (cookies kept) whose connections come from `source`."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=False)
    async with aiohttp.ClientSession(f"{scheme}://{A}:{port}", connector=connector,
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as c:
        yield c


# -- open connections per source --------------------------------------------------------------

@aiotest
async def test_one_source_cannot_take_every_connection(sup):
    """The issue's case: 300 slow connections from one address, 60 real requests from another."""
    assert server.MAX_PER_SOURCE < server.MAX_CONNECTIONS
    async with served(sup) as (web, port):
        held = await hold(A, port, 300)
        try:
            assert web.open_count(A) == server.MAX_PER_SOURCE
            assert web.open_count() == server.MAX_PER_SOURCE
            assert await refused_at_once(A, port)
            answers = [await served_ok(B, port) for _ in range(60)]
            assert all(answers), f"{answers.count(False)} of 60 requests failed"
        finally:
            close_all(held)
        assert await until(lambda: web.open_count() == 0)
        assert await served_ok(A, port)            # its slots came back


@aiotest
async def test_the_global_cap_still_holds(sup, monkeypatch):
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(server, "MAX_PER_SOURCE", 3)
    async with served(sup) as (web, port):
        from_a = await hold(A, port, 3)
        assert await refused_at_once(A, port)                    # A is at its own cap
        from_b = await hold(B, port, 1)
        assert web.open_count() == 4
        assert await refused_at_once(C, port)                    # everyone's cap
        assert await refused_at_once(B, port)
        close_all(from_b)
        assert await until(lambda: web.open_count() == 3)
        assert await served_ok(C, port)
        close_all(from_a)


@aiotest
async def test_every_way_a_connection_ends_gives_its_slot_back(sup, monkeypatch):
    monkeypatch.setattr(server, "MAX_PER_SOURCE", 2)
    set_admin(sup)
    token = accounts.create_token(sup.store, "t", sup.now())[0]
    async with served(sup) as (web, port):
        held = await hold(A, port, 2)
        assert await refused_at_once(A, port)               # refused: never counted
        close_all(held)                                     # the client closes
        body = b"x" * (300 * 1024)
        for data in (HEALTHZ,                                                  # answered
                     b"NONSENSE\r\n\r\n",                                      # 400
                     b"POST /api/rules HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body):       # 413
            await raw_from(A, port, data)
        _, w = await asyncio.open_connection(A, port)      # goes away in the middle of its head
        w.write(b"GET /healthz HTTP/1.1\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()
        monkeypatch.setattr(server, "REQUEST_SECONDS", 0.3)
        answer = await raw_from(A, port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # stalls
        assert answer.startswith(b"HTTP/1.0 400")                               # cut off
        assert await until(lambda: web.open_count() == 0)
        # a live page that goes away, and one that is open when the server stops
        async with session(port) as c:
            h = {"Authorization": f"Bearer {token}"}
            gone = await c.get("/api/events", headers=h)
            assert gone.status == 200
            gone.close()
            for _ in range(100):                            # the writer notices the gone client
                if web.open_count() == 0:
                    break
                sup.notify({"kind": "panel", "event": "tick"})
                await asyncio.sleep(0.02)
            assert web.open_count() == 0
            live = await c.get("/api/events", headers=h)
            assert live.status == 200 and web.open_count(A) == 1
            assert await served_ok(A, port)                 # A's second slot
            await asyncio.wait_for(web.cleanup(), 3)
            assert web.open_count() == 0


@contextlib.asynccontextmanager
async def served_tls(sup, tmp_path):
    web = await serve(create_app(Ops(sup), tls=True), listening_socket(A, 0),
                      ssl_context(tmp_path / "tls"))
    try:
        yield web, web.addresses[0][1]
    finally:
        await web.cleanup()


def tls_get_and_keep_open(port, source, request=HEALTHZ):
    """A TLS client that reads its answer and the server's close_notify but never answers it
    (nor closes): returns the answer and whether the server then closed the TCP connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with socket.create_connection((A, port), timeout=5, source_address=(source, 0)) as s:
        def step(call, *args):
            while True:
                try:
                    result = call(*args)
                    s.sendall(outgoing.read())
                    return result
                except ssl.SSLWantReadError:
                    s.sendall(outgoing.read())
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("closed in the handshake") from None
                    incoming.write(data)
        step(tls.do_handshake)
        step(tls.write, request)
        answer = b""
        with contextlib.suppress(ssl.SSLZeroReturnError):       # the server's close_notify
            while chunk := step(tls.read, 65536):
                answer += chunk
        s.settimeout(3.0)
        try:
            closed = s.recv(65536) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        return answer, closed


@aiotest
async def test_a_tls_handshake_that_never_ends_holds_a_counted_connection(sup, tmp_path):
    """asyncio's start_server hands a TLS connection over only after its handshake: a client
    that never sends its hello would hold a file descriptor that no cap counts."""
    async with served_tls(sup, tmp_path) as (web, port):
        held = [await asyncio.open_connection(A, port, local_addr=(A, 0)) for _ in range(100)]
        try:
            assert await until(lambda: web.open_count(A) == server.MAX_PER_SOURCE)
            assert web.open_count() == server.MAX_PER_SOURCE
            answer, _ = await asyncio.to_thread(tls_get_and_keep_open, port, B)
            assert b" 200 " in answer[:20]
        finally:
            close_all(held)
        assert await until(lambda: web.open_count() == 0)


@aiotest
async def test_a_tls_client_that_ignores_close_notify_does_not_hold_its_connection(sup, tmp_path):
    """Closing a TLS connection waits for the client's close_notify (asyncio: up to 30 s): a
    client that never sends it would hold a file descriptor after its slot was given back."""
    async with served_tls(sup, tmp_path) as (web, port):
        answer, closed = await asyncio.to_thread(tls_get_and_keep_open, port, A)
        assert b" 200 " in answer[:20]
        assert closed, "the server kept the connection open"
        # asyncio's TLS layer tells the server's protocol a loop turn after the socket closes
        assert await until(lambda: web.open_count() == 0, seconds=1.0)


@aiotest
async def test_a_client_that_stops_reading_is_cut_off_with_its_connection(sup, monkeypatch):
    """A plain connection closed with its answer still buffered would wait to send it for as
    long as the client keeps the connection open, after its slot was given back."""
    monkeypatch.setattr(server, "WRITE_SECONDS", 0.3)
    set_admin(sup)
    h = b"Authorization: Bearer " + accounts.create_token(sup.store, "t", sup.now())[0].encode()
    app = create_app(Ops(sup), tls=False)
    size = 8 << 20

    async def big(request):
        return Response(b"x" * size)
    route(app, "GET", "/api/big", big)
    web = await serve(app, listening_socket(A, 0))
    loop = asyncio.get_running_loop()
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            await loop.sock_connect(s, web.addresses[0])
            await loop.sock_sendall(s, b"GET /api/big HTTP/1.1\r\nHost: x\r\n" + h + b"\r\n\r\n")
            await asyncio.sleep(1.0)                        # reads nothing: the server gives up
            assert await until(lambda: web.open_count() == 0)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while data := await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 3):
                    got += len(data)
            assert got < size                               # cut off, not sent in the end
    finally:
        await web.cleanup()


# -- failed logins per source ------------------------------------------------------------------

@aiotest
async def test_failed_logins_from_one_source_do_not_lock_out_another(sup):
    set_admin(sup)
    async with served(sup) as (_, port):
        async with session(port, B) as attacker:
            token = csrf_of(await (await attacker.get("/login")).text())
            for _ in range(5):
                r = await attacker.post("/login", data={"user": "admin", "password": "guess",
                                                        "csrf": token})
                assert r.status == 401
            r = await attacker.post("/login", data={"user": "admin", "password": PASSWORD,
                                                    "csrf": token}, allow_redirects=False)
            assert r.status == 429                        # B is locked out, even with the password
        async with session(port, A) as operator:
            await login(operator)                         # A is not


@aiotest
async def test_failed_tokens_from_one_source_do_not_lock_out_another(sup):
    set_admin(sup)
    good = {"Authorization": "Bearer " + accounts.create_token(sup.store, "ha", sup.now())[0]}
    bad = {"Authorization": "Bearer kalki_guess"}
    async with served(sup) as (_, port):
        async with session(port, B) as attacker:
            for _ in range(20):
                assert (await attacker.get("/api/devices", headers=bad)).status == 401
            assert (await attacker.get("/api/devices", headers=bad)).status == 429
        async with session(port, A) as ha:
            assert (await ha.get("/api/devices", headers=bad)).status == 401      # not 429
            assert (await ha.get("/api/devices", headers=good)).status == 200


# -- Origin on state changes -------------------------------------------------------------------

EVIL = "https://evil.example"
REFUSED = f"cross-origin request refused: Origin {EVIL} is not this gateway's"


@aiotest
async def test_a_foreign_origin_with_a_valid_token_is_refused(sup):
    set_admin(sup)
    h = {"Authorization": "Bearer " + accounts.create_token(sup.store, "ha", sup.now())[0]}
    async with served(sup) as (_, port):
        own = f"http://{A}:{port}"
        async with session(port) as c:
            def post(posture, **extra):
                return c.post("/api/devices/camera1/posture", json={"posture": posture},
                              headers={**h, **extra})
            for foreign in ({"Origin": EVIL},
                            {"Origin": f"http://{A}:{port + 1}"},            # another port
                            {"Origin": f"https://{A}:{port}"},               # another scheme
                            {"Origin": f"http://{B}:{port}"},                # another host
                            {"Referer": f"{EVIL}/attack.html"},              # no Origin: Referer
                            {"Origin": "null", "Sec-Fetch-Site": "cross-site"}):
                r = await post("attack", **foreign)
                assert r.status == 403, foreign
                assert "cross-origin request refused" in (await r.json())["error"], foreign
            r = await post("attack", Origin=EVIL)
            assert (await r.json()) == {"error": REFUSED}
            assert sup.posture("camera1") == "normal"
            r = await c.delete("/api/devices/camera1", headers={**h, "Origin": EVIL})
            assert r.status == 403 and "camera1" in sup.known
            r = await c.put("/api/settings", json={"timezone": "Europe/Berlin"},
                            headers={**h, "Origin": EVIL})
            assert r.status == 403 and sup.settings()["timezone"] == "UTC"
            # the same requests from the page itself, or from a client that sends no Origin
            assert (await post("suspicious", Origin=own)).status == 200
            assert sup.posture("camera1") == "suspicious"
            named = {"Host": f"kalki.local:{port}", "Origin": f"http://KALKI.local:{port}"}
            assert (await post("attack", **named)).status == 200        # by name, any case
            assert (await post("normal", Referer=f"{own}/devices/camera1")).status == 200
            assert (await post("suspicious")).status == 200                     # curl, HA
            assert sup.posture("camera1") == "suspicious"
            assert (await c.get("/api/devices", headers={**h, "Origin": EVIL})).status == 200


@aiotest
async def test_a_foreign_origin_with_a_valid_session_and_csrf_token_is_refused(sup):
    set_admin(sup)
    async with served(sup) as (_, port):
        own = f"http://{A}:{port}"
        async with session(port) as c:
            csrf = await login(c)
            form = {"posture": "attack", "csrf": csrf}
            r = await c.post("/devices/camera1/posture", data=form, headers={"Origin": EVIL},
                             allow_redirects=False)
            assert r.status == 403 and (await r.json()) == {"error": REFUSED}
            r = await c.post("/api/devices/camera1/posture", json={"posture": "attack"},
                             headers={"X-CSRF-Token": csrf, "Origin": EVIL})
            assert r.status == 403 and (await r.json()) == {"error": REFUSED}
            r = await c.post("/logout", data={"csrf": csrf}, headers={"Origin": EVIL},
                             allow_redirects=False)
            assert r.status == 403
            assert sup.posture("camera1") == "normal"
            # the page's own form: its Origin, or "null" from a browser that says it is
            # same-origin (what Chromium sends under the page's Referrer-Policy: no-referrer),
            # or "null" from a browser too old to say (the CSRF token still holds), or none
            for headers in ({"Origin": own}, {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
                            {"Origin": "null"}, {}):
                form["posture"] = "suspicious" if form["posture"] != "suspicious" else "attack"
                r = await c.post("/devices/camera1/posture", data=form, headers=headers,
                                 allow_redirects=False)
                assert r.status == 303, headers
                assert sup.posture("camera1") == form["posture"]
            r = await c.post("/api/devices/camera1/posture", json={"posture": "normal"},
                             headers={"X-CSRF-Token": csrf, "Origin": own})
            assert r.status == 200 and sup.posture("camera1") == "normal"


@aiotest
async def test_a_foreign_origin_cannot_log_in_or_claim(sup):
    async with served(sup) as (_, port):
        async with session(port) as c:
            sup.open_claim_window()
            token = csrf_of(await (await c.get("/claim")).text())
            claim = {"user": "admin", "password": PASSWORD, "confirm": PASSWORD, "csrf": token}
            r = await c.post("/claim", data=claim, headers={"Origin": EVIL}, allow_redirects=False)
            assert r.status == 403 and sup.store.get_setting("admin") is None
            r = await c.post("/claim", data=claim, allow_redirects=False)
            assert r.status == 303 and sup.store.get_setting("admin") is not None
            token = csrf_of(await (await c.get("/login")).text())
            r = await c.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": token},
                             headers={"Origin": EVIL}, allow_redirects=False)
            assert r.status == 403
            assert (await c.get("/", allow_redirects=False)).status == 303     # not logged in


@aiotest
async def test_with_tls_the_own_origin_is_https(sup, tmp_path):
    set_admin(sup)
    h = {"Authorization": "Bearer " + accounts.create_token(sup.store, "ha", sup.now())[0]}
    web = await serve(create_app(Ops(sup), tls=True), listening_socket(A, 0),
                      ssl_context(tmp_path / "tls"))
    port = web.addresses[0][1]
    try:
        async with session(port, scheme="https") as c:
            for origin, status in ((f"http://{A}:{port}", 403), (f"https://{A}:{port}", 200)):
                r = await c.post("/api/maintenance", json={"minutes": 5},
                                 headers={**h, "Origin": origin})
                assert r.status == status, (origin, json.dumps(await r.json()))
    finally:
        await web.cleanup()
    assert sup.maintenance_active()


@pytest.mark.parametrize("origin", ["http://127.0.0.1", "http://127.0.0.1:80"])
def test_the_default_port_is_the_same_origin(origin):
    from appliance.faces.web.http import same_origin
    assert same_origin(origin, "http", "127.0.0.1")
    assert same_origin(origin, "http", "127.0.0.1:80")
    assert not same_origin(origin, "https", "127.0.0.1")
    assert not same_origin(origin, "http", "127.0.0.1:8080")
    assert not same_origin(origin, "http", None)
    assert same_origin("http://[::1]:8080", "http", "[::1]:8080")
    assert not same_origin("http://x:notaport", "http", "x")
