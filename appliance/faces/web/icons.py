"""An icon per device type: small line drawings as inline SVG (24x24, drawn in the text's colour,
so dark mode and the postures' colours apply), built in: nothing is fetched, and the page's CSP
needs nothing more. A type without its own icon (an installed or learnt one) gets the icon of
the first word its name shares with a known one ("camera-lamp1" is a camera), else a chip."""
from __future__ import annotations

import html

# Each icon: the inside of an <svg viewBox="0 0 24 24">, strokes only.
ICONS = {
    "camera": '<rect x="3" y="7" width="14" height="10" rx="2"/><path d="M17 11l4-2v6l-4-2"/>'
              '<circle cx="10" cy="12" r="2.5"/>',
    "plug": '<path d="M9 3v5M15 3v5"/><path d="M6 8h12v3a6 6 0 0 1-12 0z"/><path d="M12 17v4"/>',
    "light": '<path d="M9 18h6M10 21h4"/><path d="M12 3a6 6 0 0 0-4 10.5c.7.7 1 1.5 1 2.5h6'
             'c0-1 .3-1.8 1-2.5A6 6 0 0 0 12 3z"/>',
    "motion_sensor": '<circle cx="12" cy="12" r="2"/>'
                     '<path d="M8 8a5.5 5.5 0 0 0 0 8M16 8a5.5 5.5 0 0 1 0 8"/>'
                     '<path d="M5 5a9.5 9.5 0 0 0 0 14M19 5a9.5 9.5 0 0 1 0 14"/>',
    "door_sensor": '<path d="M6 21V3h10v18"/><path d="M4 21h16"/><circle cx="13" cy="12" r=".8"/>'
                   '<path d="M19 8v8"/>',
    "thermostat": '<path d="M10 14.5V5a2 2 0 0 1 4 0v9.5a4 4 0 1 1-4 0z"/><path d="M12 9v7"/>',
    "generic": '<rect x="6" y="6" width="12" height="12" rx="2"/><path d="M9 3v3M15 3v3M9 18v3M15 18v3'
               'M3 9h3M3 15h3M18 9h3M18 15h3"/>',
    "unknown": '<circle cx="12" cy="12" r="9"/><path d="M9.5 9.5a2.5 2.5 0 1 1 3.5 2.3c-.6.3-1 .9-1 1.6V14"/>'
               '<path d="M12 17.5v.01"/>',
}
# words in a type's name that mean one of the icons above
WORDS = {"camera": "camera", "cam": "camera", "doorbell": "camera", "plug": "plug", "socket": "plug",
         "outlet": "plug", "switch": "plug", "light": "light", "lamp": "light", "bulb": "light",
         "motion": "motion_sensor", "pir": "motion_sensor", "door": "door_sensor",
         "window": "door_sensor", "contact": "door_sensor", "thermostat": "thermostat",
         "thermo": "thermostat", "heating": "thermostat"}


def icon_of(type_: str | None) -> str:
    """The icon's name for a device type (None: not approved yet)."""
    if not type_:
        return "unknown"
    if type_ in ICONS:
        return type_
    words = type_.lower().replace("-", "_").split("_")
    return next((WORDS[w] for w in words if w in WORDS), "generic")


def icon(type_: str | None) -> str:
    """The type's icon as inline SVG, with its type as its accessible name."""
    name = icon_of(type_)
    label = html.escape(type_ or "type unknown", quote=True)
    return (f'<svg class="icon" data-icon="{name}" viewBox="0 0 24 24" width="20" height="20" fill="none" '
            f'stroke="currentColor" stroke-width="1.6" stroke-linecap="round" stroke-linejoin="round" '
            f'role="img" aria-label="{label}"><title>{label}</title>{ICONS[name]}</svg>')
