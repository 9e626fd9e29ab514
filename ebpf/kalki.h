/* The contract between the XDP dispatcher and user space (appliance/maps.py mirrors it).
 * Map names, key and value structs, flag bits and reason codes live here and nowhere else.
 * Change a struct here and in appliance/maps.py together: the loader compares sizes. */
#ifndef KALKI_H
#define KALKI_H

#ifndef KALKI_MAX_DEVICES
#define KALKI_MAX_DEVICES 4096          /* device slots; slot 0 is "unknown device" */
#endif
#ifndef KALKI_RINGBUF_PAGES
#define KALKI_RINGBUF_PAGES 64
#endif
#ifndef KALKI_MAX_NAME_BINDINGS
#define KALKI_MAX_NAME_BINDINGS 65536   /* (device, address) pairs learnt from DNS answers */
#endif
#define KALKI_ALLOW_RULES 8             /* (proto, port) pairs per allow-list prefix */
#define KALKI_KEPT_LISTS 256            /* allow-lists no device uses, kept for one coming back */
#define KALKI_LOGIN_PORTS 4

/* Umbox bits in kalki_device.flags: which in-kernel umboxes are on for the device. */
#define KALKI_F_QUARANTINE      (1u << 0)
#define KALKI_F_ALLOWLIST       (1u << 1)
#define KALKI_F_RATE_LIMIT      (1u << 2)
#define KALKI_F_PORT_SCAN       (1u << 3)
#define KALKI_F_SYN_FLOOD       (1u << 4)
#define KALKI_F_BRUTE_FORCE     (1u << 5)
#define KALKI_F_EGRESS_ANOMALY  (1u << 6)
#define KALKI_F_EGRESS_BLOCK    (1u << 7)
#define KALKI_F_LATERAL_BLOCK   (1u << 8)
#define KALKI_F_ANTI_SPOOF      (1u << 9)
#define KALKI_F_QUARANTINE_MGMT (1u << 10)  /* quarantine still lets MQTT reach the gateway */
#define KALKI_F_PRESENT         (1u << 11)  /* in every entry the appliance writes: a slot of
					     * kalki_devices without it is free */
#define KALKI_F_DNS_GATEWAY_ONLY (1u << 12) /* DNS to other resolvers refused, not redirected */
#define KALKI_F_DECEPTION       (1u << 13)  /* a drop-set source's packets to it go to the decoy */

/* Why a packet was passed or dropped: the second index of the counters map, and the
 * "umbox" of an event. */
enum kalki_reason {
	KALKI_R_PASS = 0,
	KALKI_R_DROP_SET,
	KALKI_R_QUARANTINE,
	KALKI_R_UNKNOWN_DEVICE,
	KALKI_R_SPOOF,
	KALKI_R_LATERAL,
	KALKI_R_ALLOWLIST,
	KALKI_R_EGRESS_ANOMALY,
	KALKI_R_RATE_PACKETS,
	KALKI_R_RATE_BYTES,
	KALKI_R_PORT_SCAN,
	KALKI_R_SYN_FLOOD,
	KALKI_R_BRUTE_FORCE,
	KALKI_R_NOT_IPV4,
	KALKI_R_GATEWAY,         /* a device opened something on the gateway it has no use for */
	KALKI_R_STEALTH_SCAN,    /* TCP flags no connection sends (NULL, FIN, XMAS, SYN+FIN, ...) */
	KALKI_R_MAX = 16,        /* slots per device: room for no more reasons */
};

/* Event actions */
#define KALKI_A_REPORTED 0      /* seen, packet passed */
#define KALKI_A_DROPPED  1      /* this packet dropped */
#define KALKI_A_BLOCKED  2      /* packet dropped and source put into the drop set */

/* map: kalki_settings, array[1] */
struct kalki_settings {
	__u32 gateway_ip;        /* network byte order, the gateway's device-side address */
	__u32 lan_net;           /* network byte order */
	__u32 lan_mask;          /* network byte order */
	__u32 mqtt_port;         /* host order; the management path for quarantine */
	__u32 events_per_sec;    /* per device and reason: in-kernel limit on ring buffer events */
	__u32 unknown_flags;     /* umbox flags applied to unknown MACs (fail closed) */
};

/* map: kalki_dev_by_mac, hash kalki_mac -> __u32 device id */
struct kalki_mac {
	__u8 addr[6];
	__u16 pad;
};

/* map: kalki_mac_slots, array of 2 * KALKI_MAX_DEVICES kalki_mac_slot: kalki_dev_by_mac's
 * entries again, each in one of the two slots of the pair its MAC hashes to, where it fits. A
 * packet's MAC is compared with its pair's two slots; one in neither is looked up in
 * kalki_dev_by_mac, which stays the index: a hash map lookup is about a quarter of a passing
 * packet's cost (bench/README.md, stop 28), two slots' compares a few ns. Only user space
 * writes it: a slot after the hash map's entry, and clears it before the entry goes.
 * The pair's first slot: 2 * (kalki_mac_hash(the slot's first 8 bytes as a __u64, read in
 * the machine's byte order) % KALKI_MAX_DEVICES), kalki_mac_hash being
 *   h = ((__u32)(m >> 16) ^ ((__u32)m & 0xffff) * 0x9E3779B1) * 0x85EBCA77; h ^ h >> 16
 * (appliance/dataplane/api.py: mac_pair). Not keyed: user space decides who gets a slot, and
 * a MAC chosen to share a device's pair only costs its own packets the hash lookup. */
struct kalki_mac_slot {
	__u8 addr[6];
	__u16 pad;               /* 0 */
	__u32 device;            /* 0: a free slot */
	__u32 pad2;
};

/* map: kalki_dev_by_ip, hash __u32 (network order) -> __u32 device id */

/* map: kalki_devices, array indexed by device id -> kalki_device (as a hash it cost about 22 ns
 * more per packet, bench/README.md); a free slot is all zeros, without KALKI_F_PRESENT.
 * A posture change is one update of this entry; state (buckets, windows) lives elsewhere and
 * survives it. */
struct kalki_device {
	__u32 flags;
	__u32 ipv4;              /* network order */
	__u8 mac[6];
	__u16 posture;           /* opaque to the kernel; echoed in read-back */
	__u64 packet_interval_ns;   /* rate limit, 1e9 / packets per second; 0 = no packet limit */
	__u64 packet_tolerance_ns;  /* (burst - 1) * interval */
	__u64 byte_cost_ns_x1024;   /* 1024e9 / bytes per second; 0 = no byte limit */
	__u64 byte_tolerance_ns;    /* burst bytes at the rate */
	__u32 scan_ports;        /* distinct (address, port) per source in the window */
	__u32 scan_window_ms;
	__u32 scan_block_s;      /* 0 = report only */
	__u32 syn_limit;         /* SYNs to the device in the window */
	__u32 syn_window_ms;
	__u32 syn_block_s;
	__u32 bf_attempts;       /* connection attempts to a login port per source */
	__u32 bf_window_ms;
	__u32 bf_block_s;
	__u16 bf_ports[KALKI_LOGIN_PORTS];  /* host order, 0 = unused */
	__u32 allow_id;          /* the device's slot in kalki_allow_lists (0: none) */
};

/* map: kalki_allow_lists, array of maps: allow_id -> that list's LPM trie, shaped as map
 * kalki_allow (the template: never filled). Devices with the same destinations share one
 * list; a lookup walks one list's few prefixes, however many lists there are. User space
 * fills a new list's trie before the list takes its slot.
 *
 * map: kalki_list_gen, array __u32 slot -> the map id of the trie in that slot, written before
 * the slot: what a remembered verdict (kalki_allow_seen) was given by. A map id is not given
 * again until the kernel's ids wrap round, so a slot given a new trie is never taken for the
 * old one, whatever device or restart came between.
 *
 * map: kalki_allow_list_ids, hash __u32 slot -> the map id of the trie in that slot, for
 * user space alone: it is written beside each slot and read instead of the slots, because
 * on Linux 6.1 (the image's kernel) every user-space read of an array of maps waits for an
 * RCU grace period (maybe_wait_bpf_programs): reading 8,192 slots took 140 s at boot. */
struct kalki_allow_key {
	__u32 prefixlen;
	__u32 addr;              /* network order */
};
struct kalki_allow_rule {
	__u8 proto;              /* 0 = any */
	__u8 pad;
	__u16 port;              /* host order, 0 = any */
};
struct kalki_allow_value {
	__u32 count;
	struct kalki_allow_rule rules[KALKI_ALLOW_RULES];
};

/* map: kalki_allow_seen, per-CPU array indexed by device id -> kalki_allow_seen: the last
 * flow each CPU found in a device's allow-list trie, and which trie said so. A device's next
 * packet of that flow, with the same list id whose kalki_list_gen is still that trie, is
 * allowed without the trie's lookup (about 14 ns, bench/README.md stop 28). Per CPU, so a
 * verdict is never read half-written. Flows allowed only by a name (kalki_name_allow) are not
 * remembered: each packet there extends its binding. */
struct kalki_allow_seen {
	__u32 dst;               /* network order */
	__u32 port;              /* host order port | proto << 16 */
	__u32 list;              /* 0: nothing remembered */
	__u32 trie;              /* kalki_list_gen of the list then */
};

/* map: kalki_name_allow, hash kalki_name_key -> kalki_name_value. An address that the
 * gateway's resolver gave a device for a name its profile allows, with that name's (proto,
 * port) rules. User space writes it before the answer reaches the device; a flow the device
 * opens to it keeps it at least keep_s seconds longer; user space deletes what expired. */
struct kalki_name_key {
	__u32 device;
	__u32 addr;              /* network order */
};
struct kalki_name_value {
	__u64 expires_ns;        /* kalki_now() clock (CLOCK_MONOTONIC, coarse) */
	__u32 keep_s;
	__u32 count;
	struct kalki_allow_rule rules[KALKI_ALLOW_RULES];
};

/* map: kalki_drop_set, LRU hash __u32 source (network order) -> kalki_drop */
/* map: kalki_own_drop, array indexed by device id -> __u32, non-zero when the device's own
 * address may be in kalki_drop_set. xdp_from_devices looks a packet from a device's own
 * address up in the drop set only then: a drop-set miss is a hash walk, about a fifth of a
 * passing packet's cost (bench/README.md, stop 28). The kernel marks the owner right after a
 * detector's add (kalki_dev_by_ip says whose the address is); user space marks before it
 * blocks an address, and marks a device it gives an address that is in the drop set before the
 * entry names it and again after writing kalki_dev_by_ip, so that whichever of the kernel and
 * user space runs second sees the other's write (but see bench/README.md on barriers). Only
 * user space clears a mark, when it takes the device's address out of the drop set: it clears,
 * then looks the address up again. An entry that expired or was pushed out leaves its mark: a
 * lookup too many, never one too few. */
/* reason: a KALKI_R_*, | KALKI_DROP_DECOY once nftables knows the source */
struct kalki_drop {
	__u64 expires_ns;        /* CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 = never */
	__u32 device;
	__u32 reason;
};
/* The supervisor has put the source in nftables' set `attackers`, which redirects its packets
 * to a deception device's decoy: only then may XDP pass them to such a device. */
#define KALKI_DROP_DECOY (1u << 31)

/* map: kalki_counters, per-CPU array [device * KALKI_R_MAX + reason] */
struct kalki_counter {
	__u64 packets;
	__u64 bytes;
};

/* map: kalki_events, ring buffer of kalki_event */
struct kalki_event {
	__u64 ts_ns;             /* bpf_ktime_get_ns() when it was sent: CLOCK_MONOTONIC */
	__u32 device;
	__u32 reason;
	__u32 src;               /* network order */
	__u32 dst;               /* network order */
	__u16 dst_port;          /* host order */
	__u8 proto;
	__u8 action;
	__u32 count;             /* the detector's count when it fired */
	__u32 suppressed;        /* events dropped by the in-kernel limit since the last one */
	__u32 pad;
};

#endif
