"""The posture state machine (Ops.posture_graph) as inline SVG, drawn on the server: no script,
and no style attribute (the page's CSP forbids both), only presentation attributes and classes
that style.css colours from its variables, so the graph follows the page's light or dark theme.

The layout is fixed by the data: the postures on a row, least strict on the left. A rule that
can move a device out of every less strict posture comes from above: its lane has a tick down to
each of those postures and an arrow into the one it sets. A rule that starts from one posture
runs below the row, from that posture to the one it sets. Each edge has its own lane, so no
label covers another; the shortest lanes are nearest the row.
"""
from __future__ import annotations

import html

NODE_W, NODE_H = 112, 34
STEP = 168            # from one posture's centre to the next
MARGIN = 24
LANE = 22             # between two edges' lanes
RADIUS = 8            # of a lane's corners
OFFSET = 10           # an edge leaves a posture left of its centre and enters right of it
CHAR_W = 7.2          # a label's character at 12 px, to keep labels inside the picture


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _label(edge: dict, seconds_words) -> str:
    said = edge["rule"]
    if edge.get("for_seconds"):
        said += f" · {seconds_words(edge['for_seconds'])}"
    return said if edge.get("enabled", True) else f"{said} (off)"


def _lane_path(x1: float, x2: float, y_node: float, y_lane: float) -> str:
    """From (x1, y_node) to the lane at y_lane, along it, and to (x2, y_node), with rounded
    corners; the lane is above the row when y_lane < y_node."""
    up = -1 if y_lane < y_node else 1
    side = 1 if x2 >= x1 else -1
    r = min(RADIUS, abs(x2 - x1) / 2) if x1 != x2 else 0
    return (f"M{x1:g},{y_node:g} V{y_lane - up * r:g} Q{x1:g},{y_lane:g} {x1 + side * r:g},{y_lane:g} "
            f"H{x2 - side * r:g} Q{x2:g},{y_lane:g} {x2:g},{y_lane - up * r:g} V{y_node:g}")


def posture_graph_svg(graph: dict, seconds_words=str, title: str = "How the rules move postures") -> str:
    """`graph`: Ops.posture_graph()'s answer; `seconds_words` says a duration ("30 min")."""
    nodes: list[str] = graph["nodes"]
    x_of = {p: MARGIN + NODE_W / 2 + i * STEP for i, p in enumerate(nodes)}
    above = sorted((e for e in graph["edges"] if len(e["from_postures"]) > 1),
                   key=lambda e: (abs(x_of[e["to"]] - x_of[e["from_postures"][0]]), e["rule"]))
    below = sorted((e for e in graph["edges"] if len(e["from_postures"]) == 1),
                   key=lambda e: (abs(x_of[e["to"]] - x_of[e["from"]]), e["rule"]))
    width = MARGIN * 2 + NODE_W + STEP * max(len(nodes) - 1, 0)
    top = MARGIN + LANE * len(above)
    row_top, row_bottom = top + 12, top + 12 + NODE_H
    height = row_bottom + 12 + LANE * len(below) + MARGIN
    words = graph.get("words") or {}

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="posture-graph" viewBox="0 0 {width} {height}" '
           f'role="img" aria-labelledby="posture-graph-title" data-type="{_e(graph.get("type") or "")}">',
           f'<title id="posture-graph-title">{_e(title)}</title>',
           '<defs><marker id="pg-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
           'fill="currentColor"/></marker></defs>']

    def edge(e: dict, y_lane: float, y_node: float, sources: list[str]) -> None:
        x_to = x_of[e["to"]] + OFFSET
        x_from = x_of[sources[0]] - OFFSET
        cls = "pg-edge" + ("" if e.get("enabled", True) else " pg-off")
        out.append(f'<g class="{cls}" data-rule="{_e(e["rule"])}" data-from="{_e(e["from"])}" '
                   f'data-to="{_e(e["to"])}"><title>{_e(words.get(e["rule"], e["rule"]))}</title>')
        out.append(f'<path class="pg-line" d="{_lane_path(x_from, x_to, y_node, y_lane)}" fill="none" '
                   f'stroke="currentColor" stroke-width="1.5" marker-end="url(#pg-arrow)"/>')
        for p in sources[1:]:      # the other postures it moves a device out of
            x = x_of[p] - OFFSET
            out.append(f'<path class="pg-tick" d="M{x:g},{y_node:g} V{y_lane:g}" fill="none" '
                       f'stroke="currentColor" stroke-width="1.5"/>'
                       f'<circle class="pg-join" cx="{x:g}" cy="{y_lane:g}" r="2.5" fill="currentColor"/>')
        label = _label(e, seconds_words)
        left, right = min(x_from, x_to), max(x_from, x_to)
        if left + RADIUS + 4 + len(label) * CHAR_W <= width:
            x, anchor = left + RADIUS + 4, "start"
        else:
            x, anchor = right - RADIUS - 4, "end"
        out.append(f'<text class="pg-label" x="{x:g}" y="{y_lane - 4:g}" text-anchor="{anchor}" '
                   f'fill="currentColor">{_e(label)}</text></g>')

    for i, e in enumerate(above):
        edge(e, top - i * LANE, row_top, e["from_postures"])
    for i, e in enumerate(below):
        edge(e, row_bottom + 12 + (i + 1) * LANE - 6, row_bottom, e["from_postures"])
    for p in nodes:
        x = x_of[p] - NODE_W / 2
        out.append(f'<g class="pg-node pg-{_e(p)}" data-posture="{_e(p)}">'
                   f'<rect x="{x:g}" y="{row_top:g}" width="{NODE_W}" height="{NODE_H}" '
                   f'rx="{NODE_H / 2:g}"/><text x="{x_of[p]:g}" y="{row_top + NODE_H / 2 + 5:g}" '
                   f'text-anchor="middle">{_e(p)}</text></g>')
    out.append("</svg>")
    return "".join(out)
