"""What the supervisor needs of the data path: the seam between them, as policy.Facts is the
policy's. appliance.dataplane.api.Dataplane is the real one (XDP and nftables in the kernel);
the tests' FakeDataplane is another. A test checks that both have every method named here."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from appliance.dataplane.api import DeviceSpec


class DataplanePort(Protocol):
    @property
    def devices(self) -> dict[str, DeviceSpec]:
        """The devices the data path holds, by name."""
        ...

    def apply(self, spec: DeviceSpec) -> int:
        """Puts a device's stack and posture in force; returns its device id."""
        ...

    def batch(self) -> AbstractContextManager:
        """Several applies as one: nftables' part is one transaction, all or nothing."""
        ...

    def remove(self, name: str) -> None: ...

    def rename(self, name: str, new: str) -> None:
        """The device under another name; what the kernel holds for it stays in force."""
        ...

    def read_back(self, name: str) -> int | None:
        """The posture code the kernel holds for the device, or None."""
        ...

    def read_back_all(self, names: list[str]) -> dict[str, int | None]:
        """read_back() of several devices, in as few system calls as the kernel allows."""
        ...

    def counters(self, name: str) -> dict[str, dict]: ...

    def block_source(self, ip: str, seconds: int, device: str | None = None) -> None: ...

    def unblock_source(self, ip: str) -> bool: ...

    def decoy_source(self, ip: str) -> bool:
        """A source the kernel put in the drop set may now meet deception devices' decoys."""
        ...

    def drop_set(self) -> list[dict]:
        """The sources in the kernel's drop set now: {"source", "device", "reason",
        "seconds_left" (None: until unblocked)} each."""
        ...

    def device_by_ip(self, ip: str) -> str | None: ...

    def events(self, timeout: float = 0.0, limit: int = 4096, consume: bool = True) -> list[dict]: ...

    def consume_events(self) -> None:
        """Gives back to the kernel the events read with consume=False, once acted on."""
        ...

    def events_fileno(self) -> int: ...

    def events_pending(self) -> bool:
        """Whether the kernel has events not yet read, without a system call."""
        ...

    def kernel_postures(self) -> dict[str, int]:
        """{MAC: posture code} the kernel holds now, before reconcile."""
        ...

    def prepare(self, stacks) -> list[str]:
        """Makes ahead what a posture change to these stacks would otherwise make on its way
        (nftables' connection-limit classes); returns what it made."""
        ...

    def reconcile(self, wanted: list[DeviceSpec]) -> dict: ...

    def drift(self) -> list[str]:
        """What was changed in the kernel behind the data path's back, each named."""
        ...

    def restore(self, wanted: list[DeviceSpec]) -> dict: ...

    def answer(self, device_ip: str, chain: list[str], addresses: list[str], ttl: int) -> bool:
        """An answer the devices' resolver is about to give: bound if the device's posture
        names any name of the chain (question first, then its CNAMEs)."""
        ...

    def names_of(self, name: str) -> dict:
        """{"bound": [...], "refused": {name: times}} for one device."""
        ...

    def resolved_names(self, name: str, address: str) -> list[str]:
        """The names the device resolved to `address`, allowed or not (question first)."""
        ...

    def name_snapshot(self) -> list[dict]: ...

    def restore_names(self, entries: list[dict]) -> dict: ...

    def expire_names(self) -> int: ...

    def close(self) -> None: ...
