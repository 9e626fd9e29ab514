"""The data path API the supervisor uses: apply a device's umbox stack, change it, remove it,
read counters and events, block a source, and reconcile the kernel with what is wanted.

Kernel state (pinned maps, attached XDP programs, the nft table) outlives this object and the
process: `Dataplane.open` reuses what it finds, and `reconcile` converges it.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.dataplane import bpf, gatepolicy, links, loader, maps, nft, umbox
from appliance.dataplane.names import NameBindings
from appliance.errors import ConfigError, DataplaneError, UnknownDeviceError
from appliance.vocab import check_device_name, check_mac

BPFFS = "/sys/fs/bpf"


def _ip_be(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "little")  # network order read as host u32


def _ip_str(be: int) -> str:
    return socket.inet_ntoa(be.to_bytes(4, "little"))


def _mac_key(mac: str) -> maps.Mac:
    k = maps.Mac()
    k.addr[:] = bytes.fromhex(mac.replace(":", ""))
    return k


def mac_pair(mac: str, pairs: int) -> int:
    """The first of the two kalki_mac_slots a MAC may take (kalki.h: kalki_mac_slot)."""
    m = int.from_bytes(bytes.fromhex(mac.replace(":", "")) + b"\0\0", sys.byteorder)
    h = (((m >> 16) & 0xFFFFFFFF) ^ ((m & 0xFFFF) * 0x9E3779B1 & 0xFFFFFFFF)) * 0x85EBCA77 & 0xFFFFFFFF
    return 2 * ((h ^ (h >> 16)) % pairs)


def _mac_str(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


@dataclass
class GatewaySettings:
    devices_if: str = "dev0"
    uplink_if: str = "up0"
    gateway_ip: str = "198.18.0.1"
    lan: str = "198.18.0.0/20"
    mqtt_port: int = 1883
    gate_port: int = 8181
    events_per_sec: int = 20
    name_grace_s: int = 300     # a name's address outlives the answer's TTL by this much
    name_keep_s: int = 3600     # and a flow opened to it keeps it at least this long
    # the site's controllers, {class: [Destination]} (umbox.check_controllers)
    controllers: dict = field(default_factory=dict)
    # and per device MUD URL, {MUD URL: [Destination]} (umbox.check_my_controllers)
    my_controllers: dict = field(default_factory=dict)
    # where the gate's policy files go, one per gated device (gatepolicy.py); "": none
    gate_policy_dir: str = ""


@dataclass
class DeviceSpec:
    name: str
    mac: str
    ip: str
    stack: dict = field(default_factory=dict)
    posture: int = 0
    # RFC 8520: the device's MUD URL (my-controller, and the authority same-manufacturer means)
    # and {MUD authority: [LAN address]} of the approved devices, for the authorities its stack
    # names (umbox.compile_stack)
    mud_url: str | None = None
    peers: dict = field(default_factory=dict)

    def checked(self) -> DeviceSpec:
        check_device_name(self.name)
        mac = check_mac(self.mac, f"device {self.name}", unicast=True)
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError:
            raise ConfigError(f"device {self.name}: invalid IPv4 address {self.ip!r}") from None
        return dataclasses.replace(self, mac=mac)


@dataclass
class _Applied:
    spec: DeviceSpec
    device_id: int
    compiled: umbox.CompiledStack
    # the XDP entry this process wrote last (None: found in the kernel, not written here): what
    # a posture change puts back if nftables refuses it, without reading the slot first (25
    # cameras moved by one rule read 25 slots, 0.23 ms, before their entries were written)
    entry: maps.Device | None = None


class Dataplane:
    """One gateway's data path. `instance` names the pin directory (a lab name, or
    "appliance"); `namespace` is the network namespace of the gateway (None: this one)."""

    def __init__(self, instance: str, namespace: str | None = None,
                 settings: GatewaySettings | None = None):
        self.instance = instance
        self.namespace = namespace
        self.settings = settings or GatewaySettings()
        self.pin_dir = f"{BPFFS}/kalki/{instance}"
        self.load_report: dict = {}
        self._prog_fds: dict[str, int] = {}
        self._prog_ids: dict[str, int] = {}
        self._maps: dict[str, bpf.Map] = {}
        self._ring: bpf.RingBuffer | None = None
        self._nft: nft.Nft | None = None
        self._xdp_links: links.XdpLinks | None = None
        self._devices: dict[str, _Applied] = {}
        # the same devices by MAC, address and id: a posture change of 25 cameras among 1,000
        # devices must not walk all of them 25 times
        self._name_by_mac: dict[str, str] = {}
        self._name_by_ip: dict[str, str] = {}
        self._name_by_id: dict[int, str] = {}
        self._compiled: dict[str, umbox.CompiledStack] = {}    # by the stack as canonical JSON
        # id(stack) -> (the stack, its MUD URL, a copy of it then, the stack compiled)
        self._compiled_same: dict[int, tuple[dict, str | None, dict, umbox.CompiledStack]] = {}
        self._allow_contents: dict[int, tuple] = {}     # id(compiled) -> (compiled, list content)
        self._prepared_classes: set[str] = set()        # prepare(): made before they are needed
        self._nft_state: dict[int, dict] = {}   # what nftables has per device id, kept in step
        self._used_ids: set[int] = set()
        # devices whose own address may be in the drop set (kalki_own_drop), as last seen
        self._own_drop_marks: set[int] = set()
        # what kalki_mac_slots holds, byte for byte, kept in step with every write: the tamper
        # watch compares the slots with it at C speed (None until reconcile has read them)
        self._slot_image: bytearray | None = None
        self._slots_checked_at = -1e9
        self._stale_ids = True                  # read the kernel's ids once, then keep track
        self._next_id_hint = 1
        self._lists: dict[tuple, int] | None = None      # allow-lists: {content: list id}
        self._last_list = 0                               # the allow-list slot given last
        self._allow_of: dict[int, int] | None = None     # {device id: allow-list id}
        self._batch: list | None = None      # nftables work waiting for the end of batch()
        # {device id: (key, entry)}: written whole once the batch's nftables holds (deception)
        self._batch_after: dict[int, tuple[ctypes.c_uint32, maps.Device]] = {}
        self._batch_planned: set[int] = set()    # devices with nftables commands in the batch
        self._closed = False
        self._names: NameBindings | None = None
        self.max_devices = maps.MAX_DEVICES       # device slots the pins are made with
        self.older_layout: str | None = None     # why the pins of an older version were replaced
        self._older_postures: dict[str, int] = {}
        self._gate_files = (gatepolicy.PolicyFiles(self.settings.gate_policy_dir)
                            if self.settings.gate_policy_dir else None)

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def open(cls, instance: str, namespace: str | None = None,
             settings: GatewaySettings | None = None, defines=None) -> Dataplane:
        dp = cls(instance, namespace, settings)
        try:
            dp._load(defines)
        except BaseException:
            dp.close()
            raise
        return dp

    def _attachments(self) -> dict[str, str]:
        return {"xdp_from_devices": self.settings.devices_if, "xdp_to_devices": self.settings.uplink_if}

    def _load(self, defines) -> None:
        if not os.path.ismount(BPFFS):
            subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)
        self.max_devices = int((defines or {}).get("KALKI_MAX_DEVICES", maps.MAX_DEVICES))
        if os.path.exists(f"{self.pin_dir}/kalki_devices"):
            self.older_layout = self._older_layout()
            if self.older_layout:
                self._set_aside_older_layout()
        if not os.path.exists(f"{self.pin_dir}/kalki_devices"):
            self.load_report = loader.run_child(self.pin_dir, self._attachments(), self.namespace,
                                                defines=defines)
            if self.older_layout:
                remove_pins_dir(Path(f"{self.pin_dir}-older"))
        for name, (k, v) in maps.MAPS.items():
            self._maps[name] = bpf.Map(f"{self.pin_dir}/{name}", k, v)
        self._names = NameBindings(self._maps["kalki_name_allow"], self.settings.name_grace_s,
                                   self.settings.name_keep_s)
        self._ring = bpf.RingBuffer(f"{self.pin_dir}/{maps.RINGBUF}")
        s = self.settings
        lan = ipaddress.IPv4Network(s.lan)
        settings = maps.Settings(gateway_ip=_ip_be(s.gateway_ip), lan_net=_ip_be(str(lan.network_address)),
                                 lan_mask=_ip_be(str(lan.netmask)), mqtt_port=s.mqtt_port,
                                 events_per_sec=s.events_per_sec, unknown_flags=0)
        self._maps["kalki_settings"].update(ctypes.c_uint32(0), settings)
        # Held open for as long as the data path is: what restore() pins again if the pins go.
        self._prog_fds = {prog: bpf.obj_get(f"{self.pin_dir}/{prog}") for prog in self._attachments()}
        self._prog_ids = {prog: bpf.prog_info(fd).id for prog, fd in self._prog_fds.items()}
        self._nft = nft.Nft(self.namespace, s.devices_if, s.gateway_ip, s.gate_port)
        self._nft.ensure_table()
        self._nft_state = self._nft.read_back()

    def _older_layout(self) -> str | None:
        """Why the pinned maps are not this version's (a map missing, or of another size),
        or None."""
        for name, (k, v) in maps.MAPS.items():
            path = f"{self.pin_dir}/{name}"
            if not os.path.exists(path):
                return f"map {name} is missing (pinned by an older version)"
            try:
                pinned = bpf.Map(path, k, v)
            except DataplaneError as e:
                return str(e)
            slots = pinned.max_entries
            pinned.close()
            if name == "kalki_devices" and slots != self.max_devices:
                return f"map kalki_devices has {slots} device slots, this version {self.max_devices}"
            lists = 2 * self.max_devices + maps.KEPT_LISTS
            if name == "kalki_allow_lists" and slots != lists:
                return f"map kalki_allow_lists has {slots} slots, this version {lists}"
        return None

    def _set_aside_older_layout(self) -> None:
        """Moves an older version's pins aside, keeping what its devices' postures were, so a
        new load replaces its programs (attaching replaces them in one step) and the postures
        it held can still be kept where they are stricter."""
        older = f"{self.pin_dir}-older"        # (bpffs refuses names with a dot)
        remove_pins_dir(Path(older))
        os.rename(self.pin_dir, older)
        try:
            by_mac = bpf.Map(f"{older}/kalki_dev_by_mac", maps.Mac, maps.U32)
            devices = bpf.Map(f"{older}/kalki_devices", maps.U32, maps.Device)
        except (DataplaneError, OSError):
            return      # too old to read: the store's postures are all there is
        try:
            for k in by_mac.keys():
                entry = devices.lookup(by_mac.lookup(k))
                if entry is not None and entry.flags & maps.Flag.PRESENT:
                    self._older_postures[_mac_str(k.addr)] = entry.posture
        finally:
            by_mac.close()
            devices.close()

    def close(self) -> None:
        """Releases file descriptors; what is in the kernel stays and keeps protecting."""
        if self._closed:
            return
        self._closed = True
        for m in self._maps.values():
            m.close()
        if self._ring:
            self._ring.close()
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds = {}
        if self._nft:
            self._nft.close()
        if self._xdp_links:
            self._xdp_links.close()

    def destroy(self) -> None:
        """Removes everything this instance put in the kernel (lab teardown)."""
        if self._nft:
            self._nft.delete_table()
        self.close()
        for ifname in self._attachments().values():
            subprocess.run(["ip", *(["-n", self.namespace] if self.namespace else []),
                            "link", "set", "dev", ifname, "xdp", "off"], capture_output=True)
        remove_pins(self.instance)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- devices --------------------------------------------------------------------------
    @property
    def devices(self) -> dict[str, DeviceSpec]:
        return {n: a.spec for n, a in self._devices.items()}

    def device_by_ip(self, ip: str) -> str | None:
        return self._name_by_ip.get(ip)

    def _put(self, applied: _Applied) -> None:
        self._forget(applied.spec.name)
        name = applied.spec.name
        self._devices[name] = applied
        self._name_by_mac[applied.spec.mac] = self._name_by_ip[applied.spec.ip] = name
        self._name_by_id[applied.device_id] = name
        self._loaded_names().set_device(applied.device_id, name, applied.spec.mac,
                                        applied.compiled.names)

    def _forget(self, name: str) -> None:
        a = self._devices.pop(name, None)
        if a is None:
            return
        for index, key in ((self._name_by_mac, a.spec.mac), (self._name_by_ip, a.spec.ip)):
            if index.get(key) == name:
                del index[key]
        if self._name_by_id.get(a.device_id) == name:
            del self._name_by_id[a.device_id]

    def device_id(self, name: str) -> int:
        return self._applied(name).device_id

    def read_back(self, name: str) -> int | None:
        """The posture code the kernel holds for a device (its XDP entry), or None if it holds
        none: what "enforced" is checked against after a change."""
        entry = self._maps["kalki_devices"].lookup(ctypes.c_uint32(self.device_id(name)))
        if entry is None or not entry.flags & maps.Flag.PRESENT:
            return None
        return entry.posture

    def read_back_all(self, names: list[str]) -> dict[str, int | None]:
        """read_back() of several devices: more than a few, with ids close enough together, in
        one batch read of the slots from the lowest id to the highest (25 cameras: one system
        call, not 25). A slot read in a batch costs about a seventeenth of a lookup (0.26
        against 4.4 us here), so a batch over sparse ids would cost more than it saves."""
        return self._postures({name: self.device_id(name) for name in names})

    def _postures(self, ids: dict[str, int]) -> dict[str, int | None]:
        """{name: the posture code its slot holds} for {name: device id}."""
        entries = None
        if len(ids) > READ_ONE_BY_ONE:
            low = min(ids.values())
            span = max(ids.values()) - low + 1
            if span <= SLOTS_PER_LOOKUP * len(ids):
                entries = self._maps["kalki_devices"].values_from(low, span)
        if entries is None:
            return {name: self._posture_at(i) for name, i in ids.items()}
        return {name: _posture_of(entries[i - low]) for name, i in ids.items()}

    def _posture_at(self, device_id: int) -> int | None:
        return _posture_of(self._maps["kalki_devices"].lookup(ctypes.c_uint32(device_id)))

    def events_fileno(self) -> int:
        """The ring buffer's descriptor, readable when kernel events wait: for a loop's reader."""
        return self._loaded_ring().fileno()

    def _loaded_ring(self) -> bpf.RingBuffer:
        """The event ring buffer, which open() maps."""
        if self._ring is None:
            raise DataplaneError("the data path is not loaded")
        return self._ring

    def _loaded_names(self) -> NameBindings:
        if self._names is None:
            raise DataplaneError("the data path is not loaded: no name bindings")
        return self._names

    # -- names: what the gateway's resolver answered each device ----------------------------
    def answer(self, device_ip: str, chain: list[str], addresses: list[str], ttl: int) -> bool:
        """An answer the gateway's resolver is about to give `device_ip`: the addresses of
        chain[0] (through the CNAMEs chain[1:]) are bound for the device if its posture
        allows any of those names. Called from the resolver's threads."""
        name = self._name_by_ip.get(device_ip)
        applied = self._devices.get(name) if name else None
        if applied is None:
            self._loaded_names().counts["not-a-device"] += 1
            return False
        return self._loaded_names().answer(applied.device_id, chain, addresses, ttl)

    def names_of(self, name: str) -> dict:
        """{"bound": [...], "refused": {name: times}}: the device's names now."""
        return self._loaded_names().of_device(self._applied(name).device_id)

    def resolved_names(self, name: str, address: str) -> list[str]:
        """The names the device resolved to `address` through the gateway (question first)."""
        a = self._devices.get(name)
        return self._loaded_names().resolved(a.device_id, address) if a else []

    def name_snapshot(self) -> list[dict]:
        return self._loaded_names().snapshot()

    def restore_names(self, entries: list[dict]) -> dict:
        """After reconcile: the bindings of a snapshot put back, the kernel's unknown ones gone."""
        names = self._loaded_names()
        return {"restored": names.restore(entries), "pruned": names.prune()}

    def expire_names(self) -> int:
        return self._loaded_names().expire()

    def _loaded_nft(self) -> nft.Nft:
        """The nftables handle, which open() makes."""
        if self._nft is None:
            raise DataplaneError("the data path is not loaded: no nftables handle")
        return self._nft

    def _applied(self, name: str) -> _Applied:
        try:
            return self._devices[name]
        except KeyError:
            raise UnknownDeviceError(f"device {name!r} does not exist in the data path") from None

    def kernel_postures(self) -> dict[str, int]:
        """{MAC: posture code} of every device the kernel holds, read from the maps (what an
        earlier process left in force)."""
        out = dict(self._older_postures)
        for mac, device_id in self._kernel_ids_by_mac().items():
            entry = self._maps["kalki_devices"].lookup(ctypes.c_uint32(device_id))
            if entry is not None and entry.flags & maps.Flag.PRESENT:
                out[mac] = entry.posture
        return out

    def _kernel_ids_by_mac(self) -> dict[str, int]:
        return {_mac_str(k.addr): self._maps["kalki_dev_by_mac"].lookup(k).value
                for k in self._maps["kalki_dev_by_mac"].keys()}

    def _free_id(self) -> int:
        # Asked of the sets as they are: copying them made each new device cost O(devices).
        if self._stale_ids:
            self._used_ids |= {k.value for k in self._maps["kalki_devices"].keys()}
            self._stale_ids = False
        used, named = self._used_ids, self._name_by_id
        slots = self._maps["kalki_devices"].max_entries
        for i in range(max(1, self._next_id_hint), slots):
            if i not in used and i not in named:
                self._next_id_hint = i + 1
                return i
        for i in range(1, slots):
            if i not in used and i not in named:
                return i
        raise DataplaneError(f"no free device slot: the data path holds {slots - 1} devices "
                             f"(KALKI_MAX_DEVICES {slots}, slot 0 is the unknown device)")

    def _device_entry(self, spec: DeviceSpec, compiled: umbox.CompiledStack, allow_id: int) -> maps.Device:
        d = maps.Device(flags=int(compiled.flags | maps.Flag.PRESENT), ipv4=_ip_be(spec.ip),
                        posture=spec.posture, allow_id=allow_id)
        d.mac[:] = bytes.fromhex(spec.mac.replace(":", ""))
        for key, value in compiled.device_fields.items():
            if key == "bf_ports":
                d.bf_ports[:] = list(value) + [0] * (maps.LOGIN_PORTS - len(value))
            else:
                setattr(d, key, value)
        return d

    # -- allow-lists, shared by the devices with the same destinations ----------------------
    def _allow_content(self, compiled: umbox.CompiledStack) -> tuple:
        """The list's content, once per compiled stack (25 cameras in a posture share one)."""
        cached = self._allow_contents.get(id(compiled))
        if cached is not None and cached[0] is compiled:
            return cached[1]
        content = self._allow_content_now(compiled)
        if len(self._allow_contents) >= 256:
            self._allow_contents.clear()
        self._allow_contents[id(compiled)] = (compiled, content)
        return content

    def _allow_content_now(self, compiled: umbox.CompiledStack) -> tuple:
        grouped: dict = {}
        lan = ipaddress.IPv4Network(self.settings.lan)
        for dst in compiled.destinations:
            grouped.setdefault(lan if dst.lan else dst.network, []).append((dst.proto, dst.port))
        return tuple(sorted((net.prefixlen, str(net.network_address), tuple(rules))
                            for net, rules in grouped.items()))

    def _list_index(self) -> dict[tuple, int]:
        """{content: list id}, read from the kernel once, then kept in step. Built whole
        before it is kept: a half-read index would offer slots in use as free. The slots'
        trie ids are read from kalki_allow_list_ids, never from the slots (kalki.h: why)."""
        if self._lists is None:
            lists: dict[tuple, int] = {}
            ids = self._maps["kalki_allow_list_ids"]
            for slot, map_id in list(ids.items()):
                try:
                    trie = bpf.Map.by_id(map_id.value, maps.AllowKey, maps.AllowValue)
                except DataplaneError:      # freed: its slot was emptied before a crash
                    ids.delete(slot)
                    continue
                try:
                    nets = [(k.prefixlen, _ip_str(k.addr),
                             tuple((v.rules[i].proto, v.rules[i].port) for i in range(v.count)))
                            for k, v in trie.items()]
                finally:
                    trie.close()
                lists[tuple(sorted(nets))] = slot.value
            self._lists = lists
        return self._lists

    def _list_id(self, content: tuple, create: bool) -> int | None:
        """The id of the list with these destinations (0: none), made if asked and missing."""
        if not content:
            return 0
        index = self._list_index()
        if content in index or not create:
            return index.get(content)
        # Each list's trie has the template's shape: the kernel refuses any other in the slots.
        prefixes = self._maps["kalki_allow"].max_entries
        if len(content) > prefixes:
            raise DataplaneError(f"an allow-list of {len(content)} destinations (networks); "
                                 f"at most {prefixes}")
        # A slot a device still names is not free, even if the index lost it (an undo).
        list_id = self._free_list_slot(set(index.values()) | set(self._allow_ids().values()))
        # The list's own trie, filled before its slot points at it: a device moved to this
        # list never sees it half-made.
        trie = bpf.Map("a new allow-list", maps.AllowKey, maps.AllowValue, fd=bpf.map_create(
            bpf.BPF_MAP_TYPE_LPM_TRIE, maps.AllowKey, maps.AllowValue, prefixes,
            bpf.BPF_F_NO_PREALLOC, "kalki_allow_l"))
        try:
            for prefixlen, addr, rules in content:
                value = maps.AllowValue(count=len(rules))
                for i, (proto, port) in enumerate(rules):
                    value.rules[i].proto, value.rules[i].port = proto, port
                trie.update(maps.AllowKey(prefixlen=prefixlen, addr=_ip_be(addr)), value)
            trie_id = ctypes.c_uint32(bpf.map_info(trie.fd).id)
            # (before the slot: a verdict remembered from the slot's last trie stops counting)
            self._maps["kalki_list_gen"].update(ctypes.c_uint32(list_id), trie_id)
            self._maps["kalki_allow_lists"].update(ctypes.c_uint32(list_id), ctypes.c_uint32(trie.fd))
            self._maps["kalki_allow_list_ids"].update(ctypes.c_uint32(list_id), trie_id)
        finally:
            trie.close()            # the slot holds the trie now
        index[content] = list_id
        return list_id

    def _free_list_slot(self, used: set[int]) -> int:
        """The next free slot after the last one given, round the slots: a slot is given again
        only after the cursor has gone round, so a packet that read a device's old list id
        just before it moved meets that list or none (XDP runs in microseconds; a lap takes
        thousands of list changes)."""
        slots = self._maps["kalki_allow_lists"].max_entries
        for step in range(1, slots):
            candidate = (self._last_list + step - 1) % (slots - 1) + 1     # 1 .. slots-1
            if candidate not in used:
                self._last_list = candidate
                return candidate
        raise DataplaneError(f"no free allow-list: all {slots - 1} are in use")

    def _allow_ids(self) -> dict[int, int]:
        """{device id: its allow-list id}, read from the kernel once, then kept in step."""
        if self._allow_of is None:
            self._allow_of = {k.value: e.allow_id for k, e in self._maps["kalki_devices"].items()}
        return self._allow_of

    def _kept_lists(self) -> int:
        """How many unused lists may stay: the slots beyond two per device (a list per device,
        and its next while a posture changes), KALKI_KEPT_LISTS when the pins are this
        version's; none in an older layout's."""
        slots = self._maps["kalki_allow_lists"].max_entries
        return max(0, min(maps.KEPT_LISTS, slots - 2 * self.max_devices))

    def _collect_lists(self) -> None:
        """Deletes the lists no device uses any more, but for the newest _kept_lists(): a
        device back in a posture it had finds its list still there. Writing or deleting a
        slot of an array of maps waits for an RCU grace period (maybe_wait_bpf_programs),
        8 ms here: a device leaving quarantine waited that long for its list to be made again."""
        used = set(self._allow_ids().values())
        index = self._list_index()
        unused = [(content, list_id) for content, list_id in index.items() if list_id not in used]
        for content, list_id in unused[:max(0, len(unused) - self._kept_lists())]:   # oldest first
            self._maps["kalki_allow_lists"].delete(ctypes.c_uint32(list_id))
            self._maps["kalki_allow_list_ids"].delete(ctypes.c_uint32(list_id))
            del index[content]

    def prepare(self, stacks) -> list[str]:
        """Makes, ahead of any device moving to one of these stacks, what the move would
        otherwise make on its way: nftables' connection-limit classes. A class is two sets and
        a rule, 14-58 ms to add at 100 devices, where a posture change's own elements take
        under a millisecond: the first camera to turn suspicious after a start waited for it.
        Remembered, so that a table made anew (restore) has them again. A stack umbox.validate
        refuses is left out (applying it says why). Returns the classes added."""
        for stack in stacks:
            try:
                conn_limit = umbox.validate(stack).get("conn_limit")
            except ConfigError:
                continue
            self._prepared_classes.update(nft.class_sets(conn_limit))
        return self._loaded_nft().ensure_classes(self._prepared_classes)

    def _compile_now(self, spec: DeviceSpec) -> umbox.CompiledStack:
        s = self.settings
        return umbox.compile_stack(spec.stack, f"device {spec.name}: ", s.controllers,
                                   s.my_controllers, spec.mud_url, spec.peers)

    def _compile(self, spec: DeviceSpec) -> umbox.CompiledStack:
        """A stack checked and compiled once: 25 cameras moving to the same posture share
        it. (An invalid stack is never kept, so its error always names the device.) A
        profile's stack is the same object every time: found by that first, checked equal to
        a copy of what was compiled (the canonical JSON key cost 15 us a device)."""
        same = self._compiled_same.get(id(spec.stack)) if not spec.peers else None
        if same is not None and same[0] is spec.stack and same[1] == spec.mud_url and same[2] == spec.stack:
            return same[3]
        try:
            key = json.dumps([spec.stack, spec.mud_url, spec.peers], sort_keys=True)
        except (TypeError, ValueError):
            return self._compile_now(spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile_now(spec)
            if len(self._compiled) >= 256:
                self._compiled.clear()
            self._compiled[key] = compiled
        if not spec.peers:
            if len(self._compiled_same) >= 256:
                self._compiled_same.clear()
            self._compiled_same[id(spec.stack)] = (spec.stack, spec.mud_url, copy.deepcopy(spec.stack),
                                                   compiled)
        return compiled

    def apply(self, spec: DeviceSpec) -> int:
        """Puts the device's umbox stack in force (new device, or a posture change). Either all
        of it takes effect or none: everything is validated first, the kernel maps change (the
        posture is in force from the next packet), then nftables; if nftables refuses, the
        maps are put back."""
        previous = self._devices.get(spec.name)
        if not (previous and (spec.mac, spec.ip) == (previous.spec.mac, previous.spec.ip)):
            spec = spec.checked()       # (a posture change keeps the checked name, MAC, address)
        compiled = self._compile(spec)
        for index, value, what in ((self._name_by_mac, spec.mac, "MAC"),
                                   (self._name_by_ip, spec.ip, "address")):
            owner = index.get(value)
            if owner is not None and owner != spec.name:
                raise ConfigError(f"device {spec.name}: {what} {value} already belongs to "
                                  f"device {owner}")
        if previous:
            device_id = previous.device_id
        else:
            known = self._maps["kalki_dev_by_mac"].lookup(_mac_key(spec.mac))
            device_id = known.value if known is not None else self._free_id()
        key = ctypes.c_uint32(device_id)
        waiting = self._batch_after.get(device_id) if self._batch is not None else None
        before = (_held_back(waiting[1]) if waiting      # (what the kernel holds: see below)
                  else previous.entry if previous and previous.entry is not None
                  else self._maps["kalki_devices"].lookup(key))
        allow_id = self._list_id(self._allow_content(compiled), create=True)
        # Deception lets a drop-set source's packets through XDP for nftables to redirect to
        # the decoy: until nftables has the device in `deceive` they would be forwarded to the
        # device itself. So the entry goes in without it first, and whole once nftables holds.
        # (In a batch, held back always: the state a plan builds on is not committed yet.)
        held_back = bool(compiled.flags & maps.Flag.DECEPTION) and (
            self._batch is not None or spec.ip not in self._nft_state.get(device_id, {}).get("deceive", ()))
        entry = self._write_kernel(device_id, spec, compiled, allow_id, previous, held_back)

        def undo():
            if before is not None and previous:
                self._maps["kalki_devices"].update(key, before)
                self._allow_ids()[device_id] = before.allow_id
                self._write_indexes(device_id, previous.spec, spec)
                self._put(previous)
                with contextlib.suppress(DataplaneError):
                    self._write_gate_policy(previous.spec, previous.compiled, spec.ip)
            else:
                self._drop_kernel_entry(device_id, [spec.mac], [spec.ip])
                self._forget(spec.name)
                with contextlib.suppress(DataplaneError):
                    self._write_gate_policy(spec, None)

        try:    # before nftables steers the device's web port to the gate
            self._write_gate_policy(spec, compiled, previous.spec.ip if previous else None)
        except DataplaneError:
            undo()
            raise
        plan = None
        if self._batch is None:
            try:
                self._sync_nft(device_id, spec, compiled)
            except DataplaneError:
                undo()
                raise
        else:
            try:
                plan = self._nft_plan(device_id, spec, compiled)
            except DataplaneError:      # (reading the table's classes): not queued for undo yet
                undo()
                raise
            if plan and device_id in self._batch_planned:
                # Both plans' deletions would go first in the one transaction, and nftables
                # refuses to delete what only the earlier plan adds.
                undo()
                raise ConfigError(f"device {spec.name}: changed twice in one batch, each time "
                                  "in nftables; a batch changes a device once")
            if plan:
                self._nft_state[device_id] = plan[1]   # the next plan builds on it
                self._batch_planned.add(device_id)
        if self._batch is not None:     # nftables' part, if any, goes at the batch's end
            self._batch.append((spec.name, device_id, *(plan or (None, None)), undo))
            if held_back:
                self._batch_after[device_id] = (key, entry)
            else:       # (this apply's entry is whole: one held back before it is superseded)
                self._batch_after.pop(device_id, None)
        # In a batch the old list is kept until the batch has held: an undo puts the device
        # back on it.
        if self._batch is None and before is not None and before.allow_id != allow_id:
            self._collect_lists()
        self._put(_Applied(spec, device_id, compiled, entry))
        self._used_ids.add(device_id)
        if held_back and self._batch is None:   # nftables holds: no undo past here
            self._write_whole({device_id: (key, entry)})
        return device_id

    def _write_gate_policy(self, spec: DeviceSpec, compiled: umbox.CompiledStack | None,
                           old_ip: str | None = None) -> None:
        """The gate's policy file for the device as its stack says (none without a gate umbox);
        one file per address, so a fresh Dataplane touches no other device's."""
        files = self._gate_files
        if files is None:
            return
        try:
            if old_ip and old_ip != spec.ip:
                files.remove(old_ip)
            if compiled is not None and compiled.gate_policy is not None:
                files.write(spec.ip, {**compiled.gate_policy, "device": spec.name})
            else:
                files.remove(spec.ip)
        except OSError as e:
            raise DataplaneError(f"device {spec.name}: the gate's policy file in "
                                 f"{files.directory}: {e}") from None

    def _nft_plan(self, device_id: int, spec: DeviceSpec, compiled: umbox.CompiledStack):
        return self._loaded_nft().plan(device_id, spec.mac, spec.ip, compiled.conn_limit,
                                       compiled.gate_port, self._nft_state.get(device_id),
                                       **_nft_flags(compiled))

    def _sync_nft(self, device_id: int, spec: DeviceSpec, compiled: umbox.CompiledStack) -> None:
        """One nftables transaction if the device's part differs from what nftables has."""
        plan = self._nft_plan(device_id, spec, compiled)
        if not plan:
            return
        try:
            self._loaded_nft().run(plan[0], f"device {spec.name}")
        except DataplaneError:
            # Somebody else changed the table since we last read it: read it and try once more.
            self._nft_state = self._loaded_nft().read_back()
            plan = self._nft_plan(device_id, spec, compiled)
            if plan:
                self._loaded_nft().run(plan[0], f"device {spec.name}")
        if plan:
            self._nft_state[device_id] = plan[1]

    @contextlib.contextmanager
    def batch(self):
        """Several apply() calls whose nftables parts go in one transaction at the end (a rule
        that moves 25 cameras at once). Each device's XDP entry is in force at once; if
        anything in the block raises or nftables refuses the transaction, every device of the
        batch is put back."""
        if self._batch is not None:
            yield
            return
        self._batch, self._batch_after, self._batch_planned = [], {}, set()
        try:
            yield
        except BaseException:
            pending, self._batch, self._batch_after = self._batch, None, {}
            self._undo(pending)
            raise
        pending, self._batch = self._batch, None
        commands = [c for _, _, device_commands, _, _ in pending for c in device_commands or ()]
        if commands:
            try:
                names = ", ".join(name for name, _, cmds, _, _ in pending if cmds)
                self._loaded_nft().run(nft.merged(commands), f"devices {names}")
            except DataplaneError:
                self._batch_after = {}
                self._undo(pending)
                raise
            for _, device_id, device_commands, state, _ in pending:
                if device_commands:
                    self._nft_state[device_id] = state
        whole, self._batch_after = self._batch_after, {}
        self._write_whole(whole)
        self._collect_lists()

    def _write_whole(self, held_back: dict[int, tuple[ctypes.c_uint32, maps.Device]]) -> None:
        """The entries apply() wrote without DECEPTION, whole, now that nftables holds. One that
        cannot be written is not undone: nftables has committed the new posture, and the
        entry in force is the stricter one (the next reconcile writes it whole)."""
        failed = []
        for device_id, (key, entry) in held_back.items():
            try:
                self._maps["kalki_devices"].update(key, entry)
            except DataplaneError as e:
                failed.append(f"{self._name_by_id.get(device_id, device_id)}: {e}")
        if failed:
            raise DataplaneError("deception not switched on for " + "; ".join(failed)
                                 + " (the device is quarantined without its decoy until the "
                                 "next reconcile)")

    def _undo(self, pending: list) -> None:
        for *_, undo in reversed(pending):
            undo()
        self._nft_state = self._loaded_nft().read_back()
        self._collect_lists()

    def _write_kernel(self, device_id, spec, compiled, allow_id, previous,
                      held_back: bool = False) -> maps.Device:
        """Writes the device's entry (without DECEPTION if held_back) and indexes; returns the
        whole entry."""
        m = self._maps
        key = ctypes.c_uint32(device_id)
        if previous is None and m["kalki_devices"].lookup(key) is None:
            # A new slot starts with empty buckets, windows and counters.
            m["kalki_dev_state"].update(key, maps.DevState())
            m["kalki_event_limit"].zero(device_id * maps.REASON_SLOTS, maps.REASON_SLOTS)
            m["kalki_counters"].zero(device_id * maps.REASON_SLOTS, maps.REASON_SLOTS)
        entry = self._device_entry(spec, compiled, allow_id)
        if not (previous and previous.spec.ip == spec.ip) and \
                m["kalki_drop_set"].lookup(ctypes.c_uint32(entry.ipv4)) is not None:
            self._mark_own_drop(device_id)      # before the entry names the address (kalki.h)
        m["kalki_devices"].update(key, _held_back(entry) if held_back else entry)
        self._allow_ids()[device_id] = allow_id
        self._write_indexes(device_id, spec, previous.spec if previous else None)
        return entry

    def _write_indexes(self, device_id: int, spec: DeviceSpec, old: DeviceSpec | None) -> None:
        m = self._maps
        key = ctypes.c_uint32(device_id)
        if old and old.mac == spec.mac and old.ip == spec.ip:
            return      # a posture change: the indexes stand (reconcile rewrites them itself)
        m["kalki_dev_by_mac"].update(_mac_key(spec.mac), key)
        self._slot_mac(spec.mac, device_id)
        m["kalki_dev_by_ip"].update(ctypes.c_uint32(_ip_be(spec.ip)), key)
        if m["kalki_drop_set"].lookup(ctypes.c_uint32(_ip_be(spec.ip))) is not None:
            self._mark_own_drop(device_id)      # an address blocked before it was the device's
        if old and old.mac != spec.mac:
            self._unslot_mac(old.mac)
            m["kalki_dev_by_mac"].delete(_mac_key(old.mac))
        if old and old.ip != spec.ip:
            m["kalki_dev_by_ip"].delete(ctypes.c_uint32(_ip_be(old.ip)))

    # -- kalki_mac_slots: kalki_dev_by_mac again, compared in two slots (kalki.h) ------------
    def _mac_slots_of(self, mac: str) -> list[tuple[int, maps.MacSlot | None]]:
        """The MAC's pair of slots, from the image of what this process wrote once it has one
        (a slot changed behind its back is written over, which is what reconcile would do)."""
        first = mac_pair(mac, self.max_devices)
        image, size = self._slot_image, ctypes.sizeof(maps.MacSlot)
        if image is None:
            slots = self._maps["kalki_mac_slots"]
            return [(i, slots.lookup(ctypes.c_uint32(i))) for i in (first, first + 1)]
        pair = [(i, maps.MacSlot.from_buffer_copy(image, i * size)) for i in (first, first + 1)]
        return [(i, slot if slot.device else None) for i, slot in pair]

    def _slot_mac(self, mac: str, device_id: int) -> None:
        """After kalki_dev_by_mac has the MAC: into its pair's slot that holds it, or a free one
        (none free: the kernel finds it in kalki_dev_by_mac)."""
        addr = _mac_key(mac).addr
        pair = self._mac_slots_of(mac)
        mine = [i for i, slot in pair if slot is not None and bytes(slot.addr) == bytes(addr)]
        free = [i for i, slot in pair if slot is None]
        if mine or free:
            slot = maps.MacSlot(addr=addr, device=device_id)
            self._maps["kalki_mac_slots"].update(ctypes.c_uint32((mine or free)[0]), slot)
            self._image_slot((mine or free)[0], bytes(slot))

    def _unslot_mac(self, mac: str) -> None:
        """Before the MAC leaves kalki_dev_by_mac."""
        addr = bytes(_mac_key(mac).addr)
        for i, slot in self._mac_slots_of(mac):
            if slot is not None and bytes(slot.addr) == addr:
                self._maps["kalki_mac_slots"].delete(ctypes.c_uint32(i))
                self._image_slot(i, bytes(ctypes.sizeof(maps.MacSlot)))

    def _image_slot(self, i: int, value: bytes) -> None:
        if self._slot_image is not None:
            self._slot_image[i * len(value):(i + 1) * len(value)] = value

    def _mac_slots_checked(self, applied: list[tuple[str, _Applied]], fix: bool) -> list[str]:
        """The slots that say what none of the devices applied is (a MAC on another device, or
        no device's), named; with fix, cleared, and every device without a slot given a free
        one of its pair."""
        slots = self._maps["kalki_mac_slots"]
        count = 2 * self.max_devices
        held = slots.first_values(count)
        if held is None:
            held = [slots.lookup(ctypes.c_uint32(i)) or maps.MacSlot() for i in range(count)]
        elif not fix and self._slot_image is not None and bytes(held) == self._slot_image:
            return []       # (at 1,000 devices: 0.1 ms, where reading each slot took 4 ms)
        wanted = {a.spec.mac: a.device_id for _, a in applied}
        wrong, slotted = [], set()
        for i, slot in enumerate(held):
            if not slot.device:
                continue
            mac = _mac_str(slot.addr)
            if wanted.get(mac) == slot.device and slot.pad == slot.pad2 == 0 and \
                    mac_pair(mac, self.max_devices) in (i, i - 1):
                slotted.add(mac)
                continue
            wrong.append(f"slot {i} ({mac} -> device id {slot.device})")
            if fix:
                slots.delete(ctypes.c_uint32(i))
        if fix:
            for mac, device_id in wanted.items():
                if mac not in slotted:
                    self._slot_mac(mac, device_id)
            now = slots.first_values(count)
            self._slot_image = bytearray(bytes(now)) if now is not None else None
            self._slots_checked_at = time.monotonic()
        return wrong

    def set_stack(self, name: str, stack: dict, posture: int | None = None) -> int:
        """A posture change: the same device with another umbox stack."""
        a = self._applied(name)
        return self.apply(dataclasses.replace(a.spec, stack=stack,
                                              posture=a.spec.posture if posture is None else posture))

    def remove(self, name: str) -> None:
        a = self._applied(name)
        self._remove_id(a.device_id, [a.spec.mac], [a.spec.ip])
        self._forget(name)

    def rename(self, name: str, new: str) -> None:
        """The device under another name. Only the name moves: the kernel knows a device by
        its id, MAC and address (its XDP entry, its nftables elements tagged with the id, its
        counters and name bindings stay as they are), so its protection never lapses. The
        gate's policy file, which names the device, is written again."""
        a = self._applied(name)
        check_device_name(new, f"device {name}: new name")
        if new in self._devices:
            raise ConfigError(f"device {name}: cannot rename it {new}: the data path holds a "
                              f"device {new}")
        renamed = _Applied(dataclasses.replace(a.spec, name=new), a.device_id, a.compiled, a.entry)
        self._write_gate_policy(renamed.spec, a.compiled)    # a DataplaneError: nothing moved
        self._forget(name)
        self._put(renamed)

    def _remove_id(self, device_id: int, macs, ips) -> None:
        current = self._nft_state.pop(device_id, None)
        if current:
            nf = self._loaded_nft()
            nf.run(nf.removal_commands(device_id, current), f"removing device {device_id}")
        if self._gate_files is not None:
            for ip in ips:
                with contextlib.suppress(OSError):
                    self._gate_files.remove(ip)
        self._drop_kernel_entry(device_id, macs, ips)
        self._collect_lists()

    def _drop_kernel_entry(self, device_id: int, macs, ips) -> None:
        """The device's entry and its index entries, those that still name it: reconcile may
        have given its MAC or address to a device under a new id (the drop set's marks find
        a device by its address)."""
        m = self._maps
        self._batch_after.pop(device_id, None)
        for mac in macs:
            held = m["kalki_dev_by_mac"].lookup(_mac_key(mac))
            if held is None or held.value == device_id:
                self._unslot_mac(mac)
                m["kalki_dev_by_mac"].delete(_mac_key(mac))
        for ip in ips:
            key = ctypes.c_uint32(_ip_be(ip))
            held = m["kalki_dev_by_ip"].lookup(key)
            if held is None or held.value == device_id:
                m["kalki_dev_by_ip"].delete(key)
        m["kalki_devices"].delete(ctypes.c_uint32(device_id))
        self._allow_ids().pop(device_id, None)
        self._loaded_names().forget_device(device_id)
        self._used_ids.discard(device_id)
        self._next_id_hint = min(self._next_id_hint, device_id)

    # -- observing ------------------------------------------------------------------------
    def counters(self, name: str) -> dict[str, dict]:
        """{reason: {"umbox", "packets", "bytes"}} for the device, summed over CPUs."""
        first = self.device_id(name) * maps.REASON_SLOTS
        counters = self._maps["kalki_counters"]
        slots = counters.slots(first, len(maps.Reason))
        if slots is None:
            slots = [counters.lookup(ctypes.c_uint32(first + reason)) for reason in maps.Reason]
        out = {}
        for reason, per_cpu in zip(maps.Reason, slots):
            packets = sum(c.packets for c in per_cpu)
            if packets:
                out[reason.name.lower()] = {"umbox": maps.REASON_UMBOX[reason], "packets": packets,
                                            "bytes": sum(c.bytes for c in per_cpu)}
        return out

    def events(self, timeout: float = 0.0, limit: int = 4096, consume: bool = True) -> list[dict]:
        """Detector events from the kernel ring buffer, oldest first. With consume=False they
        stay in the ring until consume_events(): read, acted on, then given back, so that a
        supervisor killed in between reads them again after its restart."""
        ring = self._loaded_ring()
        records = ring.drain(limit, consume)
        if not records and timeout > 0 and ring.wait(timeout):
            records = ring.drain(limit, consume)
        names = self._name_by_id
        out = []
        for raw in records:
            e = maps.Event.from_buffer_copy(raw.ljust(ctypes.sizeof(maps.Event), b"\0"))
            reason = maps.Reason(e.reason)
            if e.action == maps.Action.BLOCKED:     # the kernel marked the source's device
                owner = self._name_by_ip.get(_ip_str(e.src))
                if owner is not None:
                    self._watch_kernel_mark(self._devices[owner].device_id)
            out.append({"device": names.get(e.device, e.device or None),
                        "umbox": maps.REASON_UMBOX[reason], "reason": reason.name.lower(),
                        "src": _ip_str(e.src), "dst": _ip_str(e.dst), "dst_port": e.dst_port,
                        "proto": e.proto, "action": maps.Action(e.action).name.lower(),
                        "count": e.count, "suppressed": e.suppressed, "ts_ns": e.ts_ns})
        return out

    def consume_events(self) -> None:
        self._loaded_ring().consume_read()

    def events_pending(self) -> bool:
        return self._loaded_ring().pending()

    def block_source(self, ip: str, seconds: int, device: str | None = None) -> None:
        """Puts a source into the kernel drop set (0 seconds: until unblocked)."""
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ConfigError(f"drop set: invalid IPv4 address {ip!r}") from None
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
            raise ConfigError(f"drop set: invalid duration {seconds!r} for {ip}")
        expires = time.monotonic_ns() + seconds * 10**9 if seconds else 0
        entry = maps.Drop(expires_ns=expires, device=self.device_id(device) if device else 0,
                          reason=maps.Reason.DROP_SET)
        key = ctypes.c_uint32(_ip_be(ip))
        owner = self._maps["kalki_dev_by_ip"].lookup(key)
        if owner is not None:       # before the add: a crash in between leaves a lookup too many
            self._mark_own_drop(owner.value)
        self._maps["kalki_drop_set"].update(key, entry)
        self.decoy_source(ip)

    def _mark_own_drop(self, device_id: int) -> None:
        """The device's packets from its own address are looked up in the drop set (kalki.h:
        kalki_own_drop): before its address goes in, or when it is given one that is there."""
        self._own_drop_marks.add(device_id)     # (watched even if the write fails)
        self._maps["kalki_own_drop"].update(ctypes.c_uint32(device_id), ctypes.c_uint32(1))

    def _watch_kernel_mark(self, device_id: int) -> None:
        """A mark the kernel set, watched by drift from now on (if it is still there: a late
        event may follow an unblock)."""
        held = self._maps["kalki_own_drop"].lookup(ctypes.c_uint32(device_id))
        if held is not None and held.value:
            self._own_drop_marks.add(device_id)

    def _mark_blocked_owners(self) -> None:
        """Every device whose address is in the drop set, marked (reconcile: whatever the
        maps went through before). From the smaller side: the drop set's sources while there
        are no more of them than devices, else the devices' addresses. A restart under attack
        finds up to 65,536 sources, two system calls each; the devices' side costs three per
        device whatever the attack."""
        by_ip, drop = self._maps["kalki_dev_by_ip"], self._maps["kalki_drop_set"]
        sources = list(itertools.islice(drop.keys(), len(self._devices) + 1))
        if len(sources) <= len(self._devices):
            owners = [by_ip.lookup(source) for source in sources]
        else:
            owners = [owner for address, owner in list(by_ip.items()) if drop.lookup(address) is not None]
        for owner in owners:
            if owner is not None:
                self._mark_own_drop(owner.value)

    def _cleared_own_drop_marks(self) -> list[int]:
        """Devices this process marked (or saw the kernel mark: events()) whose mark is gone:
        the kernel would not drop them. Only reads (drift runs it in a worker thread)."""
        marks = self._maps["kalki_own_drop"]
        return sorted(i for i in set(self._own_drop_marks)
                      if not (marks.lookup(ctypes.c_uint32(i)) or ctypes.c_uint32()).value)

    def decoy_source(self, ip: str) -> bool:
        """Lets the decoys of deception devices answer a source in the drop set: nftables'
        `attackers` gets it first (for a minute past the drop set's expiry, so nftables always
        outlasts XDP), then the drop-set entry says so (KALKI_DROP_DECOY). Until then XDP drops
        its packets to every device. False if the source is not in the drop set."""
        key = ctypes.c_uint32(_ip_be(ip))
        entry = self._maps["kalki_drop_set"].lookup(key)
        if entry is None or self._nft is None:     # (no nftables: a bench's or a trial's pins)
            return False
        if entry.reason & maps.DROP_DECOY:
            return True
        left = (entry.expires_ns - time.monotonic_ns()) // 10**9 if entry.expires_ns else None
        self._loaded_nft().add_attacker(ip, None if left is None else max(1, left) + 60)
        entry.reason |= maps.DROP_DECOY
        self._maps["kalki_drop_set"].update(key, entry)
        return True

    def unblock_source(self, ip: str) -> bool:
        key = ctypes.c_uint32(_ip_be(ip))
        removed = self._maps["kalki_drop_set"].delete(key)
        owner = self._maps["kalki_dev_by_ip"].lookup(key)
        if owner is not None:
            # Cleared, then the drop set read again: a detector that blocked the address
            # meanwhile marks it after its add, so one of the two sees the other (kalki.h).
            self._own_drop_marks.discard(owner.value)
            self._maps["kalki_own_drop"].update(owner, ctypes.c_uint32(0))
            entry = self._maps["kalki_devices"].lookup(owner)
            addresses = {key.value, entry.ipv4} if entry is not None else {key.value}
            if any(self._maps["kalki_drop_set"].lookup(ctypes.c_uint32(a)) is not None
                   for a in addresses):
                self._mark_own_drop(owner.value)
        if self._nft is not None:
            self._nft.remove_attacker(ip)
        return removed

    def drop_set(self) -> list[dict]:
        now = time.monotonic_ns()
        names = self._name_by_id
        out = []
        for k, v in self._maps["kalki_drop_set"].items():
            if v.expires_ns and v.expires_ns < now:
                continue
            out.append({"source": _ip_str(k.value), "device": names.get(v.device),
                        "reason": maps.Reason(v.reason & ~maps.DROP_DECOY).name.lower(),
                        "decoy": bool(v.reason & maps.DROP_DECOY),
                        "seconds_left": round((v.expires_ns - now) / 1e9, 1) if v.expires_ns else None})
        return out

    # -- reconcile ------------------------------------------------------------------------
    def _links(self) -> dict[str, int | None]:
        """{interface XDP belongs on: the id of its XDP program or None}; one that is not
        there is left out."""
        if self._xdp_links is None:
            self._xdp_links = links.XdpLinks(self.namespace)
        return self._xdp_links.programs(self._attachments().values())

    def attached_programs(self) -> dict[str, int | None]:
        by_name = self._links()
        return {ifname: by_name.get(ifname) for ifname in self._attachments().values()}

    def missing_interfaces(self) -> list[str]:
        """The interfaces XDP belongs on that are not there (an adapter unplugged)."""
        by_name = self._links()
        return [i for i in self._attachments().values() if i not in by_name]

    def drift(self) -> list[str]:
        """What differs between the kernel and what this data path put there, each named:
        the pins, the XDP attachments, the nftables table's outline, every device's XDP
        entry, the drop set's marks, and every MAC_SLOTS_CHECK_SECONDS kalki_mac_slots. Only
        reads: the supervisor runs it in a worker thread twice a second and confirms what it
        finds on the loop. The table is listed only when nftables' generation
        says somebody else committed, and once a minute (Nft.untouched): a listing holds the
        GIL for most of its 14 ms at 100 devices, and posture changes on the loop waited for
        it (bench_tamper.py: drift_ms, drift_full_ms)."""
        problems = []
        gone = [n for n in [*maps.MAPS, maps.RINGBUF, *self._attachments()]
                if not os.path.exists(f"{self.pin_dir}/{n}")]
        if gone:
            problems.append(f"pinned objects missing under {self.pin_dir}: {', '.join(gone)}")
        programs = self._links()
        for prog, ifname in self._attachments().items():
            if ifname not in programs:
                problems.append(f"interface {ifname} is missing: its XDP program is attached "
                                "again as soon as it is back")
            elif programs[ifname] != self._prog_ids.get(prog):
                problems.append(f"XDP program {prog} is not attached to {ifname} "
                                f"(attached: {programs[ifname]})")
        nft_ = self._loaded_nft()
        if not nft_.untouched():
            generation = nft_.generation()
            outline = nft_.fingerprint()
            wanted = nft_.expected_fingerprint(dict(self._nft_state))
            if outline is None:
                problems.append("nftables table inet kalki is gone")
            elif outline != wanted:
                diff = [k for k in wanted if outline.get(k) != wanted[k]]
                problems.append(f"nftables table inet kalki changed: {', '.join(diff) or 'unreadable'}")
            else:
                nft_.trust(generation)
        applied = list(self._devices.items())     # (a snapshot: this runs in a worker thread)
        held = self._postures({name: a.device_id for name, a in applied})
        changed = [name for name, a in applied if held[name] != a.spec.posture]
        if changed:
            problems.append(f"XDP entries changed for {', '.join(sorted(changed))}")
        if time.monotonic() - self._slots_checked_at >= MAC_SLOTS_CHECK_SECONDS:
            wrong = self._mac_slots_checked(applied, fix=False)
            if wrong:
                problems.append(f"kalki_mac_slots changed: {', '.join(wrong)}")
            else:
                self._slots_checked_at = time.monotonic()
        cleared = self._cleared_own_drop_marks()
        if cleared:
            names = self._name_by_id
            problems.append("the drop set's marks cleared for "
                            + ", ".join(str(names.get(i, f"device id {i}")) for i in cleared))
        return problems

    def restore(self, wanted: list[DeviceSpec]) -> dict:
        """After drift(): pins again what was unpinned (the supervisor still holds every map and
        program), re-creates the table if it is gone, and converges the rest (reconcile)."""
        for name, m in self._maps.items():
            if not os.path.exists(f"{self.pin_dir}/{name}"):
                bpf.obj_pin(m.fd, f"{self.pin_dir}/{name}")
        ring = self._loaded_ring()
        if not os.path.exists(f"{self.pin_dir}/{maps.RINGBUF}"):
            bpf.obj_pin(ring.fileno(), f"{self.pin_dir}/{maps.RINGBUF}")
        for prog, fd in self._prog_fds.items():
            if not os.path.exists(f"{self.pin_dir}/{prog}"):
                bpf.obj_pin(fd, f"{self.pin_dir}/{prog}")
        nft_ = self._loaded_nft()
        if nft_.fingerprint() is None:
            nft_.ensure_table()
        return self.reconcile(wanted)

    def _drop_stale_nft(self, nft_state: dict[int, dict], by_mac: dict[str, int], report: dict) -> None:
        """nftables entries that belong to no device the maps hold under that id (the maps were
        made anew while the table stayed, or the other way round) go, in one transaction:
        otherwise re-adding a device under its new id meets its MAC under the old one ("File
        exists"). Until the devices are applied again their traffic meets the closed default."""
        kernel_ids = set(by_mac.values())
        stale = [i for i, cur in nft_state.items()
                 if (cur.get("macs") and any(by_mac.get(m) != i for m in cur["macs"]))
                 or (not cur.get("macs") and i not in kernel_ids)]
        if not stale:
            return
        commands = [c for i in stale for c in self._loaded_nft().removal_commands(i, nft_state[i])]
        self._loaded_nft().run(commands, f"removing {len(stale)} stale device entries")
        for i in stale:
            del nft_state[i]
        report["stale_nft"] = sorted(stale)

    def pinned_program_ids(self) -> dict[str, int]:
        out = {}
        for prog, ifname in self._attachments().items():
            fd = bpf.obj_get(f"{self.pin_dir}/{prog}")
            try:
                out[ifname] = bpf.prog_info(fd).id
            finally:
                os.close(fd)
        return out

    def reconcile(self, wanted: list[DeviceSpec]) -> dict:
        """Reads back what the kernel has and converges it to `wanted`. Returns the report:
        what was already right and what had to be fixed."""
        report: dict[str, list] = {"reattached": [], "added": [], "fixed": [], "removed": [], "unchanged": []}
        specs = [w.checked() for w in wanted]
        compiled = {s.name: self._compile_now(s) for s in specs}
        pinned = self.pinned_program_ids()
        programs = self._links()
        # (an interface that is not there cannot take XDP: it is attached when it is back)
        missing = {p: i for p, i in self._attachments().items()
                   if i in programs and programs[i] != pinned[i]}
        report["absent"] = [i for i in self._attachments().values() if i not in programs]
        if missing:
            loader.run_child(self.pin_dir, missing, self.namespace, only_reattach=True)
            report["reattached"] = sorted(missing.values())
        by_mac = self._kernel_ids_by_mac()
        self._nft_state = nft_state = self._loaded_nft().read_back()
        self._drop_stale_nft(nft_state, by_mac, report)
        self._lists, self._allow_of, self._stale_ids = None, None, True   # read the kernel afresh
        wanted_ids = set()
        for s in specs:
            c = compiled[s.name]
            device_id = by_mac.get(s.mac)
            if device_id is not None:
                self._put(_Applied(s, device_id, c))
            if device_id is None:
                self._forget(s.name)
                wanted_ids.add(self.apply(s))
                report["added"].append(s.name)
                continue
            wanted_ids.add(device_id)
            entry = self._maps["kalki_devices"].lookup(ctypes.c_uint32(device_id))
            ip_id = self._maps["kalki_dev_by_ip"].lookup(ctypes.c_uint32(_ip_be(s.ip)))
            allow_id = self._list_id(self._allow_content(c), create=False)
            nft_cur = nft_state.get(device_id)
            nft_ok = self._loaded_nft().plan(device_id, s.mac, s.ip, c.conn_limit, c.gate_port,
                                             nft_cur, **_nft_flags(c)) is None
            kernel_ok = (allow_id is not None and entry is not None
                         and bytes(entry) == bytes(self._device_entry(s, c, allow_id))
                         and ip_id is not None and ip_id.value == device_id)
            if kernel_ok and nft_ok:
                self._write_gate_policy(s, c)       # (the files may be gone, /run is a tmpfs)
                report["unchanged"].append(s.name)
            else:
                self._put(_Applied(s, device_id, c))
                self._write_indexes(device_id, s, None)
                self.apply(s)
                if entry is not None and entry.ipv4 != _ip_be(s.ip):   # the address it had
                    old = ctypes.c_uint32(entry.ipv4)     # (once its entry no longer names it)
                    held = self._maps["kalki_dev_by_ip"].lookup(old)
                    if held is not None and held.value == device_id:
                        self._maps["kalki_dev_by_ip"].delete(old)
                report["fixed"].append(s.name)
        for k in list(self._maps["kalki_devices"].keys()):
            if k.value not in wanted_ids:
                entry = self._maps["kalki_devices"].lookup(k)
                macs = [m for m, i in by_mac.items() if i == k.value]
                self._remove_id(k.value, macs, [_ip_str(entry.ipv4)] if entry else [])
                report["removed"].append(k.value)
        for name in [n for n, a in self._devices.items() if a.device_id not in wanted_ids]:
            self._forget(name)
        self._collect_lists()
        self._mac_slots_checked(list(self._devices.items()), fix=True)
        self._mark_blocked_owners()
        for device_id in self._cleared_own_drop_marks():
            self._mark_own_drop(device_id)
        try:
            report["classes"] = self._loaded_nft().ensure_classes(self._prepared_classes)
        except DataplaneError as e:     # the devices are converged; a change that needs a
            report["classes_error"] = [str(e)]      # class makes it on its way
        return report


READ_ONE_BY_ONE = 4     # read_back_all: up to this many devices, a lookup each
# drift() reads all of kalki_mac_slots at most this often: the kernel copies the 8,192 slots one
# by one, about 1 ms (bench_tamper), where the rest of a look takes 0.4 ms at 100 devices. The
# nftables table is listed once a minute for the same reason.
MAC_SLOTS_CHECK_SECONDS = 10.0
SLOTS_PER_LOOKUP = 16   # read_back_all: a batch only over at most this many slots per device


def _held_back(entry: maps.Device) -> maps.Device:
    """The entry without DECEPTION: what apply() writes until nftables redirects to the decoy."""
    first = maps.Device.from_buffer_copy(entry)
    first.flags = first.flags & ~int(maps.Flag.DECEPTION) & 0xFFFFFFFF
    return first


def _posture_of(entry: maps.Device | None) -> int | None:
    """A device entry's posture code; None for a free slot."""
    return entry.posture if entry is not None and entry.flags & maps.Flag.PRESENT else None


def _nft_flags(compiled: umbox.CompiledStack) -> dict:
    return {"lateral_block": bool(compiled.flags & maps.Flag.LATERAL_BLOCK),
            "quarantine": bool(compiled.flags & maps.Flag.QUARANTINE),
            "deception": bool(compiled.flags & maps.Flag.DECEPTION)}


def remove_pins_dir(pin_dir: Path) -> None:
    if pin_dir.is_dir():
        for p in pin_dir.iterdir():
            p.unlink()
        pin_dir.rmdir()


def remove_pins(instance: str) -> None:
    pin_dir = Path(f"{BPFFS}/kalki/{instance}")
    remove_pins_dir(pin_dir)
    parent = pin_dir.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
