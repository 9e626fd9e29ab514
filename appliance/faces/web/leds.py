"""What the LEDs on the box mean: the technician's table (the page /leds and the claim page).

The words come from appliance.faces.panel.PATTERNS, the panel's own list, so the box, the page and the
docs/leds.md say the same thing.
"""
from __future__ import annotations


def patterns() -> list[dict]:
    """[{"name", "leds", "meaning", "action"}] in the panel's order."""
    from appliance.faces.panel import PATTERNS
    return [{"name": name, **p} for name, p in PATTERNS.items()]


def markdown_table() -> str:
    from appliance.faces.panel import readme_table
    return readme_table()


def current(ops) -> dict | None:
    """What the LEDs show now, if the panel runs."""
    return ops.panel_state
