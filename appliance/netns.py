"""Run the calling thread inside a named network namespace, and come back.

setns(2) moves only the calling thread, so the lab and the tests can drive several namespaces
from one process without `ip netns exec` (which also remounts /sys and hides /sys/fs/bpf).
"""
import contextlib
import ctypes
import os

from appliance.errors import LabError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"cannot enter network namespace {what}: {os.strerror(err)}")


def path(name: str) -> str:
    """A namespace's file: `name` under /run/netns, or `name` itself if it is a path."""
    return name if name.startswith("/") else f"/run/netns/{name}"


@contextlib.contextmanager
def entered(name: str | None):
    """`with entered("kalki-x-gw"):` (or a path such as /proc/PID/ns/net) runs the block in
    that namespace; None means stay."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path(name), os.O_RDONLY)
    except FileNotFoundError:
        os.close(own)
        raise LabError(f"network namespace {name} does not exist") from None
    try:
        _setns(target, name)
        yield
    finally:
        os.close(target)
        _setns(own, "of this process")
        os.close(own)


def enter_for_good(name: str) -> None:
    """For a child process that lives in the namespace (the loader, lab services)."""
    fd = os.open(path(name), os.O_RDONLY)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)
