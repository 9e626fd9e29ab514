"""The supervisor's state: devices, posture history, alerts, the audit log, site rules and
settings, in one TinyDB file (kalki.json, in /var/lib/kalki by default).

Only the supervisor process writes it. Every write replaces the whole file atomically, so a
kill or a power cut at any instant leaves the old state or the new one, never a torn file.
Each public mutating call is one disk write; `with store.batch():` makes several calls one
write, all or nothing.

Timestamps are ISO 8601 UTC strings with microseconds, all in the same form, so comparing
the strings compares the times.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import copy
import ipaddress
import json
import os
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tinydb import Storage, TinyDB, where
from tinydb.table import Table

from appliance.errors import ConfigError, StoreError
from appliance.vocab import (
    ALERT_SOURCES,
    WORKDAYS,
    check_business_hours,
    check_device_name,
    check_mac,
    check_timezone,
    iso,
)

DEFAULT_DIRECTORY = Path("/var/lib/kalki")
FILENAME = "kalki.json"
# What enforcement depends on is written at once; the logs (posture history, alerts, decisions)
# are written behind, at most a flush interval late, so that an alert storm does not rewrite
# the device file and a decision does not wait for the disk.
STATE_TABLES = ("devices", "rules", "settings")
LOG_TABLES = ("history", "alerts", "decisions")
TABLES = STATE_TABLES + LOG_TABLES
IDENTITY_KEYS = ("hostname", "client_id", "vendor_class")
DEFAULT_SETTINGS = {
    "business_hours": {"days": list(WORKDAYS),
                       "start": "08:00", "end": "18:00"},
    "timezone": "UTC",
}
MAINTENANCE_KEY = "maintenance_until"


class _Table(Table):
    """TinyDB's table, with the documents an update may edit made its own first. TinyDB edits
    the documents of the table it updates in place (update() edits them, remove() pops them);
    its reads copy each document they return. So the documents are copied once per update, not
    on every read: a device's posture change reads the devices table 5 times, and the storage
    used to copy every device on each. Values nested inside documents are shared: TinyDB never
    edits them, and Store copies what it returns."""

    def _update_table(self, updater):
        def on_own_copies(table):
            for doc_id, doc in table.items():
                table[doc_id] = dict(doc)
            updater(table)
        super()._update_table(on_own_copies)


class AtomicJSONStorage(Storage):
    """A TinyDB storage that never leaves a half-written file: each write goes to
    `.<name>.tmp` in the same directory, is fsynced, renamed over the file, and the directory
    is fsynced so that the rename itself survives a power cut.

    The state is kept in memory, parsed, because TinyDB reads everything before every query
    and every write: a read costs a copy of the one table TinyDB takes, and a write inside a
    batch costs nothing until the batch ends and the state is serialised once. Nothing else may
    write the file while this object has it open.
    """

    def __init__(self, path, **json_kwargs):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self._json_kwargs = json_kwargs
        self._data = None   # the state parsed; None until loaded, or after a failed batch
        self._batch_depth = 0
        self._dirty = False

    def read(self):
        if self._data is None:
            self._data = self._load()
        return dict(self._data) if self._data else None    # TinyDB replaces a table in it

    def write(self, data):
        # TinyDB hands back what read() gave it, with the table it changed replaced: take the
        # tables as they are (dict.items, not the copying __getitem__).
        data = dict(dict.items(data))
        if self._batch_depth:
            self._dirty = True
        else:
            self._replace(json.dumps(data, **self._json_kwargs))
        self._data = data

    @contextmanager
    def batch(self):
        """Writes inside the block stay in memory and reach the disk as one write at the end.
        If the block raises, nothing is written and the state is re-read from the file."""
        self._batch_depth += 1
        try:
            yield
            if self._batch_depth == 1 and self._dirty:
                self._replace(json.dumps(self._data, **self._json_kwargs))
        except BaseException:
            if self._batch_depth == 1:
                self._data = None
            raise
        finally:
            self._batch_depth -= 1
            if not self._batch_depth:
                self._dirty = False

    def close(self):
        self._data = None

    def _load(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"cannot read the store {self.path}: {e}") from None
        if not text.strip():
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            raise StoreError(f"the store {self.path} is corrupt (not valid JSON: {e}); it is left "
                             "as it is: restore a backup or move it aside to start empty") from None
        if not isinstance(data, dict) or not all(
                isinstance(t, dict) and all(isinstance(d, dict) for d in t.values())
                for t in data.values()):
            raise StoreError(f"the store {self.path} is not a TinyDB file (expected tables of "
                             "documents); it is left as it is")
        return data

    def _replace(self, text: str):
        try:
            with open(self.tmp_path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.tmp_path.unlink(missing_ok=True)
            raise StoreError(f"cannot write the store {self.path}: {e}") from None


class _Record(dict):
    doc_id: int


ANY = object()      # LogTable.rows(device=ANY): records of every device, and of none


class LogTable:
    """An append-only log (posture history, alerts, decisions) kept as a JSON-lines file.

    TinyDB rewrites a whole file per insert, which made every alert cost more as the logs grew;
    here an insert is a line in memory until flush() appends it (fsynced). Removals (retention)
    are forgotten at once; the file is rewritten (atomically, at a flush) once a quarter of it
    is removed records, so that trimming one device does not copy the whole file (26 MB of
    history at 1,000 devices, 75 ms of writing). Until then a restart brings the removed records
    (the oldest) back, and the next retention pass removes them again. A line torn by a power
    cut is the last one: it is dropped on load.

    Memory holds, per record, only what searches and retention look at, as columns of machine
    numbers (36 bytes a record): its id, time, device, tag (a decision's kind, an alert's type)
    and where its line lies in the file. A whole record is read from the file when asked for.
    At its retention limits a 1,000-device gateway keeps 210,000 records: 7.2 MB this way;
    keeping a dict and the JSON line per record (a decision that moved 25 cameras is 2-3 KB)
    cost 235 MB (bench/bench_store.py)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self._id = array("q")
        self._at = array("d")        # POSIX seconds
        self._device = array("i")    # index into _names
        self._tag = array("i")
        self._pos = array("q")       # byte offset of the line in the file; -1: not written yet
        self._size = array("i")
        self._names: list = [None]
        self._name_ids: dict = {None: 0}
        self._per_device: collections.Counter = collections.Counter()   # name id -> records
        self._unwritten: dict[int, str] = {}    # doc_id -> line; always the newest rows
        self._next = 1
        self._rewrite = False
        self._bytes = 0              # the file's size as written
        self._dead = 0               # bytes of it that removed records take
        self._reader = None
        self._pending: _Append | _Rewrite | None = None
        self._removals = 0           # remove() calls so far: did any come during a flush?
        self._load()

    def _name_id(self, value) -> int:
        if value is not None and not isinstance(value, str):
            raise ValueError(value)
        found = self._name_ids.get(value)
        if found is None:
            found = self._name_ids[value] = len(self._names)
            self._names.append(value)
        return found

    def _add(self, doc_id: int, rec: dict, pos: int, size: int) -> None:
        at = datetime.fromisoformat(rec["at"]).timestamp()
        device = self._name_id(rec.get("device"))
        tag = self._name_id(rec.get("kind", rec.get("type")))
        self._id.append(doc_id)
        self._at.append(at)
        self._device.append(device)
        self._tag.append(tag)
        self._pos.append(pos)
        self._size.append(size)
        self._per_device[device] += 1
        self._next = max(self._next, doc_id + 1)

    def _load(self):
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"cannot read the log {self.path}: {e}") from None
        with f:
            pos, number, torn, raw = 0, 0, False, b""
            try:
                for raw in f:
                    number += 1
                    if torn:     # something follows the bad line: not a power cut's work
                        raise StoreError(f"the log {self.path} is corrupt at line {number - 1}; "
                                         "it is left as it is: restore a backup or move it aside")
                    line = raw.rstrip(b"\n")
                    if line.strip():
                        try:
                            rec = json.loads(line)
                            doc_id = rec["_id"]
                            if not isinstance(doc_id, int):
                                raise ValueError(doc_id)
                            self._add(doc_id, rec, pos, len(line))
                        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                            torn = True
                    pos += len(raw)
            except OSError as e:
                raise StoreError(f"cannot read the log {self.path}: {e}") from None
        self._bytes = pos
        if torn:
            self._rewrite = True           # the last line, torn by a power cut: dropped
        elif raw and not raw.endswith(b"\n"):
            # whole but for its newline: kept, and written again with one
            self._pos[-1] = -1
            self._unwritten[self._id[-1]] = raw.decode()
            self._rewrite = True

    # -- what the Store asks --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._id)

    def count_for(self, device) -> int:
        found = self._name_ids.get(device)
        return 0 if found is None else self._per_device[found]

    def insert(self, rec: dict) -> int:
        doc_id = self._next
        line = json.dumps({"_id": doc_id, **rec})
        self._add(doc_id, rec, -1, 0)
        self._unwritten[doc_id] = line
        return doc_id

    def rows(self, device=ANY, tags=None, since: float | None = None,
             before: float | None = None) -> list[int]:
        """The rows of the records that match, newest first (by time, then id)."""
        if device is ANY:
            rows = range(len(self._id))
        else:
            wanted = self._name_ids.get(device)
            if wanted is None:
                return []
            rows = [i for i, d in enumerate(self._device) if d == wanted]
        if tags is not None:
            wanted_tags = {self._name_ids[t] for t in tags if t in self._name_ids}
            rows = [i for i in rows if self._tag[i] in wanted_tags]
        if since is not None:
            rows = [i for i in rows if self._at[i] >= since]
        if before is not None:
            rows = [i for i in rows if self._at[i] < before]
        at, ids = self._at, self._id
        return sorted(rows, key=lambda i: (at[i], ids[i]), reverse=True)

    def records(self, rows) -> list[_Record]:
        """The whole records at these rows, as the caller's own dicts (doc_id set)."""
        out = []
        for i in rows:
            doc_id = self._id[i]
            line = self._unwritten.get(doc_id) if self._pos[i] < 0 else self._read(i)
            rec = json.loads(line)
            if rec.pop("_id", None) != doc_id:
                raise StoreError(f"the log {self.path} changed under the supervisor (record "
                                 f"{doc_id} is not where it was written); restart it")
            doc = _Record(rec)
            doc.doc_id = doc_id
            out.append(doc)
        return out

    def _read(self, row: int) -> bytes:
        try:
            if self._reader is None:
                self._reader = open(self.path, "rb")
            return os.pread(self._reader.fileno(), self._size[row], self._pos[row])
        except OSError as e:
            raise StoreError(f"cannot read the log {self.path}: {e}") from None

    def remove(self, rows) -> None:
        doomed = set(rows)
        if not doomed:
            return
        self._removals += 1
        self._dead += sum(self._size[i] + 1 for i in doomed if self._pos[i] >= 0)
        if self._dead * 4 > self._bytes:
            self._rewrite = True
        for i in doomed:
            self._per_device[self._device[i]] -= 1
            self._unwritten.pop(self._id[i], None)
        doomed = sorted(doomed)
        for column in (self._id, self._at, self._device, self._tag, self._pos, self._size):
            if len(doomed) <= 256:     # a device's trim: a few moves of the tail
                for i in reversed(doomed):
                    del column[i]
            else:                      # an age-out: one copy of what stays, run by run
                kept, start = array(column.typecode), 0
                for i in doomed:
                    kept.extend(column[start:i])
                    start = i + 1
                kept.extend(column[start:])
                column[:] = kept

    def trim(self, keep: int, device=ANY, before: float | None = None) -> int:
        """Removes the records (of the device) older than `before` and all but the `keep`
        newest of the rest; returns how many went."""
        rows = self.rows(device)
        young = rows if before is None else [i for i in rows if self._at[i] >= before]
        doomed = [i for i in rows if before is not None and self._at[i] < before] + young[keep:]
        self.remove(doomed)
        return len(doomed)

    def devices_over(self, keep: int) -> list:
        return [self._names[d] for d, n in self._per_device.items() if n > keep]

    def mark(self) -> int:
        return self._next

    def rollback(self, next_id: int) -> None:
        """Forgets what was inserted since mark() (a failed batch)."""
        self.remove([i for i in range(len(self._id) - 1, -1, -1) if self._id[i] >= next_id])
        self._next = next_id

    # -- the file -------------------------------------------------------------------------
    # A flush is taken in three steps so that its writing and fsyncs can run in a worker thread
    # while the loop goes on: begin_flush() (loop) takes what is to be written, the job's run()
    # (any thread) writes it and touches nothing here, finish_flush() (loop) records where the
    # lines now lie. Between the two, inserts and removals go on; reads keep using the file
    # as it was (self._reader stays open on it, even once a rewrite has replaced it).
    def flush(self) -> None:
        job = self.begin_flush()
        if job is not None:
            job.run()
            replaced = self.finish_flush(job)
            if replaced is not None:
                replaced.close()

    def begin_flush(self) -> _Append | _Rewrite | None:
        if self._pending is not None:
            raise StoreError(f"the log {self.path}: a flush is already running")
        if self._rewrite:
            unreadable = None
            try:
                if self._reader is None and self._bytes:
                    self._reader = open(self.path, "rb")
            except OSError as e:      # the job fails with it, through finish_flush() like any
                unreadable = e
            job = _Rewrite(self.path, self.tmp_path, self._reader, array("q", self._id),
                           array("q", self._pos), array("i", self._size),
                           {i: line.encode() for i, line in self._unwritten.items()})
            job.removals, job.error = self._removals, unreadable
        elif self._unwritten:
            ids = self._id[len(self._id) - len(self._unwritten):]      # always the newest rows
            job = _Append(self.path, ids, [self._unwritten[i].encode() for i in ids])
        else:
            return None
        self._pending = job
        return job

    def finish_flush(self, job: _Append | _Rewrite):
        """Returns the replaced file's reader, if any, for the caller to close: closing the last
        descriptor of a replaced file frees its blocks, 7 ms for 26 MB here (not on the loop)."""
        self._pending = None
        if job.error is not None:
            self._rewrite = True     # an append may have left half a line: write it whole next time
            raise StoreError(f"cannot write the log {self.path}: {job.error}")
        if isinstance(job, _Append):
            pos = job.start
            for doc_id, line in zip(job.ids, job.lines):
                row = self._row_of(doc_id)
                if row is None:                      # removed meanwhile
                    self._dead += len(line) + 1
                else:
                    self._pos[row], self._size[row] = pos, len(line)
                    self._unwritten.pop(doc_id, None)
                pos += len(line) + 1
            self._bytes = pos
            self._unwritten = dict(self._unwritten)    # a dict keeps its size when emptied
            return None
        replaced, self._reader = self._reader, None    # it reads the old file: positions change now
        n = len(job.ids)
        if job.removals == self._removals:      # only inserts since: the first n rows are the job's
            self._pos[:n], self._size[:n] = job.positions, job.sizes
            dead = 0
        else:                                                  # both sorted by id: one walk
            dead, k = 0, 0
            for row in range(len(self._id)):
                doc_id = self._id[row]
                while k < n and job.ids[k] < doc_id:
                    dead += job.sizes[k] + 1
                    k += 1
                if k < n and job.ids[k] == doc_id:
                    self._pos[row], self._size[row] = job.positions[k], job.sizes[k]
                    k += 1
            dead += sum(job.sizes[k:]) + n - k
        for doc_id in job.lines:
            self._unwritten.pop(doc_id, None)
        self._unwritten = dict(self._unwritten)
        self._bytes, self._dead = job.total, dead
        self._rewrite = dead * 4 > job.total
        return replaced

    def _row_of(self, doc_id: int) -> int | None:
        row = bisect.bisect_left(self._id, doc_id)
        return row if row < len(self._id) and self._id[row] == doc_id else None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _Append:
    """New lines at the end of a log (see LogTable.begin_flush)."""

    def __init__(self, path: Path, ids, lines: list[bytes]):
        self.path, self.ids, self.lines = path, ids, lines
        self.start = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with open(self.path, "ab") as f:
                self.start = f.seek(0, os.SEEK_END)
                f.write(b"".join(line + b"\n" for line in self.lines))
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:       # taken back on the loop by finish_flush
            self.error = e


class _Rewrite:
    """A log written anew without its removed records, atomically (see LogTable.begin_flush):
    runs of lines still adjacent in the old file are copied as they are, a megabyte at a time."""

    def __init__(self, path: Path, tmp_path: Path, reader, ids, pos, sizes, lines: dict):
        self.path, self.tmp_path, self.reader = path, tmp_path, reader
        self.ids, self._old_pos, self.sizes, self.lines = ids, pos, sizes, lines
        self.positions = array("q")
        self.total = 0
        self.error: Exception | None = None
        self.removals = 0

    def run(self) -> None:
        if self.error is not None:    # the old file could not be opened
            return
        try:
            self._write()
        except Exception as e:       # taken back on the loop by finish_flush
            self.tmp_path.unlink(missing_ok=True)
            self.error = e

    def _write(self) -> None:
        ids, old, sizes, positions, pos = self.ids, self._old_pos, self.sizes, self.positions, 0
        with open(self.tmp_path, "wb") as out:
            i, n = 0, len(ids)
            while i < n:
                if old[i] < 0:
                    data = self.lines[ids[i]] + b"\n"
                    positions.append(pos)
                    sizes[i] = len(data) - 1
                    out.write(data)
                    pos += len(data)
                    i += 1
                    continue
                start = end = old[i]
                while i < n and old[i] == end:
                    positions.append(pos + end - start)
                    end += sizes[i] + 1
                    i += 1
                    if not i & 2047:
                        time.sleep(0)    # hands the GIL to the loop rather than hold it 5 ms
                self._copy(start, end, out)
                pos += end - start
            out.flush()
            os.fsync(out.fileno())
        os.replace(self.tmp_path, self.path)
        _fsync_dir(self.path.parent)
        self.total = pos

    def _copy(self, start: int, end: int, out) -> None:
        while start < end:
            data = os.pread(self.reader.fileno(), min(end - start, 1 << 20), start)
            if not data:
                raise OSError(f"{self.path} is shorter than the supervisor wrote it")
            out.write(data)
            start += len(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Retention:
    history_per_device: int = 200
    alerts: int = 5000
    decisions: int = 5000
    max_age_days: int = 30      # alerts and decisions; a device's posture history has no age

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"retention {name}: expected a positive integer, got {value!r}")


def _over(count: int, bound: int) -> bool:
    """True once a table exceeds its bound by 10%: pruning then removes a tenth of it at once,
    instead of one record per insert."""
    return count > bound + max(1, bound // 10)


def _stamp(value, what: str) -> str:
    """A datetime or ISO string as the one form we store; naive times are refused, as a
    timestamp without a zone is a guess."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise StoreError(f"{what}: invalid ISO 8601 timestamp {value!r}") from None
    if not isinstance(value, datetime):
        raise StoreError(f"{what}: expected a timestamp, got {value!r}")
    if value.tzinfo is None:
        raise StoreError(f"{what}: timestamp {value.isoformat()} has no time zone")
    return iso(value)


def _json(value, what: str):
    """A private copy of what the caller gave, checked to be storable."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what}: cannot be stored as JSON: {e}") from None


def _text(value, what: str, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what}: expected a non-empty string, got {value!r}")
    return value


def _mac(value, culprit: str) -> str:
    return check_mac(value, culprit, StoreError)


def _plain(doc) -> dict:
    """The document as the caller's own dict."""
    return copy.deepcopy(dict(doc))


def _with_ids(docs) -> list[dict]:
    for doc in docs:
        doc["id"] = doc.doc_id
    return docs


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class Store:
    """The state of one gateway. Use as a context manager, or call close()."""

    def __init__(self, directory: Path = DEFAULT_DIRECTORY, retention: Retention = Retention(),
                 clock=None):
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.retention = retention
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.directory}: {e}") from None
        self._db = TinyDB(self.path, storage=AtomicJSONStorage)
        self._db.table_class = _Table
        self._storage = self._db.storage
        self._storage.read()    # a corrupt file fails here, at start-up, naming itself
        # No query cache: reads are served from memory anyway, and a cache could hold results
        # of a batch that was rolled back.
        self._t = {name: self._db.table(name, cache_size=0) for name in STATE_TABLES}
        self._logs = {name: LogTable(self.directory / f"{name}.jsonl") for name in LOG_TABLES}
        self._t.update(self._logs)
        self._closed = False
        self._batch_depth = 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._behind = None          # (future, [(log, job)]) of the flush running behind

    def flush(self):
        """Writes the log lines kept in memory since the last flush (the supervisor does this
        every second, with flush_behind(), and at exit; a crash loses at most that much of the
        logs)."""
        if not self._closed:
            self._settle()
            self._finish([(log, job) for log in self._logs.values()
                          if (job := log.begin_flush()) is not None], run=True)

    async def flush_behind(self) -> None:
        """flush(), with the writing and the fsyncs in a worker thread: the loop goes on
        meanwhile (an SD card's fsync can take tens of milliseconds, a log's rewrite longer).
        Nothing is taken from the middle of a batch; one flush runs at a time."""
        if self._closed or self._behind is not None or self._batch_depth:
            return
        jobs = [(log, job) for log in self._logs.values() if (job := log.begin_flush()) is not None]
        if not jobs:
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kalki-store")
        fut = self._writer.submit(lambda: [job.run() for _, job in jobs])
        self._behind = (fut, jobs)
        try:
            await asyncio.wrap_future(fut)
        finally:
            if self._behind is not None and self._behind[0] is fut:
                self._settle()

    def _settle(self) -> None:
        """Waits for a flush running behind and takes its result (on the loop's thread)."""
        if self._behind is not None:
            fut, jobs = self._behind
            self._behind = None
            concurrent.futures.wait([fut])
            self._finish(jobs, run=False)

    def _finish(self, jobs, run: bool) -> None:
        failed = None
        for log, job in jobs:
            if run:
                job.run()
            try:
                replaced = log.finish_flush(job)
            except StoreError as e:
                failed = failed or e
                continue
            if replaced is not None:
                if run or self._writer is None:
                    replaced.close()
                else:
                    self._writer.submit(replaced.close)
        if failed is not None:
            raise failed

    def close(self):
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                if self._writer is not None:
                    self._writer.shutdown()
                self._db.close()
                for log in self._logs.values():
                    log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def batch(self):
        """Several mutating calls as one disk write; if the block raises, none of them count."""
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        marks = {name: log.mark() for name, log in self._logs.items()}
        self._batch_depth += 1
        try:
            with self._storage.batch():
                yield
        except BaseException:
            for name, log in self._logs.items():
                log.rollback(marks[name])
            raise
        finally:
            self._batch_depth -= 1

    def _now(self) -> str:
        return _stamp(self._clock(), "clock")

    def _table(self, name):
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        return self._t[name]

    # devices

    def upsert_device(self, name: str, mac: str, ip=None, type=None, identity: dict | None = None,
                      approved: bool | None = None, posture: str | None = None,
                      group: str | None = None) -> dict:
        """Adds a device, or refreshes the one with this name, and marks it seen now. For a
        known device, arguments left as None keep their stored value (a DHCP sighting must not
        reset approval or posture); a new device starts unapproved with posture "unknown"."""
        check_device_name(name, "device name", StoreError)
        _mac(mac, f"device {name!r}")
        given = {"mac": mac, "ip": ip, "type": type, "identity": identity, "approved": approved,
                 "posture": posture, "group": group}
        fields = {k: v for k, v in given.items() if v is not None}
        with self.batch():
            current = self._table("devices").get(where("name") == name)
            now = self._now()
            if current is None:
                blank = {"ip": None, "type": None, "identity": dict.fromkeys(IDENTITY_KEYS),
                         "approved": False, "posture": "unknown", "posture_since": now,
                         "posture_expires": None, "posture_revert_to": None, "group": None,
                         "first_seen": now}
                doc = {"name": name, **blank, **self._device_fields(name, blank, fields, now),
                       "last_seen": now}
                self._table("devices").insert(doc)
            else:
                changes = self._device_fields(name, current, fields, now)
                self._table("devices").update({**changes, "last_seen": now},
                                              doc_ids=[current.doc_id])
        return self.get_device(name)

    def get_device(self, name: str) -> dict | None:
        doc = self._table("devices").get(where("name") == name)
        return None if doc is None else _plain(doc)

    def device_by_mac(self, mac: str) -> dict | None:
        doc = self._table("devices").get(where("mac") == _mac(mac, "device lookup"))
        return None if doc is None else _plain(doc)

    def devices(self) -> list[dict]:
        return sorted((_plain(d) for d in self._table("devices").all()), key=lambda d: d["name"])

    def update_device(self, name: str, /, **fields) -> dict:
        """Changes some fields of a known device. A new posture restarts posture_since and,
        unless given too, clears posture_expires and posture_revert_to."""
        with self.batch():
            current = self._device(name)
            changes = self._device_fields(name, current, fields, self._now())
            self._table("devices").update(changes, doc_ids=[current.doc_id])
        return self.get_device(name)

    def remove_device(self, name: str):
        """Forgets the device; its posture history, alerts and decisions stay."""
        with self.batch():
            self._table("devices").remove(doc_ids=[self._device(name).doc_id])

    def _device(self, name):
        doc = self._table("devices").get(where("name") == name)
        if doc is None:
            raise StoreError(f"device {name!r} does not exist")
        return doc

    def _device_fields(self, name, current, fields, now) -> dict:
        """The checked changes to a device record, with what follows from them."""
        culprit = f"device {name!r}"
        if "name" in fields:
            raise StoreError(f"{culprit}: the name cannot be changed; remove the device and add it")
        unknown = set(fields) - set(current) - {"mac", "last_seen"}
        if unknown:
            raise StoreError(f"{culprit}: unknown field(s) {sorted(unknown)}")
        out = {}
        for key, value in fields.items():
            what = f"{culprit}, field {key}"
            if key == "mac":
                value = _mac(value, culprit)
                owner = self._table("devices").get(where("mac") == value)
                if owner is not None and owner["name"] != name:
                    raise StoreError(f"{culprit}: MAC address {value} already belongs to device "
                                     f"{owner['name']!r}")
            elif key == "ip" and value is not None:
                try:
                    value = str(ipaddress.IPv4Address(value))
                except ValueError:
                    raise StoreError(f"{what}: invalid IPv4 address {value!r}") from None
            elif key == "identity":
                if not isinstance(value, dict) or set(value) - set(IDENTITY_KEYS):
                    raise StoreError(f"{what}: expected a table with keys among "
                                     f"{', '.join(IDENTITY_KEYS)}, got {value!r}")
                value = {**current["identity"], **_json(value, what)}
            elif key == "approved" and not isinstance(value, bool):
                raise StoreError(f"{what}: expected true or false, got {value!r}")
            elif key == "posture":
                _text(value, what)
            elif key in ("posture_since", "first_seen", "last_seen") or key == "posture_expires" and value is not None:
                value = _stamp(value, what)
            elif key in ("type", "group", "posture_revert_to"):
                _text(value, what, optional=True)
            out[key] = value
        if "posture" in out and out["posture"] != current["posture"]:
            out.setdefault("posture_since", now)
            out.setdefault("posture_expires", None)
            out.setdefault("posture_revert_to", None)
        return out

    # posture history

    def record_posture(self, device: str, posture: str, reason: str, at=None) -> int:
        _text(posture, f"device {device!r}, posture")
        _text(reason, f"device {device!r}, posture {posture}, reason")
        at = self._now() if at is None else _stamp(at, f"device {device!r}, posture time")
        history = self._table("history")
        with self.batch():
            self._device(device)
            doc_id = history.insert({"device": device, "posture": posture, "reason": reason,
                                     "at": at})
            if _over(history.count_for(device), self.retention.history_per_device):
                history.trim(self.retention.history_per_device, device)
        return doc_id

    def posture_history(self, device: str, limit: int = 50) -> list[dict]:
        """Newest first; kept after the device is removed."""
        history = self._table("history")
        return history.records(history.rows(device)[:limit])

    # alerts

    def add_alert(self, alert: dict) -> int:
        """alert: device, type, source (one of ALERT_SOURCES), severity, and optionally
        details (a table) and at (default now). Returns the alert's id."""
        alert = self._record("alert", alert, required=("device", "type", "source", "severity"),
                             optional=("details", "at"))
        if alert["source"] not in ALERT_SOURCES:
            raise StoreError(f"alert for device {alert['device']!r}: unknown source "
                             f"{alert['source']!r} (known: {', '.join(ALERT_SOURCES)})")
        alert.setdefault("details", {})
        return self._append("alerts", alert, self.retention.alerts)

    def alerts(self, device: str | None = None, since=None, limit: int = 100) -> list[dict]:
        """Newest first, each with its id."""
        return _with_ids(self._table("alerts").records(self._alerts(device, None, since)[:limit]))

    def count_alerts(self, device: str | None, types=None, since=None) -> int:
        """Alerts of the device (any device if None) of these types (any if None) at or after
        since (ever if None)."""
        return len(self._alerts(device, [types] if isinstance(types, str) else types, since))

    def _alerts(self, device, types, since):
        since = None if since is None else _seconds(_stamp(since, "alerts since"))
        return self._table("alerts").rows(ANY if device is None else device, types, since)

    # decisions and the audit log

    def add_decision(self, rec: dict) -> int:
        """A posture decision, with whatever fields the rules engine records; at defaults to
        now. Returns its id."""
        if not isinstance(rec, dict):
            raise StoreError(f"decision: expected a table, got {rec!r}")
        if rec.get("kind", "decision") != "decision":
            raise StoreError(f"decision for device {rec.get('device')!r}: kind is "
                             f"{rec['kind']!r}; audit entries go through audit()")
        culprit = f"decision for device {rec.get('device')!r}"
        at = self._now() if rec.get("at") is None else _stamp(rec["at"], f"{culprit}, at")
        fields = _json({k: v for k, v in rec.items() if k != "at"}, culprit)
        rec = {"kind": "decision", "device": None, **fields, "at": at}
        return self._append("decisions", rec, self.retention.decisions)

    def audit(self, event: str, actor: str, details: dict | None = None) -> int:
        """An operator action (or a button press) in the audit log; details["device"], if
        present, files it under that device."""
        _text(event, "audit event")
        _text(actor, f"audit event {event!r}, actor")
        details = _json(details or {}, f"audit event {event!r}, details")
        if not isinstance(details, dict):
            raise StoreError(f"audit event {event!r}: details must be a table, got {details!r}")
        rec = {"kind": "audit", "event": event, "actor": actor, "device": details.get("device"),
               "details": details, "at": self._now()}
        return self._append("decisions", rec, self.retention.decisions)

    def decisions(self, device: str | None = None, limit: int = 100, kind: str | None = None
                  ) -> list[dict]:
        """Newest first, each with its id; kind "decision" or "audit" to see only one kind."""
        decisions = self._table("decisions")
        rows = decisions.rows(ANY if device is None else device, None if kind is None else [kind])
        return _with_ids(decisions.records(rows[:limit]))

    def _record(self, what, rec, required, optional) -> dict:
        if not isinstance(rec, dict):
            raise StoreError(f"{what}: expected a table, got {rec!r}")
        culprit = f"{what} for device {rec.get('device')!r}"
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            raise StoreError(f"{culprit}: missing field(s) {missing}")
        for key in required:
            _text(rec[key], f"{culprit}, field {key}")
        unknown = set(rec) - set(required) - set(optional)
        if unknown:
            raise StoreError(f"{culprit}: unknown field(s) {sorted(unknown)} "
                             f"(known: {', '.join(required + optional)})")
        at = self._now() if rec.get("at") is None else _stamp(rec["at"], f"{culprit}, at")
        rec = {**_json({k: v for k, v in rec.items() if k != "at"}, culprit), "at": at}
        if not isinstance(rec.get("details", {}), dict):
            raise StoreError(f"{culprit}: details must be a table, got {rec['details']!r}")
        return rec

    def _append(self, name, rec, bound) -> int:
        table = self._table(name)
        with self.batch():
            doc_id = table.insert(rec)
            if _over(len(table), bound):
                self._prune_log(table, bound, self._age_cutoff(None))
        return doc_id

    # site rules

    def put_rule(self, name: str, data: dict) -> dict:
        """Adds or replaces a rule. enabled defaults to the rule's current state (true for a
        new rule), so editing a disabled rule does not switch it on."""
        _text(name, "rule name")
        if not isinstance(data, dict):
            raise StoreError(f"rule {name!r}: expected a table, got {data!r}")
        if data.get("name", name) != name:
            raise StoreError(f"rule {name!r}: the data names another rule, {data['name']!r}")
        data = _json(data, f"rule {name!r}")
        with self.batch():
            current = self._table("rules").get(where("name") == name)
            enabled = data.get("enabled", True if current is None else current["enabled"])
            if not isinstance(enabled, bool):
                raise StoreError(f"rule {name!r}, field enabled: expected true or false, "
                                 f"got {enabled!r}")
            doc = {**data, "name": name, "enabled": enabled}

            def replace(old):   # update() with a table would keep fields the new data dropped
                old.clear()
                old.update(doc)
            if current is None:
                self._table("rules").insert(doc)
            else:
                self._table("rules").update(replace, doc_ids=[current.doc_id])
        return self.get_rule(name)

    def get_rule(self, name: str) -> dict | None:
        doc = self._table("rules").get(where("name") == name)
        return None if doc is None else _plain(doc)

    def rules(self) -> list[dict]:
        return sorted((_plain(d) for d in self._table("rules").all()), key=lambda r: r["name"])

    def delete_rule(self, name: str):
        with self.batch():
            self._table("rules").remove(doc_ids=[self._rule(name).doc_id])

    def set_rule_enabled(self, name: str, enabled: bool) -> dict:
        if not isinstance(enabled, bool):
            raise StoreError(f"rule {name!r}: enabled must be true or false, got {enabled!r}")
        with self.batch():
            self._table("rules").update({"enabled": enabled}, doc_ids=[self._rule(name).doc_id])
        return self.get_rule(name)

    def _rule(self, name):
        doc = self._table("rules").get(where("name") == name)
        if doc is None:
            raise StoreError(f"rule {name!r} does not exist")
        return doc

    # settings and maintenance

    def get_setting(self, key: str, default=None):
        """The stored value; else default; else the built-in default (business_hours,
        timezone); else None."""
        doc = self._table("settings").get(where("key") == key)
        if doc is not None:
            return copy.deepcopy(doc["value"])
        if default is not None:
            return default
        return copy.deepcopy(DEFAULT_SETTINGS.get(key))

    @staticmethod
    def check_setting(key, value) -> None:
        """Raises StoreError naming the setting if `value` would be refused."""
        _check_setting(key, value)

    def set_setting(self, key: str, value):
        _text(key, "setting name")
        value = _json(value, f"setting {key}")
        _check_setting(key, value)
        settings = self._table("settings")
        with self.batch():
            current = settings.get(where("key") == key)
            if current is None:
                settings.insert({"key": key, "value": value})
            else:
                settings.update({"value": value}, doc_ids=[current.doc_id])

    def settings(self) -> dict:
        stored = {d["key"]: d["value"] for d in self._table("settings").all()}
        return copy.deepcopy({**DEFAULT_SETTINGS, **stored})

    def set_maintenance(self, until):
        """Maintenance mode until this time (a datetime or ISO string); None ends it."""
        self.set_setting(MAINTENANCE_KEY,
                         None if until is None else _stamp(until, "maintenance until"))

    def maintenance_until(self) -> str | None:
        """As stored, even if already past: the caller compares it with its own clock."""
        return self.get_setting(MAINTENANCE_KEY)

    # retention

    def prune(self, now=None) -> dict[str, int]:
        """Applies the retention limits exactly, in one write; returns how many records each
        table lost. Inserts prune only once a table is 10% over its limit."""
        cutoff = self._age_cutoff(now)
        removed = {}
        with self.batch():
            for name, bound in (("alerts", self.retention.alerts),
                                ("decisions", self.retention.decisions)):
                removed[name] = self._prune_log(self._table(name), bound, cutoff)
            history, keep = self._table("history"), self.retention.history_per_device
            removed["history"] = sum(history.trim(keep, device)
                                     for device in history.devices_over(keep))
        return removed

    def _age_cutoff(self, now) -> float:
        now = datetime.fromisoformat(self._now() if now is None else _stamp(now, "prune now"))
        return (now - timedelta(days=self.retention.max_age_days)).timestamp()

    @staticmethod
    def _prune_log(table, bound, cutoff) -> int:
        return table.trim(bound, before=cutoff)


def _check_setting(key, value):
    """The settings other modules rely on are checked here, so a bad value fails when set,
    not hours later when a rule first looks at the clock."""
    if key == "timezone":
        check_timezone(value, "setting timezone", StoreError)
    elif key == "business_hours":
        if not isinstance(value, dict) or set(value) != {"days", "start", "end"}:
            raise StoreError("setting business_hours: expected a table with days, start and end, "
                             f"got {value!r}")
        check_business_hours(value, "setting business_hours", StoreError)
