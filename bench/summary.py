"""The summary table of bench/README.md, from the JSON lines the benchmarks printed.

    python bench/summary.py DIR [README]

DIR holds one `<bench>.jsonl` per benchmark (`make bench` writes them to build/bench/). A row
for every figure that has a target and every ratio: metric, this project's figure, the one it
is compared with (`of`, for a ratio), the ratio, the target, whether it was met, and the load
average beside it. The table goes between the README's summary markers, replacing what was
there; the rest of the README is left as it is. Without README the table is printed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- summary:start (bench/summary.py writes this table) -->", "<!-- summary:end -->"
HEADER = ("| bench | metric | this project | compared with | ratio | target | met | load |\n"
          "|---|---|---|---|---|---|---|---|")


def lines(directory: Path) -> list[dict]:
    """Every JSON line of every DIR/*.jsonl, in file order; other lines (a warning) skipped."""
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
            except ValueError:
                continue
            if isinstance(line, dict) and {"bench", "metric", "value"} <= line.keys():
                out.append(line)
    return out


def _figure(line: dict, key: str = "value") -> str:
    value = line.get(key)
    return "—" if value is None else f"{value} {line.get('unit', '')}".strip()


def _named(found: list[dict], bench: str, name: str) -> str:
    """A ratio's side ("syn_login" of "syn_login/xdp_filter_syn") as the bench's own figure of
    that name (ns_per_packet_syn_login), or the name alone."""
    matches = [line for line in found
               if line["bench"] == bench and line.get("unit") != "ratio"
               and "_minus_" not in line["metric"]
               and (line["metric"] == name or line["metric"].endswith("_" + name))]
    if not matches:
        return f"`{name}`"
    # the shortest: ns_per_packet_udp, not ns_per_packet_xdp_filter_udp
    return f"`{name}` {_figure(min(matches, key=lambda line: len(line['metric'])))}"


def row(line: dict, found: list[dict] | None = None) -> str | None:
    """The table row of a figure with a target, or of a ratio; None for the rest."""
    is_ratio = line.get("unit") == "ratio"
    if "target" not in line and not is_ratio:
        return None
    load = line.get("load1")
    top, _, bottom = str(line.get("of", "")).partition("/")
    side = (lambda name: _named(found or [], line["bench"], name)) if bottom else None
    cells = [line["bench"], f"`{line['metric']}`",
             side(top) if side else ("—" if is_ratio else _figure(line)),
             side(bottom) if side else "—",
             str(line["value"]) if is_ratio else "—",
             str(line.get("target", "—")),
             {True: "yes", False: "**no**"}.get(line.get("met"), "—"),
             "—" if load is None else str(load)]
    return "| " + " | ".join(cells) + " |"


def table(found: list[dict]) -> str:
    rows = [r for r in (row(line, found) for line in found) if r is not None]
    return "\n".join([HEADER, *rows]) if rows else "(no benchmark printed a target or a ratio)"


def write(readme: Path, text: str) -> None:
    """The table between the markers (added at the end if the README has none)."""
    old = readme.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(new)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if not directory.is_dir():
        print(f"summary: {directory} is not a directory of <bench>.jsonl files", file=sys.stderr)
        return 2
    text = table(lines(directory))
    if len(argv) == 3:
        write(Path(argv[2]), text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
