"""A device's MUD file fetched from its MUD URL (appliance.policy.mudfetch), against the lab's
MUD file server (lab.mudserver) run in-process on 127.0.0.1 with a test CA: signatures that
verify, are missing, or fail; a file naming another URL; http; too large; too slow. Then the
supervisor's side: a DHCP lease with a MUD URL, the file offered on the device (fetched off the
loop), and approval with the offered type, which installs it. No root, loopback only."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
from fakes import supervisor

from appliance import config
from appliance.errors import ConfigError
from appliance.policy import mud, mudfetch
from appliance.supervisor.ops import Ops
from lab.mudserver import MudServer, TestCA, sign

LAMP = json.loads((Path(__file__).parent / "data" / "mud" / "mood_lamp-3204432Mud.json").read_text())
SIGNER = "CN=Kalki lab MUD signer,O=Kalki lab"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def server(ca, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    with MudServer(files, ca) as s:
        yield s


def publish(server, ca, name="mood-lamp.json", signed=True, url=None, **extra) -> str:
    """The lamp's MUD file on the server under `name` (its mud-url the URL served, unless
    `url`), signed by the lab's signer; returns its URL."""
    doc = json.loads(json.dumps(LAMP))
    doc["ietf-mud:mud"]["mud-url"] = url or server.url(name)
    if signed:
        doc["ietf-mud:mud"]["mud-signature"] = name.removesuffix(".json") + ".p7s"
    doc["ietf-mud:mud"].update(extra)
    path = server.directory / name
    path.write_text(json.dumps(doc, indent=1))
    if signed:
        sign(path, *ca.signer())
    return server.url(name)


def refused(url, ca, match, timeout=5.0, ca_file=None):
    with pytest.raises(mudfetch.MudFetchError, match=match) as e:
        mudfetch.fetch(url, str(ca.cert_path) if ca_file is None else ca_file, timeout)
    assert url.split("/")[2] in str(e.value) or "only https" in str(e.value)     # names the URL
    return str(e.value)


def test_a_signed_file_is_verified_and_names_its_signer(server, ca):
    url = publish(server, ca)
    got = mudfetch.fetch(url, str(ca.cert_path), 5)
    assert got.signature == f"verified by {SIGNER}" and got.signer == SIGNER
    assert got.signature_url == server.url("mood-lamp.p7s")
    assert got.type_name == "mood-lamp" and got.cache_hours == 100      # the file's cache-validity
    assert mud.parse_mud(got.text, url).mud_url == url
    assert server.requests == ["/mood-lamp.json", "/mood-lamp.p7s"]


def test_a_file_without_a_signature_is_offered_as_such(server, ca):
    got = mudfetch.fetch(publish(server, ca, signed=False), str(ca.cert_path), 5)
    assert got.signature == "no signature published" and got.signer is None


def test_a_file_changed_after_signing_is_refused(server, ca):
    url = publish(server, ca)
    path = server.directory / "mood-lamp.json"
    path.write_text(path.read_text().replace('"cache-validity": 100', '"cache-validity": 99'))
    assert "content verify error" in refused(url, ca, "signature does not verify")


def test_a_signature_from_a_ca_not_trusted_is_refused(server, ca, tmp_path):
    url = publish(server, ca)
    other = TestCA(tmp_path / "other-ca", "someone else")
    sign(server.directory / "mood-lamp.json", *other.signer())
    refused(url, ca, "signature does not verify: .*(unable to get local issuer|certificate verify)")


def test_a_signature_named_but_not_served_is_refused(server, ca):
    url = publish(server, ca)
    (server.directory / "mood-lamp.p7s").unlink()
    refused(url, ca, r"mood-lamp.p7s: the signature was not served: HTTP 404")


def test_a_file_naming_another_mud_url_is_refused(server, ca):
    url = publish(server, ca, url="https://elsewhere.example/mood-lamp.json")
    refused(url, ca, "mud-url is https://elsewhere.example/mood-lamp.json, not the URL it was fetched from")


def test_http_and_other_schemes_are_refused_before_any_connection(ca):
    for url in ("http://127.0.0.1:9/mud.json", "ftp://127.0.0.1/mud.json", "file:///etc/passwd", "mud.json"):
        with pytest.raises(mudfetch.MudFetchError, match="only https URLs are") as e:
            mudfetch.fetch(url, str(ca.cert_path), 1)
        assert url in str(e.value)


def test_a_redirect_to_http_is_refused(server, ca):
    url = publish(server, ca)
    server.redirect["/moved.json"] = url.replace("https://", "http://")
    refused(server.url("moved.json"), ca, "redirected to http://.*not https: refused")


def test_a_server_the_trust_store_does_not_know_is_refused(server, ca):
    url = publish(server, ca)
    refused(url, ca, "certificate does not verify", ca_file="")        # the system's trust store


def test_a_file_over_a_megabyte_is_refused(server, ca):
    url = publish(server, ca, systeminfo="x" * mudfetch.MAX_BYTES)
    refused(url, ca, f"at most {mudfetch.MAX_BYTES} are fetched: refused")


def test_a_server_that_does_not_answer_in_time_is_given_up(server, ca):
    url = publish(server, ca)
    server.delay["/mood-lamp.json"] = 3
    started = time.monotonic()
    refused(url, ca, "did not arrive within 1 s", timeout=1)
    assert time.monotonic() - started < 2


def test_the_timeout_is_for_the_whole_fetch_not_each_read(server, ca):
    server.drip["/slow.json"] = 0.2       # a byte every 0.2 s: no single read waits 1 s
    started = time.monotonic()
    refused(server.url("slow.json"), ca, "did not arrive within 1 s", timeout=1)
    assert time.monotonic() - started < 2


def test_a_file_the_importer_refuses_is_not_offered(server, ca):
    url = publish(server, ca, signed=False, extensions=["vendor-magic"])
    refused(url, ca, r"mud\.extensions: unsupported")


def test_the_cache_keeps_what_was_fetched_for_its_cache_validity(server, ca, tmp_path):
    url = publish(server, ca)
    cache = tmp_path / "mud-cache"
    first = mudfetch.fetch_cached(url, cache, str(ca.cert_path), 5)
    again = mudfetch.fetch_cached(url, cache, str(ca.cert_path), 5)
    assert again == first and server.requests == ["/mood-lamp.json", "/mood-lamp.p7s"]
    assert mudfetch.cached(cache, url) == first and mudfetch.cached(cache, url + "x") is None


def test_the_importer_says_what_was_checked_of_a_fetched_file():
    doc = json.loads(json.dumps(LAMP))
    doc["ietf-mud:mud"]["mud-signature"] = "https://mood_lamp-3204432.com/sig.p7s"
    text = json.dumps(doc)
    assert any("it is not checked here" in n for n in mud.parse_mud(text, "lamp.json").notes)
    notes = mud.parse_mud(text, "lamp.json", signature=f"verified by {SIGNER}").notes
    assert notes[0] == f"fetched from its MUD URL over HTTPS; signature: verified by {SIGNER}"
    assert not any("not checked" in n for n in notes)


# -- the configuration ----------------------------------------------------------------------
def test_the_mud_section_is_off_by_default_and_checked(tmp_path, ca):
    assert (config.Config().mud.fetch, config.Config().mud.ca_file) == (False, "")
    assert "[mud]" in config.defaults_toml() and "ca_file" in config.defaults_toml()
    path = tmp_path / "kalki.toml"
    path.write_text(f'[mud]\nfetch = true\nca_file = "{ca.cert_path}"\ntimeout_seconds = 5\n')
    assert config.load(path).mud.fetch is True
    for text, match in (('[mud]\nca_file = "/nonexistent/ca.pem"\n', r"mud\.ca_file: /nonexistent/ca\.pem"),
                        (f'[mud]\nca_file = "{path}"\n', r"mud\.ca_file: .*a PEM file"),
                        ("[mud]\ntimeout_seconds = 0\n", r"mud\.timeout_seconds: expected 1 to 120"),
                        ('[mud]\nfetch = "yes"\n', r"mud\.fetch: expected bool"),
                        ("[mud]\nfetsch = true\n", r"unknown key.*fetsch")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            config.load(path)


# -- the supervisor: offered at approval -------------------------------------------------------
MAC = "02:4b:00:00:00:41"


def lamp_sup(tmp_path, ca, fetch=True):
    sup = supervisor(tmp_path)
    sup.cfg.mud.fetch, sup.cfg.mud.ca_file, sup.cfg.mud.timeout_seconds = fetch, str(ca.cert_path), 5
    return sup


async def _settled(sup, name, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (sup.known[name].get("mud_offer") or {}).get("state") in (None, "fetching"):
        assert time.monotonic() < deadline, sup.known[name]
        await asyncio.sleep(0.02)
    return sup.known[name]["mud_offer"]


def lease(ops, url, mac=MAC, ip="198.18.0.41") -> str:
    ops.dhcp_lease("add", mac=mac, ip=ip, identity={"hostname": "lamp", "mud_url": url})
    return next(n for n, d in ops._sup.known.items() if d["mac"] == mac)


def test_a_new_device_s_mud_file_is_fetched_off_the_loop_and_offered_at_approval(server, ca, tmp_path):
    url = publish(server, ca)
    server.delay["/mood-lamp.json"] = 0.5
    sup = lamp_sup(tmp_path, ca)
    ops = Ops(sup)

    async def run():
        sup.loop = asyncio.get_running_loop()
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        name = lease(ops, url)
        assert time.monotonic() - started < 0.3          # the lease is answered before the fetch
        assert ops.device_show(name)["mud_offer"]["state"] == "fetching"
        offer = await _settled(sup, name)
        ticker.cancel()
        assert ticks >= 20                                # the loop ran on while it fetched
        return name, offer

    name, offer = asyncio.run(run())
    assert offer["state"] == "offered" and offer["type"] == "mood-lamp"
    assert offer["signature"] == f"verified by {SIGNER}" and offer["url"] == url
    shown = ops.device_show(name)
    assert shown["suggested_type"] == "mood-lamp" and shown["mud_offer"] == offer
    assert "mood-lamp" not in sup.profiles                # offered, not installed
    assert (sup.mud_cache / mudfetch.cache_path(sup.mud_cache, url).name).exists()
    # approval with the offered type installs it (profile_import's path) and approves
    ops.device_approve(name, "mood-lamp")
    assert sup.known[name]["type"] == "mood-lamp" and sup.known[name]["approved"]
    installed = sup.profiles["mood-lamp"]
    assert installed.installed and installed.mud_url == url
    header = installed.path.read_text()
    assert f"signature: verified by {SIGNER}" in header and "not checked here" not in header
    audit = {a.get("event"): a for a in sup.store.decisions(kind="audit", limit=50)}
    assert audit["mud-fetch"]["details"]["state"] == "offered" and "profile-import" in audit
    sup.store.close()


def test_a_refused_mud_file_is_recorded_on_the_device_and_not_offered(server, ca, tmp_path):
    url = publish(server, ca, url="https://elsewhere.example/mood-lamp.json")
    sup = lamp_sup(tmp_path, ca)
    ops = Ops(sup)

    async def run():
        sup.loop = asyncio.get_running_loop()
        name = lease(ops, url)
        return name, await _settled(sup, name)

    name, offer = asyncio.run(run())
    assert offer["state"] == "failed" and "not the URL it was fetched from" in offer["error"]
    assert ops.device_show(name).get("suggested_type") != "mood-lamp"
    with pytest.raises(ConfigError, match="type: expected one of"):
        ops.device_approve(name, "mood-lamp")
    assert not mudfetch.cache_path(sup.mud_cache, url).exists()
    # the same lease again within the retry time: not fetched again
    requests = len(server.requests)
    lease(ops, url)
    assert len(server.requests) == requests
    sup.store.close()


def test_an_installed_profile_for_the_url_is_suggested_and_nothing_is_fetched(server, ca, tmp_path):
    url = publish(server, ca)
    sup = lamp_sup(tmp_path, ca)
    ops = Ops(sup)
    ops.profile_import((server.directory / "mood-lamp.json").read_text(), "lamp.json", type="my-lamp")

    async def run():
        sup.loop = asyncio.get_running_loop()
        name = lease(ops, url)
        await asyncio.sleep(0.2)
        return name

    name = asyncio.run(run())
    assert sup.suggestions[name] == "my-lamp" and server.requests == []
    assert not sup.known[name].get("mud_offer")
    sup.store.close()


def test_with_fetch_off_nothing_is_fetched(server, ca, tmp_path):
    url = publish(server, ca)
    sup = lamp_sup(tmp_path, ca, fetch=False)

    async def run():
        sup.loop = asyncio.get_running_loop()
        name = lease(Ops(sup), url)
        await asyncio.sleep(0.2)
        return name

    name = asyncio.run(run())
    assert server.requests == [] and not sup.known[name].get("mud_offer")
    assert sup.known[name]["identity"]["mud_url"] == url        # still recorded
    sup.store.close()


def test_an_offer_outlives_a_restart(server, ca, tmp_path):
    url = publish(server, ca, signed=False)
    sup = lamp_sup(tmp_path, ca)

    async def run():
        sup.loop = asyncio.get_running_loop()
        name = lease(Ops(sup), url)
        return name, await _settled(sup, name)

    name, offer = asyncio.run(run())
    assert offer["signature"] == "no signature published"
    sup.store.close()
    again = lamp_sup(tmp_path, ca)
    try:
        ops = Ops(again)
        assert ops.device_show(name)["suggested_type"] == "mood-lamp"
        ops.device_approve(name, "mood-lamp")         # from the cache: the server is not asked
        assert again.known[name]["type"] == "mood-lamp" and len(server.requests) == 1
        assert "signature: no signature published" in again.profiles["mood-lamp"].path.read_text()
    finally:
        again.store.close()


def test_the_cache_keeps_a_bounded_number_of_files(monkeypatch, tmp_path):
    monkeypatch.setattr(mudfetch, "MAX_CACHED", 2)
    got = mudfetch.Fetched("https://a.example/x", "{}", mudfetch.NO_SIGNATURE, None, None, "x",
                           "2026-01-01T00:00:00+00:00", 48)
    for i in range(4):
        mudfetch.save(tmp_path, dataclasses.replace(got, url=f"https://a.example/{i}"))
        time.sleep(0.01)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
        mudfetch.cache_path(tmp_path, f"https://a.example/{i}").name for i in (2, 3))


def test_a_fetch_cut_short_by_a_restart_is_done_again_at_the_next_sighting(server, ca, tmp_path):
    url = publish(server, ca, signed=False)
    sup = lamp_sup(tmp_path, ca)
    name = lease(Ops(sup), url)              # no loop: nothing fetched
    sup._update_device(name, mud_offer={"url": url, "state": "fetching", "at": "2026-01-01T00:00:00"})
    sup.store.close()
    again = lamp_sup(tmp_path, ca)

    async def run():
        again.loop = asyncio.get_running_loop()
        lease(Ops(again), url)               # the same lease, renewed
        return await _settled(again, name)

    try:
        assert asyncio.run(run())["state"] == "offered" and server.requests == ["/mood-lamp.json"]
    finally:
        again.store.close()


def test_the_page_preselects_the_offered_type_and_says_what_was_checked():
    from appliance.faces.web import views

    class FakeOps:
        def profile_types(self):
            return ["camera", "generic"]
    html = views.type_select(FakeOps(), "mood-lamp")
    assert '<option value="mood-lamp" selected>mood-lamp (from its MUD file)</option>' in html
    assert "(from its MUD file)" not in views.type_select(FakeOps(), "camera")
    offer = {"url": "https://m.example/l.json", "state": "offered", "type": "mood-lamp",
             "signature": f"verified by {SIGNER}"}
    assert views.mud_offer_text(offer) == (f"offered as type mood-lamp: verified by {SIGNER} "
                                           "(https://m.example/l.json)")
    assert views.mud_offer_text({"state": "failed", "error": "x: signature does not verify: y"}) == \
        "not offered: x: signature does not verify: y"
