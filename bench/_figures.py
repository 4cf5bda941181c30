"""The figures a benchmark hands to ``bench/sidebyside.py``: one shape for every script.

A script given ``--json PATH`` writes, beside its usual printed output::

    {"script": "bench/http.py", "argv": [...], "figures": [
        {"what": "GET /api/v1/auth/me, caches off: server CPU a request",
         "unit": "µs", "better": "lower",
         "atrium": [{"label": "", "value": 353.2}],
         "beside": [{"label": "FastAPI + uvicorn", "value": 263.0}],
         "target": "at most 1.3x the peer"}, ...]}

Each figure is one comparison: atrium's value(s) and the values beside it (a peer, a
floor), in one unit. ``bench/sidebyside.py`` turns it into a row of the table that opens
docs/BENCHMARKS.md: the first atrium value over each value beside it is the ratio. A new
benchmark joins the side-by-side table by writing this shape and adding one entry to
``BENCHMARKS`` in bench/sidebyside.py; nothing else there is specific to a script.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson


@dataclass(frozen=True, slots=True)
class Value:
    """One measured value; ``label`` says which (a transport, a server), "" when alone."""

    label: str
    value: float


@dataclass(frozen=True, slots=True)
class Figure:
    """atrium's value(s) beside a peer's or a floor's, in one ``unit``.

    ``better`` is "lower" (a cost: CPU a request, memory, latency) or "higher" (a rate).
    ``target`` is the goal in words, as the script checks it ("" for none).
    """

    what: str
    unit: str
    atrium: list[Value]
    beside: list[Value] = field(default_factory=list)
    better: str = "lower"
    target: str = ""


def write_figures(path: str | Path, figures: Sequence[Figure]) -> None:
    """Write ``figures`` as JSON to ``path``, with the command line that measured them.

    A value that was not measured (NaN, as a run with no request gives) is written as
    null (orjson's rendering of NaN), which the table shows as "n/a".
    """
    document = {
        "script": Path(sys.argv[0]).as_posix(),
        "argv": sys.argv[1:],
        "figures": [asdict(figure) for figure in figures],
    }
    Path(path).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
