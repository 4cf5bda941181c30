"""``data_processing``'s summary on Polars against the pure-Python code it replaced.

Hypothesis writes CSV documents full of what a spreadsheet export holds and what breaks a
parser: padded numbers, ``1_000``, ``inf`` and ``nan``, other scripts' digits, empty and
blank cells, quoted commas, quotes and newlines, CRLF and bare CR line ends, blank lines,
ragged rows and stray quotes. The new summary must equal the old one: the same error
(naming the same line) or the same rows, columns, types, counts and distinct values, and
numbers within float tolerance. The one deliberate difference (a sum that overflows a
double) is in docs/JOBS.md and kept out of the numbers drawn here.

The suite draws 100 documents (about 2 s); ``CSV_EXAMPLES`` (an environment variable) runs
a longer profile: ``CSV_EXAMPLES=2000 python -m pytest tests/test_csv_summary.py``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atrium.tasks import PermanentJobError
from atrium.tasks._csv import summarise_csv
from tests import csv_reference

NAMES = st.text(st.sampled_from("abcxyz _1\u00a0"), min_size=0, max_size=4)
PADDING = st.sampled_from(["", " ", "  ", "\t", "\u00a0", "\x1c", "\u2003"])
NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12).map(repr),
    st.integers(-(10**9), 10**9).map(str),
    st.integers(0, 10**6).map(lambda n: f"{n:_}"),  # 1_000
    st.integers(0, 999).map(lambda n: f"{n:05d}"),  # 00042
    st.sampled_from(["1.", ".5", "+3", "-0", "1e3", "2E-2", "\u0661\u0662", "\uff13"]),
)
ODD_TEXT = st.sampled_from(
    ["inf", "-Infinity", "nan", "NaN", "1e999", "0x10", "1__0", "_1", "1,5", "", "  "]
)
WORDS = st.text(st.sampled_from('ab ,"\n\r\u00e9'), max_size=6)
CELL = st.tuples(PADDING, st.one_of(NUMBER_TEXT, ODD_TEXT, WORDS), PADDING).map("".join)
# Per column, the kind of cells it holds: mostly numbers, so numeric columns happen.
COLUMN = st.sampled_from(["num", "mixed"])
EXAMPLES = int(os.environ.get("CSV_EXAMPLES", "100"))


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, list[str] | None]:
    width = draw(st.integers(1, 5))
    header = draw(st.lists(NAMES, min_size=width, max_size=width))
    kinds = [draw(COLUMN) for _ in range(width)]
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 9)) == 0:
            rows.append([])  # a blank line
            continue
        row = []
        for kind in kinds:
            base = NUMBER_TEXT if kind == "num" and draw(st.booleans()) else CELL
            row.append(draw(st.tuples(PADDING, base, PADDING).map("".join)))
        if draw(st.integers(0, 19)) == 0:
            row = row[:-1] or ["x", "y"]  # ragged
        rows.append(row)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    writer.writerow(header)
    writer.writerows(rows)
    text = out.getvalue()
    if draw(st.integers(0, 9)) == 0:
        # Stray quotes, NULs and line ends where a writer would never put them.
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"', 'x"y', "\x00", "\r", "\n\n"])) + text[at:]
    columns = None
    if draw(st.booleans()):
        pool = [h.strip() for h in header] + ["nope"]
        columns = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))
    return text, columns


def outcome(summarise: Any, text: str, columns: list[str] | None) -> Any:
    try:
        return summarise(text, columns)
    except PermanentJobError as error:
        return ("error", str(error))


def assert_equivalent(new: Any, old: Any) -> None:
    if isinstance(old, tuple) or isinstance(new, tuple):
        assert new == old
        return
    assert (new["rows"], new["columns"]) == (old["rows"], old["columns"])
    assert new["stats"].keys() == old["stats"].keys()
    for name, expected in old["stats"].items():
        got = new["stats"][name]
        assert got.keys() == expected.keys(), name
        if expected["type"] == "text":
            assert got == expected, name
            assert list(got["values"]) == list(expected["values"]), name  # ties: first seen
            continue
        assert (got["type"], got["count"], got["min"], got["max"]) == (
            expected["type"],
            expected["count"],
            expected["min"],
            expected["max"],
        )
        scale = max(abs(expected["min"]), abs(expected["max"]), 1.0)
        for key in ("mean", "stddev"):
            assert math.isclose(got[key], expected[key], rel_tol=1e-9, abs_tol=1e-9 * scale), key


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_polars_summary_equals_the_pure_python_one(doc: tuple[str, list[str] | None]) -> None:
    text, columns = doc
    assert_equivalent(
        outcome(summarise_csv, text, columns), outcome(csv_reference.summarise_csv, text, columns)
    )


def test_examples_named_in_the_issue() -> None:
    text = 'n,label,big\n  7 ,"a, b",1_000\n007,"line\nbreak",inf\n,,\n\n1e2,"say ""hi""",2_000\n'
    new = summarise_csv(text, None)
    assert_equivalent(new, csv_reference.summarise_csv(text, None))
    assert new["rows"] == 4
    assert new["stats"]["n"] == {
        "type": "numeric",
        "count": 3,
        "mean": 38.0,
        "min": 7.0,
        "max": 100.0,
        "stddev": new["stats"]["n"]["stddev"],
    }
    assert new["stats"]["big"]["type"] == "text"  # inf is not a finite number
    assert new["stats"]["label"]["values"] == {"a, b": 1, "line\nbreak": 1, 'say "hi"': 1}
    for bad, line in (("a,b\n1,2\n3\n", 3), ('a,b\n"x\ny",2\n1,"2"3\n', 4)):
        message = outcome(summarise_csv, bad, None)[1]
        assert f"line {line}" in message
        assert message == outcome(csv_reference.summarise_csv, bad, None)[1]


def test_a_wide_columns_list_is_a_hash_lookup() -> None:
    names = [f"c{i}" for i in range(20_000)]
    text = ",".join(names) + "\n" + ",".join("1" for _ in names) + "\n"
    result = summarise_csv(text, list(reversed(names)))
    assert result["columns"][0] == "c19999" and len(result["stats"]) == 20_000
