"""The documentation against the code and itself: the LED table in docs/leds.md is the panel's
own (appliance.faces.panel.PATTERNS), the README stays short and opens with the two commands,
and every relative link in README.md and docs/ leads to a file that exists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.faces.panel import readme_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LEDS = ROOT / "docs" / "leds.md"
BEGIN, END = "<!-- leds:begin -->", "<!-- leds:end -->"
REGENERATE = ('.venv/bin/python -c "from appliance.faces.panel import readme_table; '
              'print(readme_table())"')

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The targets of inline Markdown links, outside code, that point into the repository."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue   # http(s), mailto and the like; an anchor in the same file
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_led_table_is_the_panels_own():
    text = LEDS.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, \
        f"{LEDS.name}: needs one {BEGIN!r} line and one {END!r} line around the LED table"
    between = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert between == readme_table().strip(), (
        f"docs/leds.md's LED table differs from appliance/faces/panel.py's PATTERNS: replace the "
        f"lines between {BEGIN} and {END} with the output of\n  {REGENERATE}")


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 160, (f"README.md has {len(lines)} lines (at most 160): move the detail "
                               "to a file under docs/ and link to it")
    first = FENCE.search(text)
    assert first, "README.md has no ``` code block; the first one gives the two commands"
    assert "make demo" in first.group() and "make test" in first.group(), \
        f"README.md's first code block must give `make demo` and `make test`, got:\n{first.group()}"


def test_the_link_finder_skips_code_urls_and_anchors():
    text = ("[a](docs/a.md) [b](https://example.org/x.md) [c](#here) `[d](nowhere.md)`\n"
            "```\n[e](nowhere.md)\n```\n[f](../x.py#L3) [g](docs/g.md \"title\")")
    assert relative_links(text) == ["docs/a.md", "../x.py", "docs/g.md"]


@pytest.mark.parametrize("document", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file(document: Path):
    missing = [target for target in relative_links(document.read_text())
               if not (document.parent / target).exists()]
    assert not missing, f"{document.relative_to(ROOT)} links to what does not exist: {missing}"
