"""The Protocol seams and their fakes agree with the real things: every method and property a
Protocol names exists on the real class and on the fake, with the same parameter names. A fake
that drifts from the product would make the tests that use it prove nothing."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import FakeDataplane  # noqa: E402
from test_panel import FakeOps  # noqa: E402
from test_policy import FakeFacts  # noqa: E402

from appliance.dataplane.api import Dataplane  # noqa: E402
from appliance.dataplane.port import DataplanePort  # noqa: E402
from appliance.faces.panel import PanelOps  # noqa: E402
from appliance.policy import Facts  # noqa: E402
from appliance.supervisor.core import Supervisor  # noqa: E402
from appliance.supervisor.ops import Ops  # noqa: E402


def members(protocol) -> dict[str, object]:
    names = {n for n in vars(protocol) if not n.startswith("_")}
    names |= set(getattr(protocol, "__annotations__", {}))
    return {n: vars(protocol).get(n) for n in sorted(names)}


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def drift(protocol, cls, instance=None) -> list[str]:
    """What `cls` lacks of `protocol`, or has with other parameters."""
    problems = []
    for name, member in members(protocol).items():
        have = inspect.getattr_static(cls, name, None)
        if have is None and instance is not None and hasattr(instance, name):
            continue        # a plain attribute set in __init__
        if have is None:
            problems.append(f"{cls.__name__} has no {name}")
        elif callable(member) and not isinstance(member, property) and callable(have) \
                and params(member) != params(have):
            problems.append(f"{cls.__name__}.{name}{params(have)} differs from the protocol's "
                            f"{params(member)}")
    return problems


@pytest.mark.parametrize("protocol, cls, make", [
    (DataplanePort, Dataplane, None), (DataplanePort, FakeDataplane, FakeDataplane),
    (Facts, Supervisor, None), (Facts, FakeFacts, FakeFacts),
    (PanelOps, Ops, None),
])
def test_the_real_thing_and_its_fake_have_what_the_seam_names(protocol, cls, make):
    problems = drift(protocol, cls, make() if make else None)
    assert not problems, problems


def test_the_panel_s_fake_ops_has_what_the_seam_names(tmp_path):
    import asyncio
    fake = FakeOps(tmp_path, asyncio.new_event_loop(), lambda: 0.0)
    try:
        assert not drift(PanelOps, FakeOps, fake), drift(PanelOps, FakeOps, fake)
    finally:
        fake.loop.close()
        fake.store.close()


def test_drift_is_found():
    class Thin:
        def apply(self, other):
            return 0
    found = drift(DataplanePort, Thin)
    assert "Thin has no read_back" in found
    assert any(p.startswith("Thin.apply") for p in found)
