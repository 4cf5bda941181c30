"""bench/sidebyside.py's table, from canned figures: no server runs here.

What a reader of docs/BENCHMARKS.md relies on: each value is the median of the rounds
with its range, each ratio is atrium's first value over the value beside it, taken within
a round; a regeneration replaces only the rows of the benchmarks that ran, inside the
markers, and leaves every hand-written line alone; a benchmark that is not there yet is
reported as skipped, not as a failure.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench import sidebyside
from bench._figures import Figure, Value, write_figures


def http_round(atrium_me: float, peer_me: float, rate: float) -> dict[str, Any]:
    """What bench/http.py --json writes, cut to two figures."""
    return {
        "script": "bench/http.py",
        "argv": ["--duration", "5", "--json", "/tmp/x.json"],
        "figures": [
            {
                "what": "`GET /api/v1/auth/me`, caches off: server CPU a request",
                "unit": "µs",
                "better": "lower",
                "atrium": [{"label": "", "value": atrium_me}],
                "beside": [{"label": "FastAPI + uvicorn", "value": peer_me}],
                "target": "at most 1.3x the peer",
            },
            {
                "what": "`GET /api/v1/auth/me`, default caches: requests/s",
                "unit": "req/s",
                "better": "higher",
                "atrium": [{"label": "", "value": rate}],
                "beside": [{"label": "bare ASGI app", "value": None}],
                "target": "",
            },
        ],
    }


def fanout_round(listener: float, main: float, peer: float) -> dict[str, Any]:
    return {
        "script": "bench/ws_fanout.py",
        "argv": [],
        "figures": [
            {
                "what": "WebSocket fan-out, 1 sender to 100 receivers: server CPU a delivery",
                "unit": "µs",
                "better": "lower",
                "atrium": [
                    {"label": "`WS_PORT` listener", "value": listener},
                    {"label": "main port", "value": main},
                ],
                "beside": [{"label": "python-socketio (uvicorn, wsproto)", "value": peer}],
                "target": "",
            }
        ],
    }


def test_values_are_medians_of_the_rounds_and_ratios_are_taken_within_each_round() -> None:
    rounds = [http_round(900, 720, 2600), http_round(1000, 500, 2400), http_round(880, 800, 2700)]

    me, rate = sidebyside.figure_rows(rounds, "bench/http.py --duration 5", "2026-12-07")

    cells = [cell.strip() for cell in me.strip("|").split(" | ")]
    assert cells[0] == "`GET /api/v1/auth/me`, caches off: server CPU a request"
    assert cells[1] == "900 µs (880-1,000)"
    # Per round 1.25x, 2.00x, 1.10x: the median of those, not 900 / 720.
    assert cells[2] == (
        "FastAPI + uvicorn: 720 µs (500-800) (atrium 1.25x (1.10-2.00), behind);"
        " target: at most 1.3x the peer"
    )
    assert cells[3] == "`python bench/http.py --duration 5`"
    assert cells[4] == "2026-12-07"
    # A value the run could not measure reads n/a, with no ratio made up from it.
    assert "bare ASGI app: n/a |" in rate
    assert "2,600 req/s (2,400-2,700)" in rate
    # A rate is better higher: above 1x is ahead.
    faster = http_round(900, 720, 2600)["figures"][1]
    faster["beside"] = [{"label": "FastAPI", "value": 1300}]
    (row,) = sidebyside.figure_rows([{"figures": [faster]}], "bench/http.py", "r")
    assert "FastAPI: 1,300 req/s (atrium 2.00x, ahead)" in row


def test_one_round_gives_plain_values_and_every_atrium_label() -> None:
    (row,) = sidebyside.figure_rows([fanout_round(8.6, 21.3, 36.0)], "bench/ws_fanout.py", "r")

    assert "| `WS_PORT` listener 8.60 µs; main port 21.3 µs |" in row
    assert "python-socketio (uvicorn, wsproto): 36.0 µs (atrium 0.24x, ahead) |" in row


def test_a_missing_benchmark_is_skipped_and_says_why(tmp_path: Path) -> None:
    (connections,) = [b for b in sidebyside.BENCHMARKS if b.group == "connections"]
    assert connections.default  # runs by default once bench/connections.py lands

    problem = sidebyside.missing(connections, repo=tmp_path)
    outcome = sidebyside.Outcome(connections, "bench/connections.py", [], problem)

    assert problem == "skipped: bench/connections.py not present"
    (row,) = sidebyside.outcome_rows(outcome, "run")
    assert "skipped: bench/connections.py not present" in row
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "connections.py").write_text("")
    assert sidebyside.missing(connections, repo=tmp_path) == ""


DOC = """# Benchmarks

## Today's figures

Hand-written introduction.

<!-- sidebyside:begin -->
Old header.

| what | atrium | beside it (atrium's first value over it) | command | run |
|---|---|---|---|---|
| old http | 1 µs | 2 µs | `python bench/http.py --duration 5` | 2026-12-01 |
| old fan-out | 3 µs | 4 µs | `python bench/ws_fanout.py --scenario a` | 2026-12-01 |
| old documents | 5 ms | 6 ms | `python bench/documents.py --parts a` | 2026-12-01 |
<!-- sidebyside:end -->

| what | atrium | beside it | command | run |
|---|---|---|---|---|
| hand-written | 1 | 2 | `python bench/jobs.py` | 2026-12-07 |
"""


def test_regeneration_replaces_only_the_rows_of_what_ran() -> None:
    order = [b.script for b in sidebyside.BENCHMARKS]
    fresh = {"bench/ws_fanout.py": ["| new fan-out | `python bench/ws_fanout.py` |"]}

    text = sidebyside.regenerate(DOC, "New header.", fresh, order)

    before, rest = text.split("<!-- sidebyside:begin -->")
    block, after = rest.split("<!-- sidebyside:end -->")
    assert before == DOC.partition("<!-- sidebyside:begin -->")[0]
    assert after == DOC.partition("<!-- sidebyside:end -->")[2]
    assert "Old header." not in block and "New header." in block
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    # The table's header, then the kept and new rows in the order of BENCHMARKS.
    assert rows[1:] == [
        "| old http | 1 µs | 2 µs | `python bench/http.py --duration 5` | 2026-12-01 |",
        "| new fan-out | `python bench/ws_fanout.py` |",
        "| old documents | 5 ms | 6 ms | `python bench/documents.py --parts a` | 2026-12-01 |",
    ]
    # Again with the same rows: nothing moves.
    assert sidebyside.regenerate(text, "New header.", fresh, order) == text


def test_a_file_without_the_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="sidebyside:begin"):
        sidebyside.regenerate("# Benchmarks\n", "header", {}, [])


def test_a_scripts_figures_make_the_table_and_the_benchmarks_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """From what a script writes with --json to the file: ``--from`` a kept directory."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for round_, cost in enumerate((8.0, 10.0, math.nan), start=1):
        argv = ["bench/ws_fanout.py", "--scenario", "a", "--json", str(kept / "x.json")]
        monkeypatch.setattr(sys, "argv", argv)
        figure = Figure(
            "fan-out: server CPU a delivery",
            "µs",
            [Value("`WS_PORT` listener", cost)],
            [Value("python-socketio", 36.0)],
        )
        write_figures(kept / f"fanout-{round_}.json", [figure])
    run = sidebyside.Run(
        "2026-12-07 09:40 UTC", "abc1234", "a CPU, 2 cores", (1.5, 4.0, 2.2), False, ()
    )
    (kept / "run.json").write_bytes(orjson.dumps(run))
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(DOC)

    status = sidebyside.main(
        [
            "--groups",
            "fanout,connections",
            "--from",
            str(kept),
            "--write-benchmarks",
            str(benchmarks),
        ]
    )

    assert status == 0
    assert orjson.loads((kept / "fanout-3.json").read_bytes())["figures"][0]["atrium"][0] == {
        "label": "`WS_PORT` listener",
        "value": None,
    }
    printed = capsys.readouterr().out
    # The round that measured nothing counts for neither the value nor the ratio.
    row = (
        "| fan-out: server CPU a delivery | `WS_PORT` listener 9.00 µs (8.00-10.0) |"
        " python-socketio: 36.0 µs (atrium 0.25x (0.22-0.28), ahead) |"
        " `python bench/ws_fanout.py --scenario a` | 2026-12-07, `abc1234`, load 1.5-4.0,"
        " median of 3 runs |"
    )
    assert row in printed
    assert "| connections | skipped: no connections-*.json in" in printed
    text = benchmarks.read_text()
    assert row in text
    assert "commit `abc1234`, a CPU, 2 cores, load average 1.5-4.0 before each script" in text
    assert "old fan-out" not in text and "old http" in text
    assert "skipped" not in text  # a benchmark that did not run leaves the file as it was


def test_quick_options_take_the_place_of_the_full_runs() -> None:
    (http,) = [b for b in sidebyside.BENCHMARKS if b.group == "http"]

    full = ["--duration", "5", "--peer-ws", "a", "b"]
    assert sidebyside.merge_options(full, ["--duration", "1"]) == [
        "--duration", "1", "--peer-ws", "a", "b"
    ]  # fmt: skip
    assert sidebyside.merge_options(["--scenario", "a"], ["--warmup", "0.5"]) == [
        "--scenario", "a", "--warmup", "0.5"
    ]  # fmt: skip
    command = sidebyside.command_of(http, quick=True)
    assert command[0] == "bench/http.py"
    assert command.count("--duration") == 1
    assert command[command.index("--duration") + 1] == "1"


def test_a_small_ratio_keeps_its_digits() -> None:
    (row,) = sidebyside.figure_rows([fanout_round(8.0, 3144.0, 2865.0)], "bench/ws_fanout.py", "r")

    assert "python-socketio (uvicorn, wsproto): 2,865 µs (atrium 0.003x, ahead) |" in row
