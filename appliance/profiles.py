"""Device-type profiles in umboxes/: data, not code. Each file gives, per posture, the umbox
stack with its parameters. Validated on load; an error names the file and the key."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from . import umbox
from .errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "umboxes"
POSTURES = ("unknown", "normal", "suspicious", "attack", "quarantine")


@dataclass
class Profile:
    type: str
    description: str
    postures: dict[str, dict]
    path: Path

    def stack(self, posture: str) -> dict:
        try:
            return self.postures[posture]
        except KeyError:
            raise ConfigError(f"{self.path.name}: device type {self.type} has no posture "
                              f"{posture!r} (it has: {', '.join(self.postures)})") from None


def load_profile(path: Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(data) - {"type", "description", "postures"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not isinstance(data.get("type"), str):
        raise ConfigError(f"{path}: key 'type' is required (the device type's name)")
    postures = data.get("postures")
    if not isinstance(postures, dict) or "normal" not in postures:
        raise ConfigError(f"{path}: key 'postures' must be a table with at least postures.normal")
    checked = {}
    for posture, stack in postures.items():
        checked[posture] = umbox.validate(stack, where=f"{path.name}: postures.{posture}: ")
        umbox.compile_stack(stack, where=f"{path.name}: postures.{posture}: ")
    # A posture without umboxes would leave an unapproved device open: fail closed instead.
    checked.setdefault("unknown", umbox.validate({"quarantine": {"management": False}}))
    checked.setdefault("quarantine", umbox.validate({"quarantine": {}}))
    return Profile(data["type"], data.get("description", ""), checked, path)


def load_all(directory: Path = PROFILE_DIR) -> dict[str, Profile]:
    out = {}
    for path in sorted(Path(directory).glob("*.toml")):
        p = load_profile(path)
        if p.type in out:
            raise ConfigError(f"{path}: device type {p.type} is also defined in {out[p.type].path.name}")
        out[p.type] = p
    return out
