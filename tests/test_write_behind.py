"""The state file written behind the loop (Store.write_behind, the supervisor's choice): the
caller goes on while a worker thread writes, the newest state each time; a refused write is
the store's disk_error as before; flush(), close() and a failed batch wait for the writer."""
from __future__ import annotations

import json
import threading

import pytest

from appliance.errors import StoreError
from appliance.store.state import FILENAME, Store
from appliance.store.storage import AtomicJSONStorage


class HeldWrites:
    """AtomicJSONStorage._replace held until released, counting the texts it was given."""

    def __init__(self, monkeypatch):
        self.release = threading.Event()
        self.started = threading.Event()
        self.texts: list[str] = []
        self.refuse: str | None = None
        replace = AtomicJSONStorage._replace

        def held(storage, text):
            self.texts.append(text)
            self.started.set()
            assert self.release.wait(10), "the test never released the writer"
            if self.refuse:
                raise StoreError(self.refuse)
            replace(storage, text)
        monkeypatch.setattr(AtomicJSONStorage, "_replace", held)


def on_disk(tmp_path) -> dict:
    devices = json.loads((tmp_path / FILENAME).read_text())["devices"]
    return {d["name"]: d["posture"] for d in devices.values()}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    s.upsert_device("cam1", "02:00:00:00:00:01", posture="normal")
    s.write_behind()
    yield s
    s.close()


def test_the_caller_goes_on_and_the_newest_state_is_what_gets_written(store, tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    store.update_device("cam1", posture="suspicious")       # returns with the writer held
    assert held.started.wait(5)
    assert store.get_device("cam1")["posture"] == "suspicious"     # memory has it at once
    assert on_disk(tmp_path)["cam1"] == "normal"                   # the disk not yet
    for posture in ("attack", "quarantine", "suspicious", "attack"):
        store.update_device("cam1", posture=posture)
    held.release.set()
    store.flush()
    assert on_disk(tmp_path)["cam1"] == "attack"
    assert len(held.texts) == 2       # the first, then only the newest of the four after it
    assert store.disk_error is None


def test_a_refused_write_behind_is_the_disk_error_and_retried(store, tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    held.refuse = "cannot write the store: Read-only file system"
    held.release.set()
    store.update_device("cam1", posture="attack")
    store.flush()
    assert store.disk_error == held.refuse
    assert store.get_device("cam1")["posture"] == "attack"        # kept in memory
    assert on_disk(tmp_path)["cam1"] == "normal"
    held.refuse = None
    assert store.retry_write() is True and store.disk_error is None
    assert on_disk(tmp_path)["cam1"] == "attack"


def test_a_failed_batch_reads_the_file_the_writer_finished(store, tmp_path, monkeypatch):
    held = HeldWrites(monkeypatch)
    store.update_device("cam1", posture="suspicious")
    assert held.started.wait(5)
    threading.Timer(0.2, held.release.set).start()      # done while the batch below unwinds
    with pytest.raises(RuntimeError), store.batch():
        store.update_device("cam1", posture="attack")
        raise RuntimeError("something in the middle of the batch")
    assert store.get_device("cam1")["posture"] == "suspicious"   # not the file's older "normal"
    assert store.retry_write() is True


def test_close_waits_for_the_writer(tmp_path, monkeypatch):
    s = Store(tmp_path)
    s.upsert_device("cam1", "02:00:00:00:00:01", posture="normal")
    s.write_behind()
    held = HeldWrites(monkeypatch)
    s.update_device("cam1", posture="attack")
    threading.Timer(0.2, held.release.set).start()
    s.close()
    assert on_disk(tmp_path)["cam1"] == "attack"
