"""TinyDB's storage for the state file: every write replaces the whole file atomically (a
temporary file, fsync, rename, fsync of the directory), so a kill or a power cut at any instant
leaves the old state or the new one, never a torn file. TinyDB's own storage writes in place."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from tinydb import Storage
from tinydb.table import Table

from appliance.errors import StoreError


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


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
