"""What the supervisor watches besides its stimuli: the kernel, for anything changed behind
its back (restored at once, and a tamper alert), and the disk, for a write it refused (the
state kept in memory and retried). Both are checked from the supervisor's ticker."""
from __future__ import annotations

import logging
import time

from appliance.errors import KalkiError
from appliance.vocab import iso

log = logging.getLogger("kalki.supervisor")
TAMPER_SHOWN_S = 600     # the LEDs and the page say "alert" this long after a tamper


class Watch:
    def __init__(self, sup):
        self._sup = sup
        self.disk_error: str | None = None   # the store's refused write, while it lasts
        self.tamper: dict | None = None      # the last drift found in the kernel, and what was done
        self._tamper_told: dict[str, float] = {}   # problem -> when the operator was last told
        self._tampered_at = -1e9

    def tampered_recently(self) -> bool:
        return time.monotonic() - self._tampered_at < TAMPER_SHOWN_S

    def check_disk(self) -> None:
        """A write the disk refused (read-only, full, failing card) is retried every second
        until it succeeds; the operator is told when it starts and when it ends."""
        sup = self._sup
        error = sup.store.disk_error
        if error is None:
            if self.disk_error is not None:     # a later write got through, not the retry
                self._disk_back(self.disk_error)
            return
        if self.disk_error is None:     # told once an episode, even if the next retry succeeds
            self.disk_error = error
            log.error("store: %s; the state is kept in memory and retried every second", error)
            sup.raise_alert(None, "disk-error", "supervisor", {"error": error}, time.monotonic_ns())
        if sup.store.retry_write():
            self._disk_back(error)

    def _disk_back(self, error: str) -> None:
        log.warning("store: the state is on disk again after: %s", error)
        self._sup.store.audit("store-recovered", "supervisor", {"error": error})
        self.disk_error = None

    async def kernel_behind(self) -> list[str]:
        """check_kernel() without holding the loop: the kernel is read in a worker thread, and
        only what it finds is read again (and restored) on the loop, where nothing moves the
        data path meanwhile; a device applied while the thread read is no tamper."""
        sup = self._sup
        if not sup.attached or sup.loop is None:
            return []
        found = await sup.loop.run_in_executor(None, sup.dp.drift)
        return self.check_kernel() if found else []

    def check_kernel(self) -> list[str]:
        """Compares the kernel with what the data path put there; anything changed behind the
        supervisor's back is a tamper alert (once a minute per problem) and is restored at once.
        Returns the problems found."""
        sup = self._sup
        if not sup.attached:
            return []
        problems = sup.dp.drift()
        if not problems:
            return []
        now = time.monotonic()
        fresh = [p for p in problems if now - self._tamper_told.get(p, -1e9) > 60]
        try:
            report = sup.dp.restore(sup.wanted())
            restored, error = {k: v for k, v in report.items() if v and k != "unchanged"}, None
        except KalkiError as e:
            restored, error = {}, str(e)
            log.error("tamper: restoring the data path failed: %s", e)
        self.tamper = {"at": iso(sup.now()), "problems": problems, "restored": restored, "error": error}
        self._tampered_at = now
        log.warning("tamper: %s; restored: %s", "; ".join(problems), restored or error)
        sup.counters["tamper"] += 1
        if fresh:
            for p in fresh:
                self._tamper_told[p] = now
            sup.raise_alert(None, "tamper", "kernel", {"problems": fresh, "restored": restored,
                                                        "error": error}, time.monotonic_ns())
        return problems
