"""ctypes mirror of ebpf/kalki.h: the names, structs, flag bits and reason codes of the contract.

appliance.dataplane.bpf.Map compares these sizes with what the kernel reports, so a drift between the
two files is an error at start, not corrupted entries.
"""
import ctypes
import enum

MAX_DEVICES = 4096     # device slots (slot 0 is "unknown"): ebpf/kalki.h, -DKALKI_MAX_DEVICES
ALLOW_RULES = 8
KEPT_LISTS = 256     # allow-lists no device uses, kept for one coming back (api._collect_lists)
MAX_NAME_BINDINGS = 65536
LOGIN_PORTS = 4


class Flag(enum.IntFlag):
    QUARANTINE = 1 << 0
    ALLOWLIST = 1 << 1
    RATE_LIMIT = 1 << 2
    PORT_SCAN = 1 << 3
    SYN_FLOOD = 1 << 4
    BRUTE_FORCE = 1 << 5
    EGRESS_ANOMALY = 1 << 6
    EGRESS_BLOCK = 1 << 7
    LATERAL_BLOCK = 1 << 8
    ANTI_SPOOF = 1 << 9
    QUARANTINE_MGMT = 1 << 10
    PRESENT = 1 << 11
    DNS_GATEWAY_ONLY = 1 << 12
    DECEPTION = 1 << 13


class Reason(enum.IntEnum):
    PASS = 0
    DROP_SET = 1
    QUARANTINE = 2
    UNKNOWN_DEVICE = 3
    SPOOF = 4
    LATERAL = 5
    ALLOWLIST = 6
    EGRESS_ANOMALY = 7
    RATE_PACKETS = 8
    RATE_BYTES = 9
    PORT_SCAN = 10
    SYN_FLOOD = 11
    BRUTE_FORCE = 12
    NOT_IPV4 = 13
    GATEWAY = 14
    STEALTH_SCAN = 15


REASON_SLOTS = 16


DROP_DECOY = 1 << 31     # kalki_drop.reason: nftables' `attackers` has the source (deception)


class Action(enum.IntEnum):
    REPORTED = 0
    DROPPED = 1
    BLOCKED = 2


# Which umbox a reason belongs to, for counters "per device and umbox".
REASON_UMBOX = {
    Reason.PASS: None, Reason.DROP_SET: "drop_set", Reason.QUARANTINE: "quarantine",
    Reason.UNKNOWN_DEVICE: "quarantine", Reason.SPOOF: "anti_spoof",
    Reason.LATERAL: "lateral_block", Reason.ALLOWLIST: "allowlist",
    Reason.EGRESS_ANOMALY: "egress_anomaly", Reason.RATE_PACKETS: "rate_limit",
    Reason.RATE_BYTES: "rate_limit", Reason.PORT_SCAN: "port_scan",
    Reason.SYN_FLOOD: "syn_flood", Reason.BRUTE_FORCE: "brute_force",
    Reason.NOT_IPV4: "dispatcher", Reason.GATEWAY: "gateway_guard",
    Reason.STEALTH_SCAN: "port_scan",
}


class Settings(ctypes.Structure):
    _fields_ = [("gateway_ip", ctypes.c_uint32), ("lan_net", ctypes.c_uint32),
                ("lan_mask", ctypes.c_uint32), ("mqtt_port", ctypes.c_uint32),
                ("events_per_sec", ctypes.c_uint32), ("unknown_flags", ctypes.c_uint32)]


class Mac(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16)]


class MacSlot(ctypes.Structure):
    EMPTY_IS_ABSENT = True      # an array: a free slot is all zeros
    _fields_ = [("addr", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint16), ("device", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32)]


class Device(ctypes.Structure):
    EMPTY_IS_ABSENT = True      # kalki_devices is an array: a free slot is all zeros
    _fields_ = [("flags", ctypes.c_uint32), ("ipv4", ctypes.c_uint32), ("mac", ctypes.c_uint8 * 6),
                ("posture", ctypes.c_uint16),
                ("packet_interval_ns", ctypes.c_uint64), ("packet_tolerance_ns", ctypes.c_uint64),
                ("byte_cost_ns_x1024", ctypes.c_uint64), ("byte_tolerance_ns", ctypes.c_uint64),
                ("scan_ports", ctypes.c_uint32), ("scan_window_ms", ctypes.c_uint32),
                ("scan_block_s", ctypes.c_uint32),
                ("syn_limit", ctypes.c_uint32), ("syn_window_ms", ctypes.c_uint32),
                ("syn_block_s", ctypes.c_uint32),
                ("bf_attempts", ctypes.c_uint32), ("bf_window_ms", ctypes.c_uint32),
                ("bf_block_s", ctypes.c_uint32), ("bf_ports", ctypes.c_uint16 * LOGIN_PORTS),
                ("allow_id", ctypes.c_uint32)]


class AllowKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class AllowRule(ctypes.Structure):
    _fields_ = [("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8), ("port", ctypes.c_uint16)]


class AllowValue(ctypes.Structure):
    _fields_ = [("count", ctypes.c_uint32), ("rules", AllowRule * ALLOW_RULES)]


class AllowSeen(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint32), ("port", ctypes.c_uint32), ("list", ctypes.c_uint32),
                ("trie", ctypes.c_uint32)]


class NameKey(ctypes.Structure):
    _fields_ = [("device", ctypes.c_uint32), ("addr", ctypes.c_uint32)]


class NameValue(ctypes.Structure):
    _fields_ = [("expires_ns", ctypes.c_uint64), ("keep_s", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("rules", AllowRule * ALLOW_RULES)]


class Drop(ctypes.Structure):
    _fields_ = [("expires_ns", ctypes.c_uint64), ("device", ctypes.c_uint32), ("reason", ctypes.c_uint32)]


class Counter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Event(ctypes.Structure):
    _fields_ = [("ts_ns", ctypes.c_uint64), ("device", ctypes.c_uint32), ("reason", ctypes.c_uint32),
                ("src", ctypes.c_uint32), ("dst", ctypes.c_uint32), ("dst_port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("action", ctypes.c_uint8), ("count", ctypes.c_uint32),
                ("suppressed", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class DevState(ctypes.Structure):
    """Private to the kernel program; user space only zeroes it for a new device."""
    _fields_ = [("unused", ctypes.c_uint64),
                ("packet_tat", ctypes.c_uint64), ("byte_tat", ctypes.c_uint64),
                ("syn_window_ns", ctypes.c_uint64), ("syn_count", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("scan_seen_ns", ctypes.c_uint64),
                ("scan_src", ctypes.c_uint32), ("scan_dst", ctypes.c_uint32),
                ("scan_port", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class EventLimit(ctypes.Structure):
    _fields_ = [("window_ns", ctypes.c_uint64), ("count", ctypes.c_uint32), ("suppressed", ctypes.c_uint32)]


U32 = ctypes.c_uint32

# name in the kernel -> (key type, value type); the pinned file has the same name.
MAPS = {
    "kalki_settings": (U32, Settings),
    "kalki_dev_by_mac": (Mac, U32),
    "kalki_mac_slots": (U32, MacSlot),            # kalki_dev_by_mac again, in MAC-hashed pairs
    "kalki_dev_by_ip": (U32, U32),
    "kalki_devices": (U32, Device),
    "kalki_dev_state": (U32, DevState),
    "kalki_event_limit": (U32, EventLimit),
    "kalki_counters": (U32, Counter),
    "kalki_drop_set": (U32, Drop),
    "kalki_own_drop": (U32, U32),                 # device id -> may its address be dropped
    "kalki_allow": (AllowKey, AllowValue),        # the template of each list's trie: empty
    "kalki_allow_lists": (U32, U32),              # list id -> its trie (a map id when read)
    "kalki_allow_list_ids": (U32, U32),           # list id -> its trie's map id (read this)
    "kalki_list_gen": (U32, U32),                 # list id -> its trie's map id, for XDP
    "kalki_allow_seen": (U32, AllowSeen),         # per CPU, device id -> last flow allowed
    "kalki_name_allow": (NameKey, NameValue),
}
RINGBUF = "kalki_events"
PROGRAMS = ("xdp_from_devices", "xdp_to_devices")
