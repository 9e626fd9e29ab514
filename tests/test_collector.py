"""The supervisor's collector (memory.Collector): what survives a full pass is frozen, so the
next full pass walks only what was made since; the garbage that hides from it (a cycle of
frozen objects dropped later) lasts until the whole heap's pass, and no longer. In a fresh
process each: freezing is process-wide."""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json, sys, weakref
from appliance.supervisor import memory

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a

def full_pass():
    for _ in range(memory.FULL_EVERY_TICKS):
        last = c.tick()
    assert last == 2

gc.disable()
now = [0.0]
c = memory.Collector(freezing=sys.argv[1] == "freezing", whole_every=600, clock=lambda: now[0])
old = cycle()
old_ref = weakref.ref(old)
full_pass()                       # `old` survives it
frozen = c.frozen
young = cycle()
young_ref = weakref.ref(young)
del old, young                    # both garbage from here
full_pass()
after_full = {"old": old_ref() is not None, "young": young_ref() is not None}
now[0] = 601
full_pass()
print(json.dumps({"frozen": frozen, "after_full": after_full, "after_whole": old_ref() is not None,
                  "status": c.status()}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_a_full_pass_freezes_what_survived_and_the_whole_heap_pass_finds_what_hid():
    r = run("freezing")
    assert r["frozen"] > 1000                               # the interpreter's objects, `old`
    assert r["after_full"] == {"old": True, "young": False}  # frozen garbage waits ...
    assert r["after_whole"] is False                         # ... for the whole heap's pass
    st = r["status"]
    assert st["full_collections"] == 3 and st["gc_whole_heap_passes"] == 1
    assert st["gc_whole_heap_found_last"] >= 2 and st["gc_frozen"] > 1000
    assert st["gc_whole_heap_pause_max_ms"] > 0       # timed, and kept apart from the full passes
    assert st["gc_full_pause_last_ms"] is not None


def test_without_freezing_every_full_pass_is_over_the_whole_heap():
    r = run("plain")
    assert r["frozen"] == 0 and r["status"]["gc_frozen"] == 0
    assert r["after_full"] == {"old": False, "young": False}
    assert r["status"]["gc_whole_heap_passes"] == 0


def test_the_frozen_count_is_walked_at_most_every_few_seconds(monkeypatch):
    """gc.get_freeze_count() walks every frozen object: the status counts them again only
    after this collector froze or thawed, or FROZEN_COUNT_SECONDS later."""
    from appliance.supervisor import memory
    walks = []
    monkeypatch.setattr(memory.gc, "get_freeze_count", lambda: walks.append(1) or 75_000)
    now = [0.0]
    c = memory.Collector(freezing=False, clock=lambda: now[0])
    assert c.status()["gc_frozen"] == 75_000 and c.frozen == 75_000 and len(walks) == 1
    now[0] += memory.FROZEN_COUNT_SECONDS - 0.1
    assert c.frozen == 75_000 and len(walks) == 1
    now[0] += 0.1
    assert c.frozen == 75_000 and len(walks) == 2
    c._frozen = None        # as after its own freeze (tick)
    assert c.frozen == 75_000 and len(walks) == 3
