"""Hypothesis strategies for job submissions: a payload strategy per built-in task, with
valid and hostile values mixed (NUL characters, dates at the edges of the calendar and of
UTC, malformed CSV), for the fuzz tests (tests/test_fuzz.py) and the contract run
(tests/test_contract.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hypothesis import strategies as st

TEXT = st.one_of(
    st.text(max_size=30),
    st.tuples(st.text(max_size=10), st.text(max_size=10)).map("\x00".join),
    st.sampled_from(["", "\x00", "a", "1_000", " 7 ", "inf", "-0", '"', "\r\n", "\ud7ff\ue000"]),
)
CELL = st.one_of(
    TEXT,
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers().map(str),
    st.text(max_size=8).map(lambda s: f'"{s}\n{s}"'),  # a quoted newline
)


@st.composite
def csv_text(draw: st.DrawFn) -> str:
    """A CSV document: a header and rows of cells, now and then ragged, with NUL or a
    stray quote."""
    width = draw(st.integers(min_value=1, max_value=5))
    header = draw(st.lists(TEXT, min_size=width, max_size=width))
    rows = draw(
        st.lists(st.lists(CELL, min_size=width - 1, max_size=width + 1), min_size=0, max_size=6)
    )
    return "\n".join(",".join(row) for row in [header, *rows])


# Offsets up to the widest real ones (+14:00, -12:00) and past them; no zone at all.
OFFSETS = st.sampled_from(["Z", "+00:00", "+14:00", "-14:00", "+05:30", "-23:59", ""])
EDGES = st.sampled_from(
    [datetime(1, 1, 1), datetime(1, 1, 1, 13, 59), datetime(9999, 12, 31, 23, 59, 59)]
)
DATE = st.one_of(
    st.tuples(st.one_of(EDGES, st.datetimes()), OFFSETS).map(lambda d: d[0].isoformat() + d[1]),
    TEXT,
    st.integers(),
)

PAYLOADS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "data_processing": st.fixed_dictionaries(
        {"csv": st.one_of(csv_text(), TEXT)},
        optional={"columns": st.one_of(st.lists(TEXT, max_size=4), TEXT)},
    ),
    "project_export": st.fixed_dictionaries(
        {},
        optional={
            "include_events": st.one_of(st.booleans(), TEXT),
            "include_documents": st.one_of(st.booleans(), TEXT),
        },
    ),
    "project_activity_report": st.fixed_dictionaries({}, optional={"since": DATE, "until": DATE}),
}
"""For each built-in task, payloads its schema accepts and payloads it must refuse."""


HOSTILE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "task_name": TEXT,
    "project_id": st.one_of(st.sampled_from([None, "not-a-uuid"]), st.uuids().map(str)),
    "priority": st.sampled_from(["high", "urgent", 2]),
    "idempotency_key": TEXT,
    "timeout": st.sampled_from([0, -1, 1e9, "30"]),
    "max_retries": st.sampled_from([-1, 21, 2.5]),
}
"""Values of the body's other fields, mostly refused (``high`` only for an owner)."""


def job_bodies(project_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """``POST /api/v1/jobs/run`` bodies: a task with a payload of its own strategy, tied to
    ``project_id``, the other fields valid; now and then one of them hostile. Timeouts
    stay long enough that no valid job times out."""

    def body(task: str) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries(
            {
                "task_name": st.just(task),
                "payload": PAYLOADS[task],
                "project_id": st.just(project_id),
            },
            optional={
                "priority": st.sampled_from(["normal", "low"]),
                "idempotency_key": st.uuids().map(str),
                "timeout": st.just(30),
                "max_retries": st.sampled_from([0, 3]),
            },
        )

    def spoil(valid: dict[str, Any], field: tuple[str, Any] | None) -> dict[str, Any]:
        return valid if field is None else {**valid, field[0]: field[1]}

    hostile = st.sampled_from(sorted(HOSTILE_FIELDS)).flatmap(
        lambda name: HOSTILE_FIELDS[name].map(lambda value: (name, value))
    )
    return st.builds(spoil, st.sampled_from(sorted(PAYLOADS)).flatmap(body), st.none() | hostile)


def known_job_bodies(project_id: str) -> list[dict[str, Any]]:
    """Bodies that once got a 500 (a NUL character) or a job failing in every attempt (a
    date with no UTC form): issue 19. Now each is a 422 naming its field."""
    report = {"task_name": "project_activity_report", "project_id": project_id}
    return [
        {"task_name": "data_processing", "payload": {"csv": "a\x00b"}},
        {"task_name": "data_processing", "payload": {"csv": "a", "columns": ["\x00"]}},
        {"task_name": "data_processing", "payload": {"csv": "a"}, "idempotency_key": "\x00"},
        {**report, "payload": {"since": "0001-01-01T00:00:00+14:00"}},
        {**report, "payload": {"until": "9999-12-31T23:59:59-14:00"}},
    ]
