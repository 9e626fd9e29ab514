"""Destinations by name without a kernel: the profile syntax, the answer parser and the
binding bookkeeping over a dict-backed table and a fake clock (tests/test_names.py runs the
same through real dnsmasq and XDP)."""
import dns.message
import dns.rrset
import pytest
from dnslib import DNSError
from fakes import FakeTable

from appliance.dataplane import umbox
from appliance.dataplane.names import NameBindings
from appliance.dataplane.resolver import Resolver, read_answer
from appliance.errors import ConfigError


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t

    def mono_ns(self):
        return int(self.t * 1e9)


def names(*entries):
    return umbox.compile_stack({"allowlist": {"destinations": list(entries)}}).names


@pytest.fixture
def book():
    clock = Clock()
    b = NameBindings(FakeTable(), grace_s=60, keep_s=600, clock=clock, mono_ns=clock.mono_ns)
    b.clock = clock
    b.set_device(1, "cam", "02:00:00:00:00:01", names("*.camera.example:443/tcp", "pool.ntp.org:123/udp"))
    return b


def test_profile_destinations_by_name_address_and_lan():
    c = umbox.compile_stack({"allowlist": {"destinations": [
        "Cloud.Example.com.:443/tcp", "*.tplinkcloud.com",
        {"name": "pool.ntp.org", "proto": "udp", "port": 123},
        "198.19.8.0/24", "lan:6668/tcp", {"lan": True, "proto": "udp", "port": 6667}]}})
    assert [(d.name, d.proto, d.port) for d in c.names] == [
        ("cloud.example.com", 6, 443), ("*.tplinkcloud.com", 0, 0), ("pool.ntp.org", 17, 123)]
    assert [(str(d.network), d.lan) for d in c.destinations] == [
        ("198.19.8.0/24", False), ("None", True), ("None", True)]
    wild = c.names[1]
    assert wild.matches_name("n-devs.tplinkcloud.com") and not wild.matches_name("tplinkcloud.com")
    assert not wild.matches_name("eviltplinkcloud.com")


@pytest.mark.parametrize("entry, message", [
    ("*.com", "neither an address"),
    ("bad_name!.example", "neither an address"),
    ("-lead.example", "neither an address"),
    ("a.*.example", "neither an address"),
    ({"name": "x.example", "address": "198.19.8.1"}, "exactly one of address, name, lan, controller"),
    ({"lan": False}, "lan must be true"),
    ({"name": 7}, "name must be a string"),
    ("x.example:80/icmp", "a port needs proto tcp or udp"),
    ("198.19.8.1/gre", "invalid address or CIDR"),
])
def test_bad_name_destinations_name_the_culprit(entry, message):
    with pytest.raises(ConfigError, match=message):
        umbox.compile_stack({"allowlist": {"destinations": [entry]}}, where="camera.toml: ")


def test_an_answer_binds_for_ttl_plus_grace(book):
    assert book.answer(1, ["cloud.camera.example", "edge.cdn.net"], ["198.19.64.10"], ttl=30)
    value = book._table.lookup(book._key(1, "198.19.64.10"))
    assert (value.count, value.rules[0].proto, value.rules[0].port) == (1, 6, 443)
    assert value.expires_ns == book.clock.mono_ns() + 90 * 10**9        # TTL 30 + grace 60
    assert value.keep_s == 600
    book.clock.t += 89
    assert book.expire() == 0
    book.clock.t += 2
    assert book.expire() == 1
    assert book._table.lookup(book._key(1, "198.19.64.10")) is None


def test_a_flow_the_kernel_saw_keeps_the_binding(book):
    book.answer(1, ["cloud.camera.example"], ["198.19.64.10"], ttl=30)
    key = book._key(1, "198.19.64.10")
    book.clock.t += 100
    stretched = book._table.lookup(key)
    stretched.expires_ns = book.clock.mono_ns() + 500 * 10**9      # as XDP does on a new flow
    book._table.update(key, stretched)
    assert book.expire() == 0
    assert book.of_device(1)["bound"][0]["expires_in_s"] == 500


def test_a_name_the_profile_does_not_give_is_refused_and_counted(book):
    assert not book.answer(1, ["evil.example"], ["198.19.64.66"], ttl=30)
    assert not book.answer(1, ["evil.example"], ["198.19.64.66"], ttl=30)
    assert book._table.keys() == []
    assert book.of_device(1)["refused"] == {"evil.example": 2}
    assert not book.answer(7, ["cloud.camera.example"], ["198.19.64.10"], ttl=30)   # not a device
    assert book.counts["not-a-device"] == 1


def test_a_cname_into_an_allowed_name_binds_and_a_later_answer_is_followed(book):
    assert book.answer(1, ["cdn-alias.example", "api.camera.example"], ["198.19.64.11"], ttl=30)
    assert book.answer(1, ["api.camera.example"], ["198.19.64.12"], ttl=30)    # a new address
    assert [b["address"] for b in book.of_device(1)["bound"]] == ["198.19.64.11", "198.19.64.12"]


def test_a_posture_change_re_derives_the_rules(book):
    book.answer(1, ["cloud.camera.example"], ["198.19.64.10"], ttl=30)
    key = book._key(1, "198.19.64.10")
    book.set_device(1, "cam", "02:00:00:00:00:01", names("cloud.camera.example:8883/tcp"))
    value = book._table.lookup(key)
    assert (value.count, value.rules[0].port) == (1, 8883)
    book.set_device(1, "cam", "02:00:00:00:00:01", names("pool.ntp.org:123/udp"))   # stricter
    assert book._table.lookup(key) is None
    book.set_device(1, "cam", "02:00:00:00:00:01", names("*.camera.example:443/tcp"))
    assert book._table.lookup(key).rules[0].port == 443        # back, until its time runs out


def test_snapshot_restore_and_prune(book):
    book.answer(1, ["cloud.camera.example"], ["198.19.64.10"], ttl=30)
    book.answer(1, ["pool.ntp.org"], ["198.19.64.123"], ttl=30)
    snapshot = book.snapshot()
    fresh = NameBindings(FakeTable(), grace_s=60, keep_s=600, clock=book.clock, mono_ns=book.clock.mono_ns)
    fresh._table.update(fresh._key(1, "198.19.99.99"), book._table.lookup(book._key(1, "198.19.64.10")))
    fresh.set_device(1, "cam", "02:00:00:00:00:01", names("*.camera.example:443/tcp", "pool.ntp.org:123/udp"))
    book.clock.t += 60
    assert fresh.restore(snapshot + [{"mac": "02:00:00:00:00:09", "address": "198.19.64.1",
                                      "expires": book.clock.t + 999, "names": ["x.camera.example"]}]) == 2
    assert fresh.prune() == 1          # a binding whose names nobody knows any more
    assert sorted(b["address"] for b in fresh.of_device(1)["bound"]) == ["198.19.64.10", "198.19.64.123"]
    book.clock.t += 31
    assert fresh.restore(snapshot) == 0      # past TTL + grace: not brought back


def _answer(question, *records):
    msg = dns.message.make_response(dns.message.make_query(question, "A"))
    for name, rtype, ttl, *data in records:
        msg.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, *data))
    return msg.to_wire()


def test_an_answer_is_read_along_its_cname_chain_only():
    wire = _answer("cloud.camera.example",
                   ("cloud.camera.example.", "CNAME", 300, "edge.cdn.net."),
                   ("edge.cdn.net.", "CNAME", 60, "e1.cdn.net."),
                   ("e1.cdn.net.", "A", 20, "198.19.64.10", "198.19.64.11"),
                   ("unrelated.example.", "A", 999, "198.19.64.66"))
    chain, addresses, ttl = read_answer(wire)
    assert chain == ["cloud.camera.example", "edge.cdn.net", "e1.cdn.net"]
    assert (sorted(addresses), ttl) == (["198.19.64.10", "198.19.64.11"], 20)


def test_answers_without_an_address_and_bad_wire():
    aaaa = dns.message.make_response(dns.message.make_query("x.example", "AAAA"))
    assert read_answer(aaaa.to_wire()) is None
    assert read_answer(_answer("x.example")) == (["x.example"], [], 0)
    with pytest.raises(DNSError):
        read_answer(b"\x00\x01garbage")


def test_whatever_bytes_come_back_the_front_counts_them_and_goes_on():
    """The answer is passed on unbound: the device's connection meets the closed default."""
    import random
    calls = []
    front = Resolver("127.0.0.1", ("127.0.0.1", 9), lambda *a: calls.append(a) or True)
    rng = random.Random(8520)
    good = _answer("cloud.camera.example", ("cloud.camera.example.", "A", 30, "198.19.64.10"))
    for _ in range(2000):
        wire = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        front._bind("198.18.0.10", bytes(wire[:rng.randint(0, len(wire))]))
    front._bind("198.18.0.10", good)
    assert front.counts["unparsable-answer"] > 100
    assert calls[-1] == ("198.18.0.10", ["cloud.camera.example"], ["198.19.64.10"], 30)


def test_controllers_the_site_names_stand_in_for_the_profile_s():
    site = umbox.check_controllers({"camera-cloud": ["*.vendor.example", "198.19.64.0/24"]},
                                   "config: controllers")
    stack = {"allowlist": {"destinations": [{"controller": "camera-cloud", "proto": "tcp", "port": 443},
                                            "@phone:9999/tcp"]}}
    c = umbox.compile_stack(stack, "camera.toml: ", site)
    assert [(d.name, d.proto, d.port) for d in c.names] == [("*.vendor.example", 6, 443)]
    assert [(str(d.network), d.proto, d.port) for d in c.destinations] == [("198.19.64.0/24", 6, 443)]
    assert c.missing_controllers == ["phone"]        # not named by the site: opens nothing


@pytest.mark.parametrize("controllers, message", [
    ({"Camera Cloud": []}, "class 'Camera Cloud'"),
    ({"cloud": "x.example"}, "expected a list of hosts"),
    ({"cloud": ["x.example:443/tcp"]}, "host 'x.example:443/tcp'"),
    ({"cloud": ["198.19.64.1/33"]}, "198.19.64.1/33"),
    ({"cloud": [7]}, "expected a string"),
])
def test_bad_controllers_in_the_config_name_the_culprit(tmp_path, controllers, message):
    from appliance import config
    path = tmp_path / "kalki.toml"
    cfg = config.Config()
    cfg.controllers = controllers
    with pytest.raises(ConfigError, match=message):
        cfg.check()
    cfg.controllers = {"cloud": ["x.example"]}
    path.write_text(config.dump(cfg))
    assert config.load(str(path)).controllers == {"cloud": ["x.example"]}


def test_registrable_domains_follow_the_public_suffix_list():
    c = umbox.compile_stack({"allowlist": {"registrable_domains": True, "destinations": [
        "n-devs.tplinkcloud.com:443/tcp", "pool.ntp.org:123/udp", "bucket.s3.amazonaws.com:443/tcp"]}})
    names = {(d.name, d.port) for d in c.names}
    assert {("tplinkcloud.com", 443), ("*.tplinkcloud.com", 443), ("*.ntp.org", 123)} <= names
    # under a private suffix (s3.amazonaws.com) the name is its own registrable domain:
    # nobody else's bucket opens
    assert ("*.amazonaws.com", 443) not in names and ("*.s3.amazonaws.com", 443) not in names
    wild = next(d for d in c.names if d.name == "*.tplinkcloud.com")
    assert wild.matches_name("use1-api.tplinkcloud.com")
    plain = umbox.compile_stack({"allowlist": {"destinations": ["n-devs.tplinkcloud.com:443/tcp"]}})
    assert [d.name for d in plain.names] == ["n-devs.tplinkcloud.com"]


def test_dns_gateway_only_is_a_flag():
    from appliance.dataplane import maps
    assert umbox.compile_stack({"dns_gateway_only": {}}).flags & maps.Flag.DNS_GATEWAY_ONLY
    assert not umbox.compile_stack({"anti_spoof": {}}).flags & maps.Flag.DNS_GATEWAY_ONLY
