"""The supervisor gives the C heap's free pages back after each full collection
(memory.give_back_free_memory): measured in a fresh process, with a heap left full of holes
as a burst of posture changes leaves it."""
from __future__ import annotations

import json
import subprocess
import sys

from appliance.supervisor import memory

HOLES = """
import json, re
from appliance.supervisor.memory import give_back_free_memory
def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
chunks = [bytes(1000) + bytes([i % 256]) for i in range(60_000)]    # 60 MB through malloc
kept = chunks[::64]                                                # a few stay: holes, not a top
del chunks
before = rss_mb()
given = give_back_free_memory()
print(json.dumps({"before": before, "after": rss_mb(), "given": given, "kept": len(kept)}))
"""


def test_a_heap_full_of_holes_is_given_back():
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["given"], "this C library has no malloc_trim"
    assert r["before"] - r["after"] > 30, r          # most of the 59 MB freed goes back


def test_without_malloc_trim_it_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_MALLOC_TRIM", None)
    assert memory.give_back_free_memory() is False


THREADS = """
import ctypes, json, os, sys, tempfile, threading
from appliance.supervisor.memory import one_malloc_arena
asked = sys.argv[1] == "one" and one_malloc_arena()
held = []
def work():
    held.append([bytes(2000) for _ in range(2000)])      # through malloc, from this thread
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fdopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
fp = libc.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
arenas = open(path).read().count("<heap nr=")
os.unlink(path)
print(json.dumps({"asked": asked, "arenas": arenas}))
"""


def arenas(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_threads_allocate_from_one_arena():
    assert arenas("one") == {"asked": True, "arenas": 1}
    assert arenas("default")["arenas"] > 1       # what it saves: an arena per thread


def test_kept_reports_leave_the_collector_nothing_to_walk():
    """Each device's last TELEMETRY_KEPT reports, kept as (when, payload) tuples, were 64,000
    objects every full collection walked at 1,000 devices (a tuple holding a dict is never
    untracked): the reports of 100 devices now add only their rings."""
    import datetime
    import gc
    recent = memory.Recent()
    at = datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(memory.TELEMETRY_KEPT):
        for d in range(100):
            recent.add_telemetry(f"light{d}", {"on": i % 2 == 0, "brightness": i}, at)
    gc.collect()
    assert len(gc.get_objects()) - before < 500      # 3 per device: its two rings and their pair
    assert recent.telemetry("light7", "brightness", last=3) == [61, 62, 63]
    newest = recent.reports("light7", 2, datetime.UTC)
    assert [payload["brightness"] for _, payload in newest] == [63, 62]
