"""Kernel events -> alerts: which alert kind each reason the XDP dispatcher reports stands for
(ebpf/kalki.h's reasons, as appliance.dataplane.maps names them)."""
from __future__ import annotations

KERNEL_ALERTS = {"port_scan": "port-scan", "syn_flood": "syn-flood", "brute_force": "brute-force",
                 "egress_anomaly": "egress-anomaly", "spoof": "spoofing",
                 "lateral": "lateral-movement", "gateway": "gateway-probe"}


def alert_kind(event: dict, device_ip: str | None) -> str | None:
    """The alert a kernel event raises, or None if it raises none. A port scan whose source is
    the device itself is the device scanning others."""
    kind = KERNEL_ALERTS.get(event.get("reason", ""))
    if kind == "port-scan" and device_ip is not None and event.get("src") == device_ip:
        return "port-scan-outbound"
    return kind
