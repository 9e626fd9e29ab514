"""The bpf() system call, the little of it the long-lived process needs: pinned objects, map
elements, object info, the ring buffer and BPF_PROG_TEST_RUN.

bcc compiles (appliance.dataplane.loader, in a child process); everything after that goes through this
module, so LLVM never enters the supervisor's memory. What it is not: a general libbpf.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import struct
from functools import lru_cache

from appliance.errors import DataplaneError

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "armv6l": 386}[platform.machine()]

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
ENOTSUPP = 524      # the kernel's own errno for an operation a map type lacks
# what a kernel without batch operations for a map answers (the callers go entry by entry)
NO_BATCHES = (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP)

BPF_ANY = 0
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _CreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def map_create(map_type: int, key_type, value_type, max_entries: int, flags: int, name: str) -> int:
    """A new map's fd (no pin: whoever holds it, or an outer map it is put in, keeps it)."""
    attr = _CreateAttr(map_type=map_type, key_size=ctypes.sizeof(key_type),
                       value_size=ctypes.sizeof(value_type), max_entries=max_entries,
                       map_flags=flags, map_name=name.encode()[:15])
    try:
        return _bpf(BPF_MAP_CREATE, attr, f"create map {name}")
    except OSError as e:
        raise DataplaneError(str(e)) from e


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64), ("count", ctypes.c_uint32),
                ("map_fd", ctypes.c_uint32), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
                ("rest", ctypes.c_uint8 * 64)]


class ProgInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 128)]


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


def obj_get(path: str) -> int:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(raw))
    return _bpf(BPF_OBJ_GET, attr, f"open pinned {path}")


def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def _info(fd: int, info: ctypes.Structure, what: str):
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, what)
    return info


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo(), "map info")


def prog_info(fd: int) -> ProgInfo:
    return _info(fd, ProgInfo(), "program info")


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id), f"open program id {prog_id}")


BPF_MAP_GET_FD_BY_ID = 14


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(id=map_id), f"open map id {map_id}")


def prog_map_ids(prog_fd: int) -> list[int]:
    """The ids of the maps a program uses (its own, pinned or not)."""
    count = prog_info(prog_fd).nr_map_ids
    ids = (ctypes.c_uint32 * count)()
    info = ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    _info(prog_fd, info, "program info")
    return list(ids[:min(count, info.nr_map_ids)])


class Map:
    """A pinned map with ctypes keys and values. Per-CPU maps return a list of values.

    An array whose value type says EMPTY_IS_ABSENT = True is used like a hash: an all-zero
    slot is absent (lookup gives None, keys() skips it) and delete() zeroes the slot."""

    def __init__(self, path: str, key_type, value_type, fd: int | None = None):
        self.path = path
        self.fd = obj_get(path) if fd is None else fd
        try:
            info = map_info(self.fd)
        except OSError as e:
            os.close(self.fd)
            raise DataplaneError(f"map at {path}: {e}") from e
        self.name = info.name.decode()
        self.max_entries = info.max_entries
        self.per_cpu = info.type in (BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH,
                                     BPF_MAP_TYPE_LRU_PERCPU_HASH)
        self.sparse = info.type == BPF_MAP_TYPE_ARRAY and getattr(value_type, "EMPTY_IS_ABSENT", False)
        if info.key_size != ctypes.sizeof(key_type) or info.value_size != ctypes.sizeof(value_type):
            os.close(self.fd)
            raise DataplaneError(
                f"map {self.name} at {path}: kernel has key/value sizes {info.key_size}/"
                f"{info.value_size}, appliance.dataplane.maps expects {ctypes.sizeof(key_type)}/"
                f"{ctypes.sizeof(value_type)}: ebpf/kalki.h and appliance/dataplane/maps.py disagree")
        self.key_type = key_type
        self.value_type = value_type
        self._stride = (ctypes.sizeof(value_type) + 7) & ~7

    @classmethod
    def by_id(cls, map_id: int, key_type, value_type) -> Map:
        """An unpinned map (an allow-list's trie) by its id: the caller closes it."""
        try:
            fd = map_fd_by_id(map_id)
        except OSError as e:       # gone since its id was read
            raise DataplaneError(str(e)) from e
        return cls(f"map id {map_id}", key_type, value_type, fd=fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value_buffer(self):
        if self.per_cpu:
            return ctypes.create_string_buffer(self._stride * possible_cpus())
        return self.value_type()

    def lookup(self, key):
        value = self._value_buffer()
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key), value=ctypes.addressof(value))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"lookup in {self.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise DataplaneError(str(e)) from e
        if self.per_cpu:
            raw = value.raw
            return [self.value_type.from_buffer_copy(raw, i * self._stride)
                    for i in range(possible_cpus())]
        if self.sparse and not any(bytes(value)):
            return None
        return value

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if self.per_cpu and not isinstance(value, (bytes, bytearray)):
            buf = ctypes.create_string_buffer(self._stride * possible_cpus())
            for i in range(possible_cpus()):
                ctypes.memmove(ctypes.addressof(buf) + i * self._stride, ctypes.addressof(value),
                               ctypes.sizeof(value))
            value = buf
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key),
                         value=ctypes.addressof(value), flags=flags)
        try:
            _bpf(BPF_MAP_UPDATE_ELEM, attr, f"update in {self.name}")
        except OSError as e:
            raise DataplaneError(str(e)) from e

    def zero(self, first: int, count: int) -> None:
        """Entries first .. first + count - 1 of a u32-keyed array emptied: one system call
        (BPF_MAP_UPDATE_BATCH, Linux 5.6), where one per entry cost a new device 32 calls.
        Entry by entry where the kernel has no batch updates for the map."""
        keys = (ctypes.c_uint32 * count)(*range(first, first + count))
        size = self._stride * possible_cpus() if self.per_cpu else ctypes.sizeof(self.value_type)
        values = ctypes.create_string_buffer(size * count)
        attr = _BatchAttr(keys=ctypes.addressof(keys), values=ctypes.addressof(values), count=count,
                          map_fd=self.fd)
        try:
            _bpf(BPF_MAP_UPDATE_BATCH, attr, f"batch update in {self.name}")
            return
        except OSError as e:
            if e.errno not in NO_BATCHES:
                raise DataplaneError(str(e)) from e
        empty = self.value_type()
        for key in keys:
            self.update(ctypes.c_uint32(key), empty)

    def first_values(self, count: int):
        """Entries 0 .. count - 1 of a u32-keyed array that is not per-CPU, as a ctypes array
        indexed by the key: one BPF_MAP_LOOKUP_BATCH (Linux 5.6) instead of a lookup per
        entry, which cost the tamper watch 3 ms at 1,000 devices. None where the kernel has no
        batch lookups for the map: the caller looks entries up one by one."""
        return self.values_from(0, count)

    def values_from(self, first: int, count: int):
        """first_values() from entry `first` on: index 0 of the array is entry `first`."""
        count = min(count, self.max_entries - first)
        values = (self.value_type * max(count, 0))()
        if count > 0 and not self._lookup_batch(first, count, ctypes.addressof(values)):
            return None
        return values

    def slots(self, first: int, count: int) -> list | None:
        """Entries first .. first + count - 1 of a u32-keyed array, each as lookup() gives it
        (a per-CPU array's as a list of one value per CPU), with one BPF_MAP_LOOKUP_BATCH: a
        device's 16 counters in one call, not 16 (the traffic charts read 28 devices a tick
        at 1,000 devices). None where the kernel has no batch lookups for the map."""
        count = max(0, min(count, self.max_entries - first))
        if count == 0:
            return []
        size = self._stride * possible_cpus() if self.per_cpu else ctypes.sizeof(self.value_type)
        raw = ctypes.create_string_buffer(size * count)
        if not self._lookup_batch(first, count, ctypes.addressof(raw)):
            return None
        data = raw.raw
        if self.per_cpu:
            return [[self.value_type.from_buffer_copy(data, i * size + cpu * self._stride)
                     for cpu in range(possible_cpus())] for i in range(count)]
        return [self.value_type.from_buffer_copy(data, i * size) for i in range(count)]

    def _lookup_batch(self, first: int, count: int, values: int) -> bool:
        """Entries first .. first + count - 1 into the buffer at address `values`, with one
        BPF_MAP_LOOKUP_BATCH; False where the kernel has no batch lookups for the map."""
        keys = (ctypes.c_uint32 * count)()
        start, token = ctypes.c_uint32(first - 1), ctypes.c_uint32()   # starts after in_batch
        attr = _BatchAttr(in_batch=ctypes.addressof(start) if first else 0,
                          out_batch=ctypes.addressof(token), keys=ctypes.addressof(keys),
                          values=values, count=count, map_fd=self.fd)
        try:
            _bpf(BPF_MAP_LOOKUP_BATCH, attr, f"batch lookup in {self.name}")
        except OSError as e:
            if e.errno in NO_BATCHES:
                return False
            if e.errno != errno.ENOENT:     # ENOENT: the end of the map, reached with all of it
                raise DataplaneError(str(e)) from e
        if attr.count != count or keys[0] != first or keys[count - 1] != first + count - 1:
            raise DataplaneError(f"batch lookup in {self.name}: {attr.count} of {count} entries "
                                 f"from {first}")
        return True

    def delete(self, key) -> bool:
        if self.sparse:
            if self.lookup(key) is None:
                return False
            self.update(key, self.value_type())
            return True
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr, f"delete in {self.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise DataplaneError(str(e)) from e
        return True

    def _present(self) -> list | None:
        """A sparse array's entries that are not empty, as (key, value), with one
        BPF_MAP_LOOKUP_BATCH: walking its 4,096 slots a key and a lookup at a time made a
        Dataplane's first apply take 64 ms (8,195 system calls). None where the kernel has
        no batch lookups for the map."""
        values = self.first_values(self.max_entries)
        if values is None:
            return None
        size = ctypes.sizeof(self.value_type)
        raw, empty = bytes(values), bytes(size)
        return [(self.key_type(i), self.value_type.from_buffer_copy(raw, i * size))
                for i in range(len(values)) if raw[i * size:(i + 1) * size] != empty]

    def keys(self):
        present = self._present() if self.sparse else None
        yield from ((k for k, _ in present) if present is not None else self._walk_keys())

    def _walk_keys(self):
        """Key after key (BPF_MAP_GET_NEXT_KEY); a sparse array's empty slots left out."""
        key = None
        while True:
            nxt = self.key_type()
            attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(key) if key is not None else 0,
                             value=ctypes.addressof(nxt))
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"iterate {self.name}")
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise DataplaneError(str(e)) from e
            if not self.sparse or self.lookup(nxt) is not None:
                yield nxt
            key = nxt

    def items(self):
        present = self._present() if self.sparse else None
        if present is not None:
            yield from present
            return
        for k in list(self._walk_keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v


class RingBuffer:
    """Consumer side of a BPF_MAP_TYPE_RINGBUF, by mmap: no library, no compiler."""

    _BUSY = 1 << 31
    _DISCARD = 1 << 30

    def __init__(self, path: str):
        self.fd = obj_get(path)
        info = map_info(self.fd)
        self.size = info.max_entries
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # The data area is mapped twice in a row by the kernel, so a record never wraps.
        self._producer = mmap.mmap(self.fd, page + 2 * self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._data_offset = page
        self._poll = select.epoll()
        self._poll.register(self.fd, select.EPOLLIN)
        self._read_to: int | None = None     # read by drain(consume=False), not yet given back

    def fileno(self) -> int:
        return self.fd

    def drain(self, limit: int = 1 << 30, consume: bool = True) -> list[bytes]:
        """Every committed record not yet consumed, oldest first (at most `limit`). With
        consume=False the records stay the kernel's until consume_read(): a reader that dies
        before acting on them finds them again (the ring buffer outlives the process)."""
        out: list[bytes] = []
        cons = self._read_to if self._read_to is not None else struct.unpack_from("<Q", self._consumer, 0)[0]
        prod = struct.unpack_from("<Q", self._producer, 0)[0]
        mask = self.size - 1
        while cons < prod and len(out) < limit:
            off = self._data_offset + (cons & mask)
            length, _ = struct.unpack_from("<II", self._producer, off)
            if length & self._BUSY:
                break
            if not length & self._DISCARD:
                out.append(bytes(self._producer[off + 8: off + 8 + length]))
            cons += ((length & ~(self._BUSY | self._DISCARD)) + 8 + 7) & ~7
            if consume:
                struct.pack_into("<Q", self._consumer, 0, cons)
        if not consume:
            self._read_to = cons
        else:
            self._read_to = None
        return out

    def pending(self) -> bool:
        """Whether records were committed past what was read: two numbers compared in the
        shared pages, no system call (the supervisor asks before each telemetry report)."""
        cons = self._read_to if self._read_to is not None else struct.unpack_from("<Q", self._consumer, 0)[0]
        return struct.unpack_from("<Q", self._producer, 0)[0] > cons

    def consume_read(self) -> None:
        """Gives back to the kernel what drain(consume=False) read."""
        if self._read_to is not None:
            if self._read_to > struct.unpack_from("<Q", self._consumer, 0)[0]:   # never backwards
                struct.pack_into("<Q", self._consumer, 0, self._read_to)
            self._read_to = None

    def wait(self, timeout: float) -> bool:
        return bool(self._poll.poll(timeout))

    def close(self) -> None:
        if self.fd >= 0:
            self._poll.close()
            self._consumer.close()
            self._producer.close()
            os.close(self.fd)
            self.fd = -1


def prog_test_run(prog_fd: int, packet: bytes, repeat: int) -> tuple[int, int]:
    """Runs an XDP program `repeat` times on `packet`; returns (XDP verdict, ns per run)."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 512)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(packet), data_in=ctypes.addressof(data_in),
                        data_size_out=ctypes.sizeof(data_out), data_out=ctypes.addressof(data_out),
                        repeat=repeat)
    _bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return attr.retval, attr.duration
