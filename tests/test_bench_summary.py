"""bench/summary.py: the README's summary table from the benchmarks' JSON lines."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import summary  # noqa: E402

LINES = [
    {"bench": "dispatcher", "metric": "ns_per_packet_udp", "value": 65.0, "unit": "ns"},
    {"bench": "dispatcher", "metric": "ns_per_packet_xdp_filter_udp", "value": 44.0, "unit": "ns"},
    {"bench": "dispatcher", "metric": "ns_per_packet_udp_minus_bare", "value": 58.0, "unit": "ns"},
    {"bench": "dispatcher", "metric": "ratio_udp_over_xdp_filter", "value": 1.488, "unit": "ratio",
     "of": "udp/xdp_filter_udp", "load1": 0.58},
    {"bench": "apply", "metric": "apply_total_1000", "value": 0.56, "unit": "s",
     "target": "<= 0.5", "met": False, "load1": 1.4},
    {"bench": "apply", "metric": "per_device_ms", "value": 0.4, "unit": "ms"},     # no row
]


def write_lines(directory: Path) -> None:
    (directory / "bench_dispatcher.jsonl").write_text(
        "\n".join(json.dumps(x) for x in LINES[:4]) + "\nsetup: a warning, not JSON\n")
    (directory / "bench_apply.jsonl").write_text("\n".join(json.dumps(x) for x in LINES[4:]))


def test_a_row_per_ratio_and_target_with_both_sides_named(tmp_path):
    write_lines(tmp_path)
    text = summary.table(summary.lines(tmp_path))
    rows = text.splitlines()[2:]
    assert len(rows) == 2
    assert rows[0] == ("| apply | `apply_total_1000` | 0.56 s | — | — | <= 0.5 | **no** | 1.4 |")
    # the side is the bench's own figure of that name: udp, not xdp_filter_udp or udp_minus_bare
    assert rows[1] == ("| dispatcher | `ratio_udp_over_xdp_filter` | `udp` 65.0 ns | "
                       "`xdp_filter_udp` 44.0 ns | 1.488 | — | — | 0.58 |")


def test_the_readme_between_its_markers_is_replaced_and_the_rest_kept(tmp_path):
    write_lines(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nintro\n\n{summary.START}\nold table\n{summary.END}\n\n## rest\n")
    assert summary.main(["summary", str(tmp_path), str(readme)]) == 0
    once = readme.read_text()
    assert "old table" not in once and "`apply_total_1000`" in once
    assert once.startswith("# Benchmarks\n\nintro\n\n") and once.endswith("\n\n## rest\n")
    summary.main(["summary", str(tmp_path), str(readme)])
    assert readme.read_text() == once                 # the same lines: the same README


def test_a_missing_directory_is_named(tmp_path, capsys):
    assert summary.main(["summary", str(tmp_path / "nope")]) == 2
    assert "nope is not a directory" in capsys.readouterr().err


def test_percentiles_are_nearest_rank():
    """ceil(q/100 * n)-th smallest: the p99 of 100 samples is the 99th, not their maximum."""
    import common
    hundred = list(range(1, 101))
    assert common.percentile(hundred, 99) == 99
    assert common.percentile(hundred, 100) == 100
    assert common.percentile(list(range(1, 26)), 99) == 25
    assert common.percentile(list(range(1, 11)), 50) == 5
    assert common.percentile([7.0], 99) == 7.0
