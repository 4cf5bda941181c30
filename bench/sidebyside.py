"""The side-by-side set in one command: atrium beside its peers, one table.

    python bench/sidebyside.py [--groups http,fanout,connections,documents] [--quick]
                               [--rounds 1] [--keep DIR] [--from DIR]
                               [--write-benchmarks [PATH]]

Runs each benchmark of ``BENCHMARKS`` in the chosen groups (default: every group but
``documents``) as its own process with ``--json``, its usual output going to stderr, and
prints one Markdown table of what they wrote (bench/_figures.py) to stdout: what was
measured, atrium's value(s), the peer's or floor's beside it with atrium's value over
theirs, the command and the run (date, commit, load average). With ``--rounds N`` every
benchmark runs N times, interleaved (all groups, then all again), and the table gives the
median of each value and of each ratio, the range in brackets: ratios taken within one
round are what hold up on a shared machine.

``--write-benchmarks`` regenerates the block between ``<!-- sidebyside:begin -->`` and
``<!-- sidebyside:end -->`` that opens "Today's figures" in docs/BENCHMARKS.md: the rows of
the benchmarks that ran are replaced, those of the others kept, the rest of the file left
alone. ``--quick`` runs each benchmark for a second or so (a smoke test; its figures say
"--quick" in their run column). ``--keep DIR`` keeps the JSON of each run there;
``--from DIR`` makes the table from such a directory without running anything.

A benchmark joins by writing the figures of bench/_figures.py with ``--json PATH`` and
adding one entry to ``BENCHMARKS``; one whose script or prerequisite is missing is
reported as skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script: the repository root first on sys.path, not bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import orjson  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- sidebyside:begin -->"
END = "<!-- sidebyside:end -->"
HEADER = "| what | atrium | beside it (atrium's first value over it) | command | run |"
QUICK = ("--duration", "1", "--warmup", "0.5")
# uvicorn's websockets-sansio protocol needs the websockets package (not in the bench extra).
PEER_WS = (
    ("wsproto", "websockets-sansio") if importlib.util.find_spec("websockets") else ("wsproto",)
)


@dataclass(frozen=True, slots=True)
class Benchmark:
    """One script of the set: how it runs in full and with ``--quick``, what it needs.

    ``quick``'s options replace those of ``argv`` with the same name, or join them.
    ``needs``: (path from the repository root, how to get it) that must exist first.
    """

    group: str
    script: str
    argv: tuple[str, ...] = ()
    quick: tuple[str, ...] = QUICK
    default: bool = True
    needs: tuple[tuple[str, str], ...] = ()


BENCHMARKS = (
    Benchmark(
        "http",
        "bench/http.py",
        ("--duration", "5", "--stampede-duration", "0"),
        (*QUICK, "--projects", "5"),
    ),
    Benchmark(
        "fanout",
        "bench/ws_fanout.py",
        ("--scenario", "a", "--peer", "socketio", "--peer-ws", *PEER_WS),
    ),
    # Both modes at their defaults (19,000 pinned, 50,000 on --workers 3): ~10 min.
    Benchmark(
        "connections",
        "bench/connections.py",
        (),
        (
            *("--mode", "single", "--connections", "2000", "--projects", "100"),
            *("--idle", "2", "--fanout", "2", "--baseline", "1"),
        ),
    ),
    Benchmark(
        "documents",
        "bench/documents.py",
        ("--servers", "atrium-ws,hocuspocus,pycrdt", "--parts", "a,b", "--rates", "100,1000"),
        ("--duration", "2", "--rates", "100", "--docs", "3", "--clients", "10"),
        default=False,
        needs=(("bench/node/node_modules", "npm ci --prefix bench/node"),),
    ),
)


# -- running -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one benchmark gave over the rounds: figure documents, or why there are none."""

    benchmark: Benchmark
    command: str
    documents: list[dict[str, Any]]
    problem: str = ""  # "skipped: ..." or "failed: ..."
    missed: bool = False  # the script reported a missed target (exit status 1)


def command_of(benchmark: Benchmark, quick: bool) -> list[str]:
    """The script and its arguments, as run (without ``--json``)."""
    if not quick:
        return [benchmark.script, *benchmark.argv]
    return [benchmark.script, *merge_options(benchmark.argv, benchmark.quick)]


def merge_options(argv: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``argv`` with each option of ``extra`` (a ``--name`` and the values after it) in
    place of the option of that name, or appended when ``argv`` has none."""

    def options(tokens: Sequence[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for token in tokens:
            if token.startswith("--") or not grouped:
                grouped[token] = []
            else:
                grouped[list(grouped)[-1]].append(token)
        return grouped

    merged = options(argv) | options(extra)
    return [token for name, values in merged.items() for token in (name, *values)]


def missing(benchmark: Benchmark, repo: Path = REPO) -> str:
    """Why ``benchmark`` cannot run here ("" when it can)."""
    if not (repo / benchmark.script).exists():
        return f"skipped: {benchmark.script} not present"
    for path, how in benchmark.needs:
        if not (repo / path).exists():
            return f"skipped: {path} not present ({how})"
    return ""


def run_rounds(
    benchmarks: Sequence[Benchmark], rounds: int, quick: bool, out: Path, loads: list[float]
) -> list[Outcome]:
    """Run every benchmark ``rounds`` times, interleaved; their JSON goes into ``out``.

    The 1-minute load average before each run is appended to ``loads``.
    """
    documents: dict[str, list[dict[str, Any]]] = {b.group: [] for b in benchmarks}
    problems = {b.group: missing(b) for b in benchmarks}
    missed = dict.fromkeys(problems, False)
    for round_ in range(1, rounds + 1):
        for benchmark in benchmarks:
            if problems[benchmark.group]:
                continue
            path = out / f"{benchmark.group}-{round_}.json"
            argv = [sys.executable, *command_of(benchmark, quick), "--json", str(path)]
            note(f"== {benchmark.group}, round {round_}/{rounds}: {' '.join(argv[1:])}")
            started = time.monotonic()
            loads.append(os.getloadavg()[0])
            status = subprocess.run(argv, cwd=REPO, stdout=sys.stderr, check=False).returncode
            note(f"== {benchmark.group}: exit {status} after {time.monotonic() - started:.0f} s")
            if status in (0, 1) and path.exists():
                documents[benchmark.group].append(orjson.loads(path.read_bytes()))
                missed[benchmark.group] |= status == 1
            else:
                problems[benchmark.group] = (
                    f"failed: exit {status} in round {round_} (its output is on stderr)"
                )
    return [
        Outcome(
            b,
            " ".join(command_of(b, quick)),
            documents[b.group] if not problems[b.group] else [],
            problems[b.group],
            missed[b.group],
        )
        for b in benchmarks
    ]


def read_rounds(benchmarks: Sequence[Benchmark], directory: Path, quick: bool) -> list[Outcome]:
    """The outcomes kept in ``directory`` by an earlier ``--keep`` (``<group>-<round>.json``)."""
    outcomes = []
    for benchmark in benchmarks:
        paths = sorted(directory.glob(f"{benchmark.group}-*.json"))
        documents = [orjson.loads(path.read_bytes()) for path in paths]
        problem = "" if documents else f"skipped: no {benchmark.group}-*.json in {directory}"
        command = " ".join(command_of(benchmark, quick))
        if documents:  # the command that ran, as the script recorded it
            argv = list(documents[0].get("argv", []))
            if "--json" in argv:
                del argv[argv.index("--json") : argv.index("--json") + 2]
            command = " ".join([benchmark.script, *argv])
        outcomes.append(Outcome(benchmark, command, documents, problem))
    return outcomes


def note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the table ---------------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    """``value`` to three significant figures or so, with thousands separators and its unit."""
    if value is None:
        return "n/a"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2
    return f"{value:,.{digits}f} {unit}"


def _spread(values: Sequence[float], unit: str) -> str:
    """The median of ``values`` and, when they differ, their range in brackets."""
    if not values:
        return "n/a"
    text = format_value(statistics.median(values), unit)
    low, high = (format_value(v, "").strip() for v in (min(values), max(values)))
    return text + (f" ({low}-{high})" if low != high else "")


def _measured(rounds: Sequence[Mapping[str, Any]], side: str, position: int) -> list[float]:
    """The value at ``position`` of ``side`` ("atrium" or "beside") in each round measured."""
    values = (f[side][position]["value"] if len(f[side]) > position else None for f in rounds)
    return [value for value in values if value is not None]


def _ratios(rounds: Sequence[Mapping[str, Any]], position: int) -> list[float]:
    """atrium's first value over the value beside it at ``position``, within each round."""
    ratios = []
    for figure in rounds:
        ours = figure["atrium"][0]["value"] if figure["atrium"] else None
        theirs = figure["beside"][position]["value"] if len(figure["beside"]) > position else None
        if ours is not None and theirs:
            ratios.append(ours / theirs)
    return ratios


def _ratio(ratios: Sequence[float], better: str) -> str:
    """The median ratio, the range when they differ (two decimals, three below 0.1), and
    whether that median puts atrium ahead or behind (``better``: "lower" or "higher")."""

    def number(ratio: float) -> str:
        return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3f}"

    median = statistics.median(ratios)
    low, middle, high = (number(r) for r in (min(ratios), median, max(ratios)))
    text = f"{middle}x" + (f" ({low}-{high})" if low != high else "")
    if median != 1:
        text += ", ahead" if (median < 1) == (better == "lower") else ", behind"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def figure_rows(documents: Sequence[Mapping[str, Any]], command: str, run: str) -> list[str]:
    """The table rows of one benchmark's rounds: one row per figure of the first round.

    A value is the median over the rounds (range in brackets); a ratio is atrium's first
    value over the value beside it, taken within each round, then the median of those
    (range in brackets), "ahead" or "behind" by the figure's ``better``.
    """
    rows = []
    for index, figure in enumerate(documents[0]["figures"]):
        rounds = [
            doc["figures"][index]
            for doc in documents
            if len(doc["figures"]) > index and doc["figures"][index]["what"] == figure["what"]
        ]
        unit = figure["unit"]
        ours = [
            f"{value['label']} {_spread(_measured(rounds, 'atrium', i), unit)}".strip()
            for i, value in enumerate(figure["atrium"])
        ]
        theirs = []
        for i, value in enumerate(figure["beside"]):
            text = f"{value['label']}: {_spread(_measured(rounds, 'beside', i), unit)}"
            ratios = _ratios(rounds, i)
            if ratios:
                text += f" (atrium {_ratio(ratios, figure.get('better', 'lower'))})"
            theirs.append(text)
        if figure.get("target"):
            theirs.append(f"target: {figure['target']}")
        cells = [figure["what"], "; ".join(ours), "; ".join(theirs), f"`python {command}`", run]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def outcome_rows(outcome: Outcome, run: str) -> list[str]:
    """The rows of one outcome; a skipped or failed benchmark gets one row saying so."""
    if outcome.problem:
        script = outcome.benchmark.script
        return [f"| {outcome.benchmark.group} | {_cell(outcome.problem)} | | `python {script}` | |"]
    rounds = len(outcome.documents)
    if rounds > 1:
        run += f", median of {rounds} runs"
    return figure_rows(outcome.documents, outcome.command, run)


# -- docs/BENCHMARKS.md ------------------------------------------------------------------


_SCRIPT = re.compile(r"`python (bench/[\w./-]+\.py)")


def script_of(row: str) -> str | None:
    """The benchmark script a generated row came from (its command column)."""
    match = _SCRIPT.search(row)
    return match.group(1) if match else None


def regenerate(text: str, header: str, rows: Mapping[str, list[str]], order: Iterable[str]) -> str:
    """``text`` with its generated block made of ``header`` and the rows it owns.

    ``rows`` maps a script to its new rows; the block's current rows of other scripts stay,
    and every row is placed in ``order`` of scripts (unknown scripts last). Everything
    outside the markers is returned unchanged. Raises ValueError without both markers.
    """
    try:
        start = text.index(BEGIN) + len(BEGIN)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"no {BEGIN} ... {END} block in the file") from None
    kept: dict[str, list[str]] = {}
    for line in text[start:end].splitlines():
        script = script_of(line)
        if line.startswith("| ") and script and script not in rows:
            kept.setdefault(script, []).append(line)
    merged = {**kept, **rows}
    ordered = [s for s in order if s in merged] + [s for s in merged if s not in order]
    table = [HEADER, "|---|---|---|---|---|", *(row for s in ordered for row in merged[s])]
    block = "\n".join(["", header, "", *table, ""])
    return text[:start] + block + text[end:]


# -- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) or the platform's, and the core count."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or 'unknown CPU'}, {os.cpu_count()} cores"


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, check=False)
    return out.stdout.strip() + ("+changes" if dirty.returncode else "") or "unknown"


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    groups = [b.group for b in BENCHMARKS]
    parser = argparse.ArgumentParser(
        prog="bench/sidebyside.py", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--groups",
        type=lambda s: s.split(","),
        default=[b.group for b in BENCHMARKS if b.default],
        help=f"comma-separated, of {', '.join(groups)} (default: all but documents)",
    )
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of each (median)")
    parser.add_argument("--keep", type=Path, help="keep each run's JSON in this directory")
    parser.add_argument("--from", dest="source", type=Path, help="table from kept JSON, no run")
    parser.add_argument(
        "--write-benchmarks",
        nargs="?",
        const=REPO / "docs" / "BENCHMARKS.md",
        type=Path,
        metavar="PATH",
        help="regenerate the generated block of docs/BENCHMARKS.md (or PATH)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.groups) - set(groups)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))}; known: {', '.join(groups)}")
    return args


@dataclass(frozen=True, slots=True)
class Run:
    """When and where the figures were measured: the run column and the block's header."""

    started: str  # "2026-12-07 09:40 UTC"
    commit: str
    machine: str
    loads: tuple[float, ...]  # 1-minute load average before each script and at the end
    quick: bool
    groups: tuple[str, ...]

    def cell(self) -> str:
        text = f"{self.started[:10]}, `{self.commit}`, load {self._loads()}"
        return text + (", --quick" if self.quick else "")

    def header(self) -> str:
        return (
            f"Side by side, generated by `python bench/sidebyside.py` (last: {self.started},"
            f" commit `{self.commit}`, {self.machine}, load average {self._loads()} before"
            f" each script and at the end; groups {', '.join(self.groups)}"
            f"{', --quick' if self.quick else ''}). Rerun it to regenerate these rows; a ratio"
            " is atrium's first value over the value beside it."
        )

    def _loads(self) -> str:
        low, high = min(self.loads), max(self.loads)
        return f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}-{high:.1f}"


def main(argv: list[str]) -> int:
    """Run (or read) the chosen groups, print the table, write BENCHMARKS when asked.

    Exit status 1 when a benchmark failed (a skipped one or a missed target is not).
    """
    args = parse_args(argv)
    chosen = [b for b in BENCHMARKS if b.group in args.groups]
    if args.source:
        kept = args.source / "run.json"
        if not kept.exists():
            raise SystemExit(f"no {kept}: --from reads a directory --keep wrote")
        outcomes = read_rounds(chosen, args.source, args.quick)
        recorded = orjson.loads(kept.read_bytes())
        run = Run(
            **{**recorded, "loads": tuple(recorded["loads"]), "groups": tuple(recorded["groups"])}
        )
    else:
        out = args.keep or Path(tempfile.mkdtemp(prefix="atrium-sidebyside-"))
        out.mkdir(parents=True, exist_ok=True)
        if "fanout" in args.groups and "websockets-sansio" not in PEER_WS:
            note("websockets is not installed: the fan-out peer runs on uvicorn's wsproto only")
        revision = commit()  # what runs, before a file is edited meanwhile
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        loads: list[float] = []
        outcomes = run_rounds(chosen, args.rounds, args.quick, out, loads)
        loads.append(os.getloadavg()[0])
        groups = tuple(b.group for b in chosen)
        run = Run(started, revision, cpu_model(), tuple(loads), args.quick, groups)
        (out / "run.json").write_bytes(orjson.dumps(run))
    print(run.header() + "\n")
    print(HEADER)
    print("|---|---|---|---|---|")
    for outcome in outcomes:
        for row in outcome_rows(outcome, run.cell()):
            print(row)
    for outcome in outcomes:
        if outcome.missed:
            print(f"\n{outcome.benchmark.script} missed a target of its own (its summary: stderr)")
    if args.write_benchmarks:
        fresh = {o.benchmark.script: outcome_rows(o, run.cell()) for o in outcomes if not o.problem}
        path = args.write_benchmarks
        order = [b.script for b in BENCHMARKS]
        path.write_text(regenerate(path.read_text(), run.header(), fresh, order))
        note(f"wrote the rows of {', '.join(fresh) or 'no benchmark'} into {path}")
    return 1 if any(o.problem.startswith("failed") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
