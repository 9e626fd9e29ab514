"""Kernel events -> alerts: which alert kind each reason the XDP dispatcher reports stands for
(ebpf/kalki.h's reasons, as appliance.dataplane.maps names them)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

KERNEL_ALERTS = {"port_scan": "port-scan", "syn_flood": "syn-flood", "brute_force": "brute-force",
                 "egress_anomaly": "egress-anomaly", "spoof": "spoofing",
                 "lateral": "lateral-movement", "gateway": "gateway-probe",
                 "stealth_scan": "stealth-scan",
                 # a flow the allow-list refused: recorded on the device, never an alarm
                 "allowlist": "egress-refused"}


def alert_kind(event: dict, device_ip: str | None) -> str | None:
    """The alert a kernel event raises, or None if it raises none. A port scan (stealth or not)
    whose source is the device itself is the device scanning others."""
    kind = KERNEL_ALERTS.get(event.get("reason", ""))
    if kind in ("port-scan", "stealth-scan") and device_ip is not None and event.get("src") == device_ip:
        return "port-scan-outbound"
    if kind == "egress-anomaly" and event.get("action") == "reported":
        # The profile said "report only": a report, which no built-in rule escalates. An
        # operator's own rule on egress-report may.
        return "egress-report"
    return kind


def alerts(events: Iterable[dict], device_ip: Callable[[str], str | None]) -> Iterator[tuple[str, str, dict]]:
    """(device, alert kind, event) for each event about a known device that raises an alert;
    `device_ip(name)` is None for a device the supervisor does not know."""
    for e in events:
        device = e.get("device")
        if not isinstance(device, str):
            continue
        ip = device_ip(device)
        if ip is None:
            continue
        kind = alert_kind(e, ip)
        if kind:
            yield device, kind, e
