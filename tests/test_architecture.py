"""The house rules, checked on the source: which package may import which (every import, at
module level or inside a function), and that nothing in the product imports the lab.

Direction: faces -> supervisor.ops -> {policy, dataplane, store} -> {vocab, errors, config}.
Telemetry reports upward only through callbacks that appliance.run wires; the command line may
import anything, the lab included, to serve `kalki lab`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = ("appliance", "appliance.errors", "appliance.vocab", "appliance.config", "appliance.netns")

# Importer (a package or module prefix) -> what it may import besides itself and BASE.
# "appliance.*" is the whole product.
ALLOWED: dict[str, tuple[str, ...]] = {
    "appliance": (),            # the package itself (HOME), and nothing below it by this rule
    "appliance.errors": (),
    "appliance.vocab": (),
    "appliance.config": (),
    "appliance.netns": (),
    "appliance.client": (),
    "appliance.store": (),
    "appliance.telemetry": (),
    "appliance.dataplane": ("appliance.netns",),
    # A profile's stacks are checked against the umbox catalogue, the data path's vocabulary.
    "appliance.policy": ("appliance.dataplane.umbox",),
    # The lease script is a client of the control socket.
    "appliance.system": ("appliance.netns", "appliance.client"),
    "appliance.supervisor": ("appliance.policy", "appliance.dataplane", "appliance.store"),
    "appliance.faces": ("appliance.supervisor.ops",),
    "appliance.run": ("appliance.*",),
    "appliance.cli": ("appliance.*", "lab"),
    "lab": ("appliance.*",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every product module that `source` (module `module`) imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if _is_module(full) else base)
    return {m for m in found if m.split(".")[0] in ("appliance", "lab")}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(module: str) -> str:
    """The longest prefix of `module` with a rule; "appliance" is a rule for itself only."""
    return max((p for p in ALLOWED if _within(module, p) and (p != "appliance" or module == p)),
               key=len, default="")


def violations(module: str, imported: set[str]) -> list[str]:
    rule = rule_for(module)
    if not rule:
        return [f"{module}: no rule says what it may import (add it to ALLOWED)"]
    own = rule if rule.count(".") <= 1 else rule.rsplit(".", 1)[0]
    allowed = (own, *BASE, *ALLOWED[rule])
    bad = []
    for target in sorted(imported):
        if target in BASE or any(_within(target, a.removesuffix(".*")) for a in allowed if a not in BASE):
            continue
        bad.append(f"{module} imports {target}: {rule} may import only "
                   f"{', '.join((own, *ALLOWED[rule])) or 'the base'} and {', '.join(BASE)}")
    return bad


def product_modules() -> list[Path]:
    return sorted([*ROOT.glob("appliance/**/*.py"), *ROOT.glob("lab/**/*.py")])


def test_every_import_follows_the_direction_of_the_house():
    problems = []
    for path in product_modules():
        module = module_name(path)
        problems += violations(module, imports(path.read_text(), module, path.name == "__init__.py"))
    assert not problems, "\n".join(problems)


def test_nothing_in_the_product_imports_the_lab():
    users = [module_name(p) for p in ROOT.glob("appliance/**/*.py")
             if any(_within(m, "lab") for m in imports(p.read_text(), module_name(p)))]
    assert users in ([], ["appliance.cli"]), users


@pytest.mark.parametrize("module, source", [
    ("appliance.faces.web.views", "from appliance.supervisor.core import Supervisor"),
    ("appliance.faces.panel", "def f():\n    from appliance.store import state"),
    ("appliance.policy.engine", "from appliance.supervisor import ops"),
    ("appliance.dataplane.api", "import appliance.policy.profiles"),
    ("appliance.telemetry.mqtt", "from appliance.system import broker"),
    ("appliance.store.state", "from lab import topology"),
    ("appliance.supervisor.ops", "from appliance.faces.web import auth"),
])
def test_a_wrong_import_is_caught(module, source):
    assert violations(module, imports(source, module)), f"{module}: {source!r} passed"


def test_relative_imports_are_resolved():
    assert imports("from ..store import state", "appliance.supervisor.core") == {"appliance.store.state"}
    assert imports("from . import api", "appliance.faces.web", is_package=True) == {"appliance.faces.web.api"}
