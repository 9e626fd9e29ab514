"""TinyDB's storage for the state file: every write replaces the whole file atomically (a
temporary file, fsync, rename, fsync of the directory), so a kill or a power cut at any instant
leaves the old state or the new one, never a torn file. TinyDB's own storage writes in place."""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from collections.abc import MutableMapping
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii
from pathlib import Path

from tinydb import Storage
from tinydb.table import Table

from appliance.errors import StoreError

_ENCODER = json.JSONEncoder()     # json.dumps' defaults


class _Table(Table):
    """TinyDB's table, editing its own copies of the documents an update looks at, and only
    those. TinyDB edits the documents of the table it updates in place (update() edits them,
    remove() pops them); its reads copy each document they return. TinyDB's own update also
    makes two new dicts of the whole table (its ids as ints, then back as text): at 1,000
    devices that and a copy of every document were most of a posture change's 0.3 ms record.
    A document nobody looked at stays the same object, which is what lets the storage reuse
    its text (AtomicJSONStorage). Values nested inside documents are shared: TinyDB never
    edits them, and Store copies what it returns."""

    def _update_table(self, updater):
        tables = self._storage.read() or {}
        stored = tables.get(self.name, {})
        table = _OwnCopies(stored, self.document_id_class)
        updater(table)
        tables[self.name] = table.unchanged_as_they_were(stored)
        self._storage.write(tables)
        self.clear_cache()


class _OwnCopies(MutableMapping):
    """The table as TinyDB's updaters see it (ids as ints) over a copy of the stored one (ids
    as text): a document is copied the first time it is looked up, so the stored one is
    never edited."""

    def __init__(self, stored: dict, id_class):
        self.documents = dict(stored)
        self._id_class = id_class
        self._own: set[str] = set()

    def unchanged_as_they_were(self, stored: dict) -> dict:
        """The documents, with those looked at (a condition reads every one) but left equal
        to the stored ones given back as the stored objects."""
        docs = self.documents
        for key in self._own:
            if key in stored and key in docs and docs[key] == stored[key]:
                docs[key] = stored[key]
        return docs

    def __getitem__(self, doc_id):
        key = str(doc_id)
        doc = self.documents[key]
        if key not in self._own:
            doc = self.documents[key] = dict(doc)
            self._own.add(key)
        return doc

    def __setitem__(self, doc_id, doc) -> None:
        key = str(doc_id)
        self.documents[key] = doc
        self._own.add(key)

    def __delitem__(self, doc_id) -> None:
        del self.documents[str(doc_id)]

    def __contains__(self, doc_id) -> bool:
        return str(doc_id) in self.documents

    def __iter__(self):
        return map(self._id_class, self.documents)

    def __len__(self) -> int:
        return len(self.documents)


class AtomicJSONStorage(Storage):
    """A TinyDB storage that never leaves a half-written file: each write goes to
    `.<name>.tmp` in the same directory, is fsynced, renamed over the file, and the directory
    is fsynced so that the rename itself survives a power cut.

    The state is kept in memory, parsed, because TinyDB reads everything before every query
    and every write: a read costs a copy of the one table TinyDB takes, and a write inside a
    batch costs nothing until the batch ends and the state is serialised once. Nothing else may
    write the file while this object has it open.
    """

    def __init__(self, path, keep_unsaved: bool = False, **json_kwargs):
        """keep_unsaved: when the disk refuses a write, keep the new state in memory as the
        state (`unsaved` says why, `retry()` writes it) instead of raising and going back to
        the file's. The supervisor's choice: what it wrote is already in force in the kernel."""
        self.path = Path(path)
        self.keep_unsaved = keep_unsaved
        self.unsaved: str | None = None
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.previous_path = previous_path(self.path)
        self._json_kwargs = json_kwargs
        self._data = None   # the state parsed; None until loaded, or after a failed batch
        self._batch_depth = 0
        self._dirty = False
        self._texts: dict[int, tuple[dict, str, str]] = {}   # id(document) -> (it, its id, JSON)
        # write_behind: the text to write next, and whether the writer thread is at work
        self.write_behind = False
        self._lock = threading.Lock()
        self._next_text: str | None = None
        self._writing = False
        self._written = threading.Condition(self._lock)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._file_lock = threading.Lock()     # one writer of the file at a time

    def read(self):
        if self._data is None:
            self.settle()      # the file as the last write left it
            self._data = self._load()
        return dict(self._data) if self._data else None    # TinyDB replaces a table in it

    def table(self, name: str) -> dict | None:
        """The table's documents as the state holds them now, not a copy: TinyDB replaces a
        table it changes and never edits one in place, and a failed batch reads the file
        again, so the same object is the same content (Store.get_setting's memo)."""
        if self._data is None:
            self.read()
        data: dict = self._data or {}
        return data.get(name)

    def write(self, data):
        # TinyDB hands back what read() gave it, with the table it changed replaced: take the
        # tables as they are (dict.items, not the copying __getitem__).
        data = dict(dict.items(data))
        if self._batch_depth:
            self._dirty = True
            self._data = data
        else:
            self._save(data)

    @contextmanager
    def batch(self):
        """Writes inside the block stay in memory and reach the disk as one write at the end.
        If the block raises, nothing is written and the state is re-read from the file."""
        self._batch_depth += 1
        try:
            yield
            if self._batch_depth == 1 and self._dirty:
                self._save(self._data)
        except BaseException:
            if self._batch_depth == 1:
                self._data = None
            raise
        finally:
            self._batch_depth -= 1
            if not self._batch_depth:
                self._dirty = False

    def close(self):
        self.settle()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        self._data = None
        self._texts = {}

    def _load(self):
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"cannot read the store {self.path}: {e}") from None
        # An empty or torn file is refused like a corrupt one: starting empty would forget every
        # approval and make every device unknown, silently.
        return parse_state(text, self.path)

    def _text(self, data) -> str:
        """json.dumps(data), with the text of each document that is the same object as at the
        last write taken from then: a posture change re-encodes the devices it changed, not
        all of them (1,000 devices: 2 ms of the loop's time per write). The documents of the
        state are never edited in place (_Table), so the same object has the same text."""
        if self._json_kwargs:
            return json.dumps(data, **self._json_kwargs)
        encode, key, known, texts = _ENCODER.encode, encode_basestring_ascii, self._texts, {}
        tables = []
        for name, table in data.items():
            docs = []
            for doc_id, doc in table.items():
                kept = known.get(id(doc))
                if kept is None or kept[0] is not doc or kept[1] != doc_id:
                    kept = (doc, doc_id, f"{key(doc_id)}: {encode(doc)}")
                texts[id(doc)] = kept     # the document held with its text: its id stays its own
                docs.append(kept[2])
            tables.append(f"{key(name)}: {{{', '.join(docs)}}}")
        self._texts = texts
        return f"{{{', '.join(tables)}}}"

    def _save(self, data) -> None:
        text = self._text(data)
        if self.write_behind and self.keep_unsaved:
            self._data = data
            self._hand_over(text)
            return
        self._write_now(text)
        self._data = data

    def _write_now(self, text: str) -> None:
        with self._file_lock:
            try:
                self._replace(text)
            except StoreError as e:
                if not self.keep_unsaved:
                    raise
                self.unsaved = str(e)
            else:
                self.unsaved = None

    # -- write_behind: the file written in a worker thread ---------------------------------
    # The caller's thread makes the text (so it is the state of that moment) and goes on; the
    # writer takes the newest text there is, so a burst of writes costs the disk the last one.
    # Set by the supervisor (appliance.run) only, with keep_unsaved: a refused write cannot be
    # raised to a caller that has gone on, and is `unsaved` instead, retried by its watch.
    # At 1,000 devices the write (1 MB, two fsyncs) held the loop 2-4 ms after every posture
    # change on a disk, and an SD card's fsync can take tens of milliseconds.

    def _hand_over(self, text: str) -> None:
        with self._lock:
            self._next_text = text
            if self._writing:
                return      # the writer takes it when it is done with the one before
            self._writing = True
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kalki-state")
        self._writer.submit(self._write_behind)

    def _write_behind(self) -> None:
        while True:
            with self._lock:
                text, self._next_text = self._next_text, None
                if text is None:
                    self._writing = False
                    self._written.notify_all()
                    return
            self._write_now(text)

    def settle(self) -> None:
        """Waits until the writer has written everything handed to it."""
        with self._lock:
            self._written.wait_for(lambda: not self._writing)

    def retry(self) -> bool:
        """Writes the state kept in memory after a refused write; True once it is on disk.
        False while the writer is at work: its own outcome says."""
        with self._lock:
            if self._writing:
                return False
        if self.unsaved is None:
            return True
        self._write_now(self._text(self._data))
        return self.unsaved is None

    def _replace(self, text: str):
        try:
            with open(self.tmp_path, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                # The generation being replaced stays as <name>.prev: a hard link, no copy.
                link = self.previous_path.with_name(f".{self.previous_path.name}.tmp")
                link.unlink(missing_ok=True)
                os.link(self.path, link)
                os.replace(link, self.previous_path)
            os.replace(self.tmp_path, self.path)
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            try:
                self.tmp_path.unlink(missing_ok=True)
            except OSError:
                pass        # a read-only file system made none, and refuses the unlink too
            raise StoreError(f"cannot write the store {self.path}: {e}") from None


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def parse_state(text: str, path: Path) -> dict:
    """The state file's tables; StoreError naming the file, what is wrong and what to do."""
    def refused(why: str) -> StoreError:
        prev = previous_path(path)
        offer = (f" The previous generation is {prev}: `kalki store restore-previous` puts it back."
                 if prev.exists() else " Restore a backup, or move it aside to start empty.")
        return StoreError(f"the store {path} {why}; it is left as it is.{offer}")
    if not text.strip():
        raise refused("is empty")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise refused(f"is corrupt (not valid JSON: {e})") from None
    if not isinstance(data, dict) or not all(
            isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in data.values()):
        raise refused("is not a TinyDB file (expected tables of documents)")
    return data


def restore_previous(path: Path) -> Path:
    """Puts <name>.prev back as the state file, after checking it; the refused file is kept
    as <name>.refused. Only while no supervisor has the store open. Returns the kept file."""
    prev = previous_path(path)
    try:
        text = prev.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"no previous generation to restore: {prev}: {e}") from None
    parse_state(text, prev)
    refused = path.with_name(path.name + ".refused")
    if path.exists():
        os.replace(path, refused)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return refused


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
