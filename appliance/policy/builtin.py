"""The built-in rules: what every appliance does, whatever its profiles and site rules say."""
from __future__ import annotations

from appliance.policy.rules import Rule, parse_rule

INTRUSION_RULE = {
    "name": "physical-intrusion",
    "priority": 50,
    "when": {"all": [
        {"time": {"business_hours": False}},
        # A motion report older than a few minutes is not someone in the room now.
        {"telemetry": {"device": {"type": "motion_sensor"}, "field": "motion", "op": "==",
                       "value": True, "within": "5m"}},
        {"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==", "value": False,
                       "match": "all"}},
    ]},
    "then": [
        {"alert": {"type": "physical-intrusion", "severity": "critical",
                   "message": "motion with the lights off outside business hours"}},
        {"set_posture": {"device": {"type": "camera"}, "posture": "suspicious", "for": "30m"}},
        {"command": {"device": {"type": "light"}, "payload": {"on": True}}},
    ],
}

ATTACK_RULES = [
    {
        "name": "device-under-attack",
        "priority": 90,
        "when": {"all": [
            {"alert": {"type": ["brute-force", "port-scan", "stealth-scan", "syn-flood"], "count": 1,
                       "within": "5m"}},
            # Never downgrade a quarantined device to "attack".
            {"not": {"posture": {"is": "quarantine"}}},
        ]},
        "then": [{"set_posture": {"posture": "attack"}}],
    },
    {
        "name": "device-compromised",
        "priority": 100,   # above "attack": quarantine wins when both fire at once
        "when": {"alert": {"type": ["spoofing", "lateral-movement", "egress-anomaly",
                                    "port-scan-outbound", "gateway-probe"],
                           "count": 1, "within": "5m"}},
        "then": [{"set_posture": {"posture": "quarantine"}}],
    },
]


def builtin_rules() -> list[Rule]:
    return [parse_rule(r, f"built-in rule {r['name']}", source="builtin")
            for r in (INTRUSION_RULE, *ATTACK_RULES)]
