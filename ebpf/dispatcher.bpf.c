/* The XDP dispatcher: one program for every device behind the gateway. Each device's umboxes
 * are bits in its kalki_devices entry, so a posture change is one map update.
 *
 * xdp_from_devices: attached to the device-facing interface, looks devices up by source MAC.
 * xdp_to_devices:   attached to the uplink, looks devices up by destination address.
 *
 * Compile-time features (-D): KALKI_MAX_DEVICES, KALKI_RINGBUF_PAGES, KALKI_NO_DETECTORS, and
 * KALKI_NO_STEALTH_SCAN (the stealth-scan check compiled out: TCP probes are not classified,
 * port_scan counts SYNs and UDP only; for bench/bench_dispatcher.py's on/off comparison). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "kalki.h"

/* Windows and buckets are milliseconds to seconds: the coarse clock (one tick) is enough,
 * and reading it costs less than the clock source (bench/bench_dispatcher.py). */
#define kalki_now() bpf_ktime_get_coarse_ns()
#define NS_PER_MS 1000000ULL
#define NS_PER_S  1000000000ULL
#define ETH_P_ARP_BE 0x0608
#define ETH_P_IP_BE  0x0008

struct arp_ipv4 {
	__be16 htype, ptype;
	__u8 hlen, plen;
	__be16 op;
	__u8 sha[6];
	__be32 spa;
} __attribute__((packed));

struct dev_state {
	__u64 unused;              /* was a spin lock; the layout stays for maps.DevState */
	__u64 packet_tat;          /* rate limit: theoretical arrival times (GCRA) */
	__u64 byte_tat;
	__u64 syn_window_ns;
	__u32 syn_count;
	__u32 pad;
	/* The last flow the scan detector saw for this device: most packets belong to a flow
	 * already counted, and this spares them the lookup. Racy without the lock, and harmless:
	 * a lost race costs one lookup. */
	__u64 scan_seen_ns;
	__u32 scan_src;
	__u32 scan_dst;
	__u32 scan_port;         /* port | proto << 16 */
	__u32 pad2;
};

struct event_limit {
	__u64 window_ns;
	__u32 count;
	__u32 suppressed;
};

/* The detectors' memory of sources: per (device, source, detector) windows, brute force's and
 * the scan detector's, and the flows the scan detector counted. Each is a table of slot pairs
 * indexed by a keyed hash; a slot holds its key, and a key not in its pair takes the pair's
 * least recently used slot (of two windows used in the same tick, the one counting less).
 * (An LRU hash map forgets less, but once it is full each new key, as in an attack from many
 * sources, costs an eviction under the map's lock: 0.5 us more a SYN, bench_dispatcher's
 * syn_new_source.) KALKI_SLOT_SEED, drawn by the loader at each compile, keys the hash, so
 * that a sender cannot pick sources that share an attacker's pair to push its count out. A
 * zero key is an empty slot: devices and detectors start at 1. */
#ifndef KALKI_SLOT_SEED
#error "KALKI_SLOT_SEED: the loader draws one at each compile (appliance/dataplane/loader.py)"
#endif
#ifndef KALKI_SLOTS_LOG2
#define KALKI_SLOTS_LOG2 16
#endif
struct window_slot {
	__u32 device_kind;         /* device | kalki_reason of the detector << 16 */
	__u32 src;
	__u32 count;
	__u32 pad;
	__u64 window_ns;           /* the window's start */
	__u64 used_ns;
};
struct seen_slot {
	__u32 device;
	__u32 src;
	__u32 dst;
	__u32 port;                /* port | proto << 16 */
	__u64 seen_ns;
};

BPF_ARRAY(kalki_settings, struct kalki_settings, 1);
BPF_HASH(kalki_dev_by_mac, struct kalki_mac, __u32, KALKI_MAX_DEVICES);
BPF_ARRAY(kalki_mac_slots, struct kalki_mac_slot, 2 * KALKI_MAX_DEVICES);
BPF_HASH(kalki_dev_by_ip, __u32, __u32, KALKI_MAX_DEVICES);
BPF_ARRAY(kalki_devices, struct kalki_device, KALKI_MAX_DEVICES);
BPF_ARRAY(kalki_dev_state, struct dev_state, KALKI_MAX_DEVICES);
BPF_ARRAY(kalki_event_limit, struct event_limit, KALKI_MAX_DEVICES * KALKI_R_MAX);
BPF_PERCPU_ARRAY(kalki_counters, struct kalki_counter, KALKI_MAX_DEVICES * KALKI_R_MAX);
BPF_TABLE("lru_hash", __u32, struct kalki_drop, kalki_drop_set, 65536);
BPF_ARRAY(kalki_own_drop, __u32, KALKI_MAX_DEVICES);
BPF_ARRAY(kalki_windows, struct window_slot, 1u << KALKI_SLOTS_LOG2);
BPF_ARRAY(kalki_scan_seen, struct seen_slot, 1u << KALKI_SLOTS_LOG2);
/* The template of every allow-list's trie: its size is each list's most prefixes. */
BPF_F_TABLE("lpm_trie", struct kalki_allow_key, struct kalki_allow_value, kalki_allow,
	    1024, BPF_F_NO_PREALLOC);
/* Slots: a list per device at most, its next while a posture changes, and the lists kept. */
BPF_ARRAY_OF_MAPS(kalki_allow_lists, "kalki_allow", 2 * KALKI_MAX_DEVICES + KALKI_KEPT_LISTS);
BPF_ARRAY(kalki_list_gen, __u32, 2 * KALKI_MAX_DEVICES + KALKI_KEPT_LISTS);
BPF_PERCPU_ARRAY(kalki_allow_seen, struct kalki_allow_seen, KALKI_MAX_DEVICES);
/* User space only: which trie each slot holds (kalki.h says why). */
BPF_TABLE("hash", __u32, __u32, kalki_allow_list_ids, 2 * KALKI_MAX_DEVICES + KALKI_KEPT_LISTS);
BPF_F_TABLE("hash", struct kalki_name_key, struct kalki_name_value, kalki_name_allow,
	    KALKI_MAX_NAME_BINDINGS, BPF_F_NO_PREALLOC);
BPF_RINGBUF_OUTPUT(kalki_events, KALKI_RINGBUF_PAGES);

struct packet {
	__u32 src, dst;
	__u16 dport;
	__u8 proto;
	__u8 syn;                  /* TCP SYN without ACK: a connection attempt */
	__u8 opens;                /* may open a flow: TCP SYN, UDP, ICMP echo request, others */
	__u8 probe;                /* TCP flags no connection sends: a stealth-scan signature */
	__u8 fin_ack;              /* TCP FIN+ACK to a port below its source port (Maimon's probe
				    * or a client's close; a server's close goes to a higher port) */
	__u8 pad;
	__u32 len;
};

static __always_inline int count(__u32 device, __u32 reason, struct packet *p, int verdict)
{
	__u32 idx = device * KALKI_R_MAX + reason;
	struct kalki_counter *c = kalki_counters.lookup(&idx);
	if (c) {
		c->packets += 1;
		c->bytes += p->len;
	}
	return verdict;
}

static __always_inline void report(__u32 device, __u32 reason, struct packet *p,
				   __u32 action, __u32 n, __u64 now)
{
	struct kalki_settings *s;
	struct event_limit *lim;
	struct kalki_event *e;
	__u32 zero = 0, suppressed, slot = device * KALKI_R_MAX + reason;

	/* Limited per (device, detector), so one detector's flood cannot hide another's event. */
	s = kalki_settings.lookup(&zero);
	lim = kalki_event_limit.lookup(&slot);
	if (!s || !lim)
		return;
	if (now - lim->window_ns > NS_PER_S) {
		lim->window_ns = now;
		lim->count = 0;
	}
	if (lim->count >= s->events_per_sec) {
		__sync_fetch_and_add(&lim->suppressed, 1);
		return;
	}
	lim->count += 1;
	e = kalki_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		__sync_fetch_and_add(&lim->suppressed, 1);
		return;
	}
	suppressed = lim->suppressed;
	lim->suppressed = 0;
	/* The fine clock, not `now` (the coarse one, a tick behind): the supervisor times its
	 * decision from this moment (CLOCK_MONOTONIC, as its time.monotonic_ns()). One clock
	 * read per event sent, after the event limit. */
	e->ts_ns = bpf_ktime_get_ns();
	e->device = device;
	e->reason = reason;
	e->src = p->src;
	e->dst = p->dst;
	e->dst_port = p->dport;
	e->proto = p->proto;
	e->action = action;
	e->count = n;
	e->suppressed = suppressed;
	e->pad = 0;
	kalki_events.ringbuf_submit(e, 0);
}

/* The first of the two slots (a, b's) belong in. */
static __always_inline __u32 slot_pair(__u32 a, __u32 b)
{
	__u32 h = (a ^ KALKI_SLOT_SEED) * 0x9E3779B1u;
	h = (h ^ (h >> 16) ^ b) * 0x85EBCA77u;
	h ^= h >> 13;
	return (h >> (32 - KALKI_SLOTS_LOG2)) & ~1u;
}

/* Returns the new count of the (device, source, kind) window. */
static __always_inline __u32 window_add(__u32 device, __u32 src, __u32 kind,
					__u32 window_ms, __u64 now)
{
	__u32 key = device | kind << 16, i = slot_pair(src, key), j = i + 1;
	struct window_slot *w = kalki_windows.lookup(&i), *other;
	if (!w)
		return 0;
	if (w->src != src || w->device_kind != key) {
		other = kalki_windows.lookup(&j);
		if (!other)
			return 0;
		if (other->src != src || other->device_kind != key) {
			/* the coarse clock's tick ties often: then the fewer attempts go */
			if (other->used_ns < w->used_ns ||
			    (other->used_ns == w->used_ns && other->count < w->count))
				w = other;
			w->device_kind = key;
			w->src = src;
			w->count = 1;
			w->window_ns = w->used_ns = now;
			return 1;
		}
		w = other;
	}
	if (now - w->window_ns > window_ms * NS_PER_MS) {
		w->window_ns = now;
		w->count = 0;
	}
	w->used_ns = now;
	__sync_fetch_and_add(&w->count, 1);
	return w->count;
}

/* After `src` went into the drop set: the device whose address it is, if any, looks there. */
static __always_inline void mark_owner(__u32 src)
{
	__u32 *owner = kalki_dev_by_ip.lookup(&src), *mark;
	if (!owner)
		return;
	mark = kalki_own_drop.lookup(owner);
	if (mark)
		*mark = 1;
}

/* A detector fired: report, and drop the source for block_s seconds if asked. */
static __always_inline int fire(__u32 device, __u32 reason, struct packet *p, __u32 n,
				__u32 block_s, __u64 now, __u32 offender)
{
	if (!block_s) {
		report(device, reason, p, KALKI_A_REPORTED, n, now);
		return XDP_PASS;
	}
	struct kalki_drop d = {.expires_ns = now + block_s * NS_PER_S, .device = device,
			       .reason = reason};
	if (!kalki_drop_set.lookup(&offender)) {
		kalki_drop_set.update(&offender, &d);
		mark_owner(offender);
		report(device, reason, p, KALKI_A_BLOCKED, n, now);
	}
	return XDP_DROP;
}

static __always_inline struct kalki_drop *drop_entry(__u32 src)
{
	struct kalki_drop *d = kalki_drop_set.lookup(&src);
	if (!d)
		return 0;
	if (d->expires_ns && kalki_now() > d->expires_ns) {
		kalki_drop_set.delete(&src);
		return 0;
	}
	return d;
}

static __always_inline int in_drop_set(__u32 src)
{
	return drop_entry(src) != 0;
}

/* A packet from a device: its own address is looked up only if the device is marked
 * (kalki.h, kalki_own_drop); any other source, an unknown device's included, always. */
static __always_inline int sender_dropped(__u32 device, struct kalki_device *cfg, __u32 src)
{
	__u32 *mark;
	if (device && src == cfg->ipv4) {
		mark = kalki_own_drop.lookup(&device);
		if (mark && !*mark)
			return 0;
	}
	return in_drop_set(src);
}

/* Rate limit per device, both directions drawing from it: a token bucket kept as GCRA's one
 * "theoretical arrival time" per limit, so it needs no lock. Two CPUs racing on one device
 * may both pass a packet the bucket had room for once; a Pi's single receive queue does not
 * race, and elsewhere the overshoot is bounded by the number of CPUs. Returns a reason. */
static __always_inline __u32 rate_limit(__u32 device, struct kalki_device *cfg,
					struct packet *p, __u64 now)
{
	struct dev_state *st = kalki_dev_state.lookup(&device);
	__u64 ptat = 0, btat = 0;
	if (!st)
		return KALKI_R_PASS;
	if (cfg->packet_interval_ns) {
		ptat = st->packet_tat > now ? st->packet_tat : now;
		if (ptat - now > cfg->packet_tolerance_ns)
			return KALKI_R_RATE_PACKETS;
	}
	if (cfg->byte_cost_ns_x1024) {
		btat = st->byte_tat > now ? st->byte_tat : now;
		if (btat - now > cfg->byte_tolerance_ns)
			return KALKI_R_RATE_BYTES;
	}
	if (cfg->packet_interval_ns)
		st->packet_tat = ptat + cfg->packet_interval_ns;
	if (cfg->byte_cost_ns_x1024)
		st->byte_tat = btat + ((p->len * cfg->byte_cost_ns_x1024) >> 10);
	return KALKI_R_PASS;
}

#ifndef KALKI_NO_DETECTORS
/* Distinct (destination, port) per source within the window: the window's count, or 0 if
 * this (destination, port) was counted already. */
static __always_inline __u32 scan_count(__u32 device, struct kalki_device *cfg, struct packet *p,
					__u64 now)
{
	struct dev_state *st = kalki_dev_state.lookup(&device);
	__u64 window = cfg->scan_window_ms * NS_PER_MS;
	__u32 port = p->dport | (__u32)p->proto << 16;
	if (!st)
		return 0;
	if (st->scan_src == p->src && st->scan_dst == p->dst && st->scan_port == port &&
	    now - st->scan_seen_ns <= window)
		return 0;
	__u32 i = slot_pair(p->src, p->dst ^ port * 0x27D4EB2Fu ^ device), j = i + 1;
	struct seen_slot *a = kalki_scan_seen.lookup(&i), *b = kalki_scan_seen.lookup(&j), *seen;
	if (!a || !b)
		return 0;
	seen = a->src == p->src && a->dst == p->dst && a->port == port && a->device == device ? a
	     : b->src == p->src && b->dst == p->dst && b->port == port && b->device == device ? b
	     : 0;
	st->scan_src = p->src;
	st->scan_dst = p->dst;
	st->scan_port = port;
	if (seen && now - seen->seen_ns <= window) {
		st->scan_seen_ns = seen->seen_ns;
		return 0;
	}
	if (!seen) {
		seen = a->seen_ns <= b->seen_ns ? a : b;
		seen->device = device;
		seen->src = p->src;
		seen->dst = p->dst;
		seen->port = port;
	}
	seen->seen_ns = st->scan_seen_ns = now;
	return window_add(device, p->src, KALKI_R_PORT_SCAN, cfg->scan_window_ms, now);
}

static __always_inline int port_scan(__u32 device, struct kalki_device *cfg, struct packet *p,
				     __u64 now, __u32 offender)
{
	__u32 n = scan_count(device, cfg, p, now);
	if (n <= cfg->scan_ports)
		return XDP_PASS;
	return fire(device, KALKI_R_PORT_SCAN, p, n, cfg->scan_block_s, now, offender);
}

#ifndef KALKI_NO_STEALTH_SCAN
/* A stealth scan's packet (p->probe, or p->fin_ack): counted in the port-scan window like a
 * SYN, so a scan of many ports is blocked as a SYN scan is. A probe is a signature by itself:
 * dropped and reported. A FIN+ACK is also how connections close, so it is one only as part of
 * a scan: dropped and reported once the window holds more than scan_ports. Returns the reason
 * it was dropped for, or KALKI_R_PASS. */
static __always_inline __u32 stealth_scan(__u32 device, struct kalki_device *cfg,
					  struct packet *p, __u64 now, __u32 offender)
{
	__u32 n = scan_count(device, cfg, p, now);
	int over = n > cfg->scan_ports;
	if (over)
		fire(device, KALKI_R_PORT_SCAN, p, n, cfg->scan_block_s, now, offender);
	if (!p->probe && !over)
		return KALKI_R_PASS;
	report(device, KALKI_R_STEALTH_SCAN, p, KALKI_A_DROPPED, 1, now);
	return KALKI_R_STEALTH_SCAN;
}
#endif

static __always_inline int syn_flood(__u32 device, struct kalki_device *cfg, struct packet *p,
				     __u64 now)
{
	struct dev_state *st = kalki_dev_state.lookup(&device);
	__u32 n;
	if (!st)
		return XDP_PASS;
	/* No lock, as in window_add: two CPUs racing at a window's start may each reset it, and
	 * a flood then fires a few SYNs later. The lock cost more than the rest of the path. */
	if (now - st->syn_window_ns > cfg->syn_window_ms * NS_PER_MS) {
		st->syn_window_ns = now;
		st->syn_count = 0;
	}
	__sync_fetch_and_add(&st->syn_count, 1);
	n = st->syn_count;
	if (n <= cfg->syn_limit)
		return XDP_PASS;
	/* A flood from many sources: blocking the current source is all the kernel can do;
	 * with syn_block_s 0 the excess SYNs are dropped without blocking anyone. */
	if (!cfg->syn_block_s) {
		report(device, KALKI_R_SYN_FLOOD, p, KALKI_A_DROPPED, n, now);
		return XDP_DROP;
	}
	return fire(device, KALKI_R_SYN_FLOOD, p, n, cfg->syn_block_s, now, p->src);
}

static __always_inline int brute_force(__u32 device, struct kalki_device *cfg,
				       struct packet *p, __u64 now)
{
	int login = 0;
#pragma unroll
	for (int i = 0; i < KALKI_LOGIN_PORTS; i++)
		if (cfg->bf_ports[i] && cfg->bf_ports[i] == p->dport)
			login = 1;
	if (!login)
		return XDP_PASS;
	__u32 n = window_add(device, p->src, KALKI_R_BRUTE_FORCE, cfg->bf_window_ms, now);
	if (n <= cfg->bf_attempts)
		return XDP_PASS;
	return fire(device, KALKI_R_BRUTE_FORCE, p, n, cfg->bf_block_s, now, p->src);
}
#endif

static __always_inline int rule_matches(struct kalki_allow_rule r, struct packet *p)
{
	return (!r.proto || r.proto == p->proto) && (!r.port || r.port == p->dport);
}

/* An address the device resolved, through the gateway, for a name its profile allows. */
static __always_inline int name_allowed(__u32 device, struct packet *p)
{
	struct kalki_name_key k = {.device = device, .addr = p->dst};
	struct kalki_name_value *v = kalki_name_allow.lookup(&k);
	__u64 now, keep;

	if (!v)
		return 0;
	now = kalki_now();
	if (now > v->expires_ns)
		return 0;
#pragma unroll
	for (int i = 0; i < KALKI_ALLOW_RULES; i++) {
		if (i >= v->count)
			break;
		if (rule_matches(v->rules[i], p)) {
			/* Devices reconnect to an address long after they looked it up. */
			keep = now + (__u64)v->keep_s * NS_PER_S;
			if (keep > v->expires_ns + NS_PER_S)
				v->expires_ns = keep;
			return 1;
		}
	}
	return 0;
}

static __always_inline int allowed(__u32 device, struct kalki_device *cfg, struct packet *p)
{
	struct kalki_allow_key k = {.prefixlen = 32, .addr = p->dst};
	struct kalki_allow_value *v = 0;
	__u32 list = cfg->allow_id, port = p->dport | (__u32)p->proto << 16;
	__u32 *gen = list ? kalki_list_gen.lookup(&list) : 0;
	struct kalki_allow_seen *seen = gen ? kalki_allow_seen.lookup(&device) : 0;
	if (seen && seen->list == list && seen->trie == *gen && seen->dst == p->dst &&
	    seen->port == port)
		return 1;
	void *trie = list ? kalki_allow_lists.lookup(&list) : 0;
	if (trie)
		v = bpf_map_lookup_elem(trie, &k);
	if (v) {
#pragma unroll
		for (int i = 0; i < KALKI_ALLOW_RULES; i++) {
			if (i >= v->count)
				break;
			if (rule_matches(v->rules[i], p)) {
				if (seen) {
					seen->list = list;
					seen->trie = *gen;
					seen->dst = p->dst;
					seen->port = port;
				}
				return 1;
			}
		}
	}
	return name_allowed(device, p);
}

/* The device a source MAC belongs to, 0 if none: its pair of kalki_mac_slots, then
 * kalki_dev_by_mac (kalki.h). */
static __always_inline __u32 device_of(struct kalki_mac *mac)
{
	__u64 m = *(__u64 *)mac;
	__u32 h = ((__u32)(m >> 16) ^ ((__u32)m & 0xffff) * 0x9E3779B1u) * 0x85EBCA77u;
	__u32 i = 2 * ((h ^ h >> 16) % KALKI_MAX_DEVICES), j = i + 1, *id;
	struct kalki_mac_slot *slot = kalki_mac_slots.lookup(&i);
	if (slot && slot->device && *(__u64 *)slot == m)
		return slot->device;
	slot = kalki_mac_slots.lookup(&j);
	if (slot && slot->device && *(__u64 *)slot == m)
		return slot->device;
	id = kalki_dev_by_mac.lookup(mac);
	return id ? *id : 0;
}

/* Parses IPv4 and the L4 ports; returns 0 if the packet is not IPv4 or is truncated. */
static __always_inline int parse_ipv4(void *data, void *end, struct packet *p)
{
	struct iphdr *ip = data;
	if ((void *)(ip + 1) > end)
		return 0;
	p->src = ip->saddr;
	p->dst = ip->daddr;
	p->proto = ip->protocol;
	p->dport = 0;
	p->syn = 0;
	p->probe = 0;
	p->fin_ack = 0;
	p->opens = 1;
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		p->opens = 0;
		if ((void *)(t + 1) > end)
			return 1;
		p->dport = __builtin_bswap16(t->dest);
		p->syn = t->syn && !t->ack;
		p->opens = p->syn;
#ifndef KALKI_NO_STEALTH_SCAN
		/* Past the handshake every segment carries ACK; without it only a SYN or a RST is
		 * TCP. So NULL, FIN, XMAS (FIN+PSH+URG) and any FIN+URG without ACK are probes,
		 * and so is SYN+FIN or SYN+RST, whatever else is set. */
		p->probe = (!t->ack && !t->syn && !t->rst) || (t->syn && (t->fin || t->rst));
		p->fin_ack = t->fin && t->ack && !t->syn && !t->rst &&
			     p->dport < __builtin_bswap16(t->source);
#endif
	} else if (ip->protocol == IPPROTO_ICMP) {
		__u8 *type = l4;
		if ((void *)(type + 1) > end)
			return 1;
		p->opens = *type == 8;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > end)
			return 1;
		p->dport = __builtin_bswap16(u->dest);
	}
	return 1;
}

static __always_inline int to_gateway_service(struct kalki_settings *s, struct packet *p,
					      __u32 flags)
{
	if (p->proto == IPPROTO_UDP && (p->dport == 67 || p->dport == 68))
		return 1;    /* DHCP, often to broadcast before the device has an address */
	if (p->dst != s->gateway_ip)
		return 0;
	if (p->dport == 53 && (p->proto == IPPROTO_UDP || p->proto == IPPROTO_TCP))
		return 1;
	if ((flags & KALKI_F_QUARANTINE_MGMT) && p->proto == IPPROTO_TCP &&
	    p->dport == s->mqtt_port)
		return 1;
	return 0;
}

/* Broadcast (limited, or the LAN's own) and multicast (224.0.0.0/4): what a device sends to
 * whoever listens on its LAN. */
static __always_inline int lan_chatter(struct kalki_settings *s, __be32 dst)
{
	return dst == 0xffffffff || dst == (s->lan_net | ~s->lan_mask) ||
	       (__builtin_bswap32(dst) >> 28) == 0xe;
}

static __always_inline int device_service(struct kalki_settings *s, struct packet *p)
{
	if (to_gateway_service(s, p, KALKI_F_QUARANTINE_MGMT))
		return 1;    /* DHCP, DNS, MQTT */
	if (p->proto == IPPROTO_UDP && p->dport == 123)
		return 1;    /* NTP */
	return p->proto == IPPROTO_ICMP;    /* echo requests: the rest opens nothing */
}

int xdp_from_devices(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct packet p = {.len = (__u32)(end - data)};
	struct kalki_device unknown = {};
	struct kalki_device *cfg;
	struct kalki_settings *s;
	__u32 zero = 0, device;
	__u64 now = 0;           /* read the clock only where a umbox needs it */

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	s = kalki_settings.lookup(&zero);
	if (!s)
		return XDP_PASS;
	struct kalki_mac mac __attribute__((aligned(8))) = {};
	__builtin_memcpy(mac.addr, eth->h_source, 6);
	device = device_of(&mac);
	cfg = device ? kalki_devices.lookup(&device) : 0;
	if (!cfg || !(cfg->flags & KALKI_F_PRESENT)) {
		device = 0;
		unknown.flags = s->unknown_flags;
		cfg = &unknown;
	}

	if (eth->h_proto == ETH_P_ARP_BE) {
		struct arp_ipv4 *arp = (void *)(eth + 1);
		if ((void *)(arp + 1) > end)
			return count(device, KALKI_R_NOT_IPV4, &p, XDP_DROP);
		/* An ARP that says another device's address is at this MAC would poison the
		 * gateway's neighbour table, whatever this device's posture (quarantine and
		 * unknown devices included): it never gets past here. */
		__u32 *owner = arp->spa ? kalki_dev_by_ip.lookup(&arp->spa) : 0;
		if ((owner && *owner != device) ||
		    ((cfg->flags & KALKI_F_ANTI_SPOOF) && arp->spa && arp->spa != cfg->ipv4)) {
			p.src = arp->spa;
			report(device, KALKI_R_SPOOF, &p, KALKI_A_DROPPED, 1, kalki_now());
			return count(device, KALKI_R_SPOOF, &p, XDP_DROP);
		}
		return count(device, KALKI_R_PASS, &p, XDP_PASS);
	}
	if (eth->h_proto != ETH_P_IP_BE || !parse_ipv4(eth + 1, end, &p))
		return count(device, KALKI_R_NOT_IPV4, &p, XDP_DROP);

	if (sender_dropped(device, cfg, p.src))
		return count(device, KALKI_R_DROP_SET, &p, XDP_DROP);
	if ((cfg->flags & KALKI_F_ANTI_SPOOF) && p.src != cfg->ipv4 && p.src) {
		report(device, KALKI_R_SPOOF, &p, KALKI_A_DROPPED, 1, kalki_now());
		return count(device, KALKI_R_SPOOF, &p, XDP_DROP);
	}
	if (!device || (cfg->flags & KALKI_F_QUARANTINE)) {
		if (to_gateway_service(s, &p, cfg->flags))
			return count(device, KALKI_R_PASS, &p, XDP_PASS);
		return count(device, device ? KALKI_R_QUARANTINE : KALKI_R_UNKNOWN_DEVICE, &p,
			     XDP_DROP);
	}
	if (cfg->flags & (KALKI_F_RATE_LIMIT | KALKI_F_PORT_SCAN))
		now = kalki_now();
	if (cfg->flags & KALKI_F_RATE_LIMIT) {
		__u32 r = rate_limit(device, cfg, &p, now);
		if (r != KALKI_R_PASS)
			return count(device, r, &p, XDP_DROP);
	}
	if (p.proto == IPPROTO_UDP && p.dport == 67 &&
	    (p.dst == s->gateway_ip || p.dst == 0xffffffff))
		/* DHCP to the gateway's server: an approved device that reboots asks for its
		 * address by broadcast, which no allow-list names and no detector must count
		 * (the rate limit above still applies). */
		return count(device, KALKI_R_PASS, &p, XDP_PASS);
#ifndef KALKI_NO_DETECTORS
	if ((cfg->flags & KALKI_F_PORT_SCAN) && (p.syn || p.proto == IPPROTO_UDP) &&
	    p.dst != s->gateway_ip && !lan_chatter(s, p.dst) &&
	    port_scan(device, cfg, &p, now, p.src) == XDP_DROP)
		return count(device, KALKI_R_PORT_SCAN, &p, XDP_DROP);
#ifndef KALKI_NO_STEALTH_SCAN
	if ((cfg->flags & KALKI_F_PORT_SCAN) && (p.probe || p.fin_ack) &&
	    p.dst != s->gateway_ip && !lan_chatter(s, p.dst)) {
		__u32 r = stealth_scan(device, cfg, &p, now, p.src);
		if (r != KALKI_R_PASS)
			return count(device, r, &p, XDP_DROP);
	}
#endif
#endif
	if (p.dst == s->gateway_ip) {
		/* The gateway offers devices DHCP, DNS, NTP, MQTT and ping; its web page, SSH and
		 * the rest are for operators. Replies to the gateway's own connections (an adapter
		 * polling a device) open nothing and pass. */
		if (!p.opens || device_service(s, &p))
			return count(device, KALKI_R_PASS, &p, XDP_PASS);
		report(device, KALKI_R_GATEWAY, &p, KALKI_A_DROPPED, 1, kalki_now());
		return count(device, KALKI_R_GATEWAY, &p, XDP_DROP);
	}
	/* Destination checks look at the packets that open a flow. The rest of a TCP
	 * connection belongs to one that was allowed when it opened: nftables' conntrack
	 * (forward chain) drops TCP that no SYN opened. Replies to permitted inbound
	 * connections so pass, and survive a posture change. */
	if (!p.opens)
		return count(device, KALKI_R_PASS, &p, XDP_PASS);
	/* DNS, wherever addressed, is answered by the gateway's resolver (nftables' chain
	 * "resolver" redirects it), so every answer the device gets is one the gateway saw and
	 * bound in kalki_name_allow. */
	if (p.dport == 53 && (p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP)) {
		if (!(cfg->flags & KALKI_F_DNS_GATEWAY_ONLY))
			return count(device, KALKI_R_PASS, &p, XDP_PASS);
		report(device, KALKI_R_ALLOWLIST, &p, KALKI_A_DROPPED, 1, kalki_now());
		return count(device, KALKI_R_ALLOWLIST, &p, XDP_DROP);
	}
	/* LAN broadcast and multicast (mDNS, SSDP, vendor discovery such as Tuya's UDP 6667)
	 * belong to the LAN: not a destination on the internet, not another device's service.
	 * The rate limit above still applies. */
	if (lan_chatter(s, p.dst))
		return count(device, KALKI_R_PASS, &p, XDP_PASS);
	if ((cfg->flags & KALKI_F_LATERAL_BLOCK) && (p.dst & s->lan_mask) == s->lan_net) {
		report(device, KALKI_R_LATERAL, &p, KALKI_A_DROPPED, 1, kalki_now());
		return count(device, KALKI_R_LATERAL, &p, XDP_DROP);
	}
	if ((cfg->flags & (KALKI_F_ALLOWLIST | KALKI_F_EGRESS_ANOMALY)) && !allowed(device, cfg, &p)) {
		int block = cfg->flags & (KALKI_F_ALLOWLIST | KALKI_F_EGRESS_BLOCK);
		if (cfg->flags & KALKI_F_EGRESS_ANOMALY)
			report(device, KALKI_R_EGRESS_ANOMALY, &p,
			       block ? KALKI_A_DROPPED : KALKI_A_REPORTED, 1, kalki_now());
		else    /* a refusal, not an alarm: the operator sees what the device asked for */
			report(device, KALKI_R_ALLOWLIST, &p, KALKI_A_DROPPED, 1, kalki_now());
		if (block)
			return count(device, cfg->flags & KALKI_F_ALLOWLIST ? KALKI_R_ALLOWLIST
							: KALKI_R_EGRESS_ANOMALY, &p, XDP_DROP);
	}
	return count(device, KALKI_R_PASS, &p, XDP_PASS);
}

int xdp_to_devices(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct packet p = {.len = (__u32)(end - data)};
	struct kalki_device *cfg;
	__u32 device, *id;
	__u64 now;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	if (eth->h_proto != ETH_P_IP_BE || !parse_ipv4(eth + 1, end, &p))
		return XDP_PASS;    /* ARP and the gateway's own traffic */
	id = kalki_dev_by_ip.lookup(&p.dst);
	if (!id)
		return XDP_PASS;    /* not a device: the gateway's nftables decides */
	device = *id;
	cfg = kalki_devices.lookup(&device);
	if (!cfg || !(cfg->flags & KALKI_F_PRESENT))
		return XDP_PASS;
	struct kalki_drop *dropped = drop_entry(p.src);
	if (dropped) {
		/* deception: nftables sends what a known attacker sends this device to the
		 * gateway's decoy (or drops it); the device itself never sees it */
		if ((cfg->flags & KALKI_F_DECEPTION) && (dropped->reason & KALKI_DROP_DECOY))
			return count(device, KALKI_R_PASS, &p, XDP_PASS);
		return count(device, KALKI_R_DROP_SET, &p, XDP_DROP);
	}
	if (cfg->flags & KALKI_F_QUARANTINE)
		return count(device, KALKI_R_QUARANTINE, &p, XDP_DROP);
	now = kalki_now();
#ifndef KALKI_NO_DETECTORS
	if (p.syn && (cfg->flags & KALKI_F_SYN_FLOOD) &&
	    syn_flood(device, cfg, &p, now) == XDP_DROP)
		return count(device, KALKI_R_SYN_FLOOD, &p, XDP_DROP);
	if (p.syn && (cfg->flags & KALKI_F_BRUTE_FORCE) &&
	    brute_force(device, cfg, &p, now) == XDP_DROP)
		return count(device, KALKI_R_BRUTE_FORCE, &p, XDP_DROP);
	if ((p.syn || p.proto == IPPROTO_UDP) && (cfg->flags & KALKI_F_PORT_SCAN) &&
	    port_scan(device, cfg, &p, now, p.src) == XDP_DROP)
		return count(device, KALKI_R_PORT_SCAN, &p, XDP_DROP);
#ifndef KALKI_NO_STEALTH_SCAN
	if ((p.probe || p.fin_ack) && (cfg->flags & KALKI_F_PORT_SCAN)) {
		__u32 r = stealth_scan(device, cfg, &p, now, p.src);
		if (r != KALKI_R_PASS)
			return count(device, r, &p, XDP_DROP);
	}
#endif
#endif
	if (cfg->flags & KALKI_F_RATE_LIMIT) {
		__u32 r = rate_limit(device, cfg, &p, now);
		if (r != KALKI_R_PASS)
			return count(device, r, &p, XDP_DROP);
	}
	return count(device, KALKI_R_PASS, &p, XDP_PASS);
}
