"""The append-only logs (posture history, alerts, decisions): JSON lines on disk, a few numbers
per record in memory, written behind the loop."""
from __future__ import annotations

import bisect
import collections
import json
import os
import time
from array import array
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from appliance.errors import StoreError
from appliance.store.storage import fsync_dir


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
    cost 235 MB (bench/bench_store.py).

    Records read newest first in the order they were recorded (their ids), not by their times:
    the policy clock they are stamped with can go back (the lab's clock set back to replay a
    night, a system clock stepped back), and a record stamped after that is still newer than
    the ones before it. Times still bound searches (since, before) and age-outs."""

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
        self._reader: BinaryIO | None = None
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
        """The rows of the records that match, newest first: in the order they were recorded
        (by id), whatever their times say (see the class)."""
        rows: Sequence[int]
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
        return list(reversed(rows))      # rows lie in id order (_row_of relies on it too)

    def newest(self, rows: list[int], limit: int) -> list[_Record]:
        """The records at the first `limit` of `rows` (newest first, as rows() gives them), each
        marked "clock_back": true where its time is earlier than that of the one recorded before
        it among `rows`: read in the order things happened, the times there would seem to run
        backwards, and the mark says it is the clock that went back, not the order."""
        out = self.records(rows[:limit])
        at = self._at
        for k, rec in enumerate(out):
            if k + 1 < len(rows) and at[rows[k]] < at[rows[k + 1]]:
                rec["clock_back"] = True
        return out

    def records(self, rows) -> list[_Record]:
        """The whole records at these rows, as the caller's own dicts (doc_id set)."""
        out = []
        for i in rows:
            doc_id = self._id[i]
            line = self._unwritten.get(doc_id) if self._pos[i] < 0 else self._read(i)
            if line is None:
                raise StoreError(f"the log {self.path}: record {doc_id} is neither in the file nor "
                                 "waiting to be written; restart the supervisor")
            rec = json.loads(line)
            if rec.pop("_id", None) != doc_id:
                raise StoreError(f"the log {self.path} changed under the supervisor (record "
                                 f"{doc_id} is not where it was written); restart it")
            device = self._names[self._device[i]]
            if rec.get("device", device) != device:      # filed under a device's new name (relabel)
                rec["device"] = device
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
        ordered = sorted(doomed)
        columns: tuple[array[Any], ...] = (      # integer and float columns alike
            self._id, self._at, self._device, self._tag, self._pos, self._size)
        for column in columns:
            if len(ordered) <= 256:    # a device's trim: a few moves of the tail
                for i in reversed(ordered):
                    del column[i]
            else:                      # an age-out: one copy of what stays, run by run
                kept, start = array(column.typecode), 0
                for i in ordered:
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

    def relabel(self, old: str, new: str, below: int | None = None) -> list[int]:
        """Files the records of device `old` (those with ids below `below`, if given) under
        `new`: a device renamed keeps its history. Only memory changes: the lines keep the name
        they were written with, and the store applies the rename again at each start (the
        device's former_names). Returns the ids moved, for unlabel()."""
        old_id = self._name_ids.get(old)
        if old_id is None or old == new:
            return []
        new_id = self._name_id(new)
        moved = []
        for i, d in enumerate(self._device):
            if d == old_id and (below is None or self._id[i] < below):
                self._device[i] = new_id
                moved.append(self._id[i])
        self._per_device[old_id] -= len(moved)
        self._per_device[new_id] += len(moved)
        return moved

    def relabel_all(self, renames: list[tuple[str, str, int]]) -> None:
        """relabel() for many (old, new, below) at once, in one pass (the store's start: every
        renamed device's former names). A name given up and taken again is told apart by id:
        a record goes to the rename whose `below` is the first above its id."""
        by_old: dict[int, list[tuple[int, int]]] = {}
        for old, new, below in renames:
            old_id = self._name_ids.get(old)
            if old_id is not None and old != new:
                by_old.setdefault(old_id, []).append((below, self._name_id(new)))
        if not by_old:
            return
        for entries in by_old.values():
            entries.sort()
        for i, d in enumerate(self._device):
            found = by_old.get(d)
            if found is None:
                continue
            k = bisect.bisect_right(found, (self._id[i], len(self._names)))
            if k < len(found):
                new_id = found[k][1]
                self._device[i] = new_id
                self._per_device[d] -= 1
                self._per_device[new_id] += 1

    def unlabel(self, doc_ids: list[int], old: str) -> None:
        """Undoes relabel(): these records (where still kept) are filed under `old` again."""
        old_id = self._name_id(old)
        for doc_id in doc_ids:
            row = self._row_of(doc_id)
            if row is not None and self._device[row] != old_id:
                self._per_device[self._device[row]] -= 1
                self._per_device[old_id] += 1
                self._device[row] = old_id

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
        job: _Append | _Rewrite
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
            self.error = e
            try:
                self.tmp_path.unlink(missing_ok=True)
            except OSError:
                pass    # a read-only file system made none, and refuses the unlink too

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
        fsync_dir(self.path.parent)
        self.total = pos

    def _copy(self, start: int, end: int, out) -> None:
        while start < end:
            data = os.pread(self.reader.fileno(), min(end - start, 1 << 20), start)
            if not data:
                raise OSError(f"{self.path} is shorter than the supervisor wrote it")
            out.write(data)
            start += len(data)
