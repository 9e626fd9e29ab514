"""The policy's wall clock."""
from __future__ import annotations

import datetime

from appliance.errors import ConfigError


class Clock:
    """Wall time for policy (business hours). In the lab it may start at a given time and run
    on from there: the fake clock of the time-of-day rules."""

    def __init__(self, start: str = ""):
        self._offset = datetime.timedelta(0)
        if start:
            self.set(start)

    def set(self, iso: str) -> None:
        try:
            at = datetime.datetime.fromisoformat(iso)
        except ValueError:
            raise ConfigError(f"clock: invalid ISO time {iso!r}") from None
        if at.tzinfo is None:
            raise ConfigError(f"clock: {iso!r} needs a time zone offset")
        self._offset = at - datetime.datetime.now(datetime.UTC)

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self._offset
