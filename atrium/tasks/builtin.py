"""The built-in tasks: real work on real data (CSV statistics, project export, activity)."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from ..persistence import jobs as store
from ..timestamps import utc_iso, utc_now_iso
from ._registry import PermanentJobError, TaskContext, registry

# Distinct values listed per text column; the count of distinct values is always complete.
TOP_VALUES = 50
# Events read per query by the project tasks (each page is one progress step).
EVENT_PAGE = 5000


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataProcessingPayload(_Payload):
    csv: str = Field(min_length=1, description="CSV text; the first row names the columns")
    columns: list[str] | None = Field(
        default=None, min_length=1, description="Only these columns (default: all)"
    )


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_csv(text: str, columns: list[str] | None) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of ``text`` (restricted to ``columns``). Raises
    PermanentJobError naming the line for a malformed document."""
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise PermanentJobError("malformed CSV: there is no header row")
        names = [h.strip() for h in header]
        if len(set(names)) != len(names):
            raise PermanentJobError("malformed CSV: the header repeats a column name")
        rows = []
        for row in reader:
            if not row:
                continue  # blank lines carry no record
            if len(row) != len(names):
                raise PermanentJobError(
                    f"malformed CSV: line {reader.line_num} has {len(row)} fields,"
                    f" the header has {len(names)}"
                )
            rows.append(row)
    except csv.Error as error:
        raise PermanentJobError(f"malformed CSV: line {reader.line_num}: {error}") from None
    if columns is None:
        return names, rows
    missing = [c for c in columns if c not in names]
    if missing:
        raise PermanentJobError(f"no such column(s) in the CSV header: {', '.join(missing)}")
    picks = [names.index(c) for c in columns]
    return list(columns), [[row[i] for i in picks] for row in rows]


def column_stats(values: list[str]) -> dict[str, Any]:
    """Numeric columns (every non-empty value a finite number): count, mean, min, max and
    population standard deviation. Others: count, distinct and the most frequent values."""
    present = [v.strip() for v in values if v.strip()]
    numbers = [_number(v) for v in present]
    if present and all(n is not None for n in numbers):
        xs = [n for n in numbers if n is not None]
        mean = math.fsum(xs) / len(xs)
        variance = math.fsum((x - mean) ** 2 for x in xs) / len(xs)
        return {
            "type": "numeric",
            "count": len(xs),
            "mean": mean,
            "min": min(xs),
            "max": max(xs),
            "stddev": math.sqrt(variance),
        }
    counts = Counter(present)
    return {
        "type": "text",
        "count": len(present),
        "distinct": len(counts),
        "values": dict(counts.most_common(TOP_VALUES)),
    }


@registry.task("data_processing", DataProcessingPayload)
async def data_processing(ctx: TaskContext, payload: DataProcessingPayload) -> dict[str, Any]:
    """Statistics of a CSV document: row count, the columns, and per column either
    count/mean/min/max/stddev (numeric columns) or the counts of distinct values.

    Malformed CSV (fields that do not match the header, a bad quote) ends the job `dead`
    with the line named; retrying would not help.
    """
    await ctx.progress(5, "parsing")
    names, rows = await ctx.to_thread(parse_csv, payload.csv, payload.columns)
    await ctx.progress(50, f"parsed {len(rows)} rows")
    stats: dict[str, Any] = {}
    for i, name in enumerate(names):
        stats[name] = await ctx.to_thread(column_stats, [row[i] for row in rows])
        await ctx.progress(50 + 45 * (i + 1) // len(names), f"column {name}")
    return {"rows": len(rows), "columns": names, "stats": stats}


class ProjectExportPayload(_Payload):
    include_events: bool = Field(default=True, description="Include the whole event log")


async def _events(ctx: TaskContext, **window: Any) -> list[dict[str, Any]]:
    assert ctx.project_id is not None
    events: list[dict[str, Any]] = []
    while True:
        after = events[-1]["seq"] if events else 0
        page = await store.project_events(
            ctx.db, ctx.project_id, after_seq=after, limit=EVENT_PAGE, **window
        )
        events.extend(page)
        await ctx.progress(min(90, 10 + len(events) // EVENT_PAGE), f"{len(events)} events read")
        if len(page) < EVENT_PAGE:
            return events


@registry.task("project_export", ProjectExportPayload, needs_project=True)
async def project_export(ctx: TaskContext, payload: ProjectExportPayload) -> dict[str, Any]:
    """The job's project, its members and its whole event log as one JSON document
    (stored as the job's result). Needs the job's ``project_id``."""
    assert ctx.project_id is not None
    snapshot = await store.project_snapshot(ctx.db, ctx.project_id)
    if snapshot is None:
        raise PermanentJobError("the project no longer exists")
    await ctx.progress(10, "project and members read")
    events = await _events(ctx) if payload.include_events else []
    return {
        "exported_at": utc_now_iso(),
        **snapshot,
        "event_count": len(events),
        "events": events,
    }


class ActivityReportPayload(_Payload):
    # Aware only: a time without its zone is refused at submission (naming the field),
    # never guessed, and never compared with an aware one.
    since: AwareDatetime | None = Field(
        default=None, description="Window start, with a zone (default: no limit)"
    )
    until: AwareDatetime | None = Field(default=None, description="Window end, exclusive")

    @model_validator(mode="after")
    def _window(self) -> ActivityReportPayload:
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


def activity(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of ``events`` per user, per type, and per user and type."""
    by_user: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    pairs: dict[str, Counter[str]] = {}
    for event in events:
        user = event["actor_id"] or "system"
        by_user[user] += 1
        by_type[event["type"]] += 1
        pairs.setdefault(user, Counter())[event["type"]] += 1
    return {
        "total": len(events),
        "by_user": dict(by_user.most_common()),
        "by_type": dict(by_type.most_common()),
        "by_user_and_type": {u: dict(c.most_common()) for u, c in pairs.items()},
    }


@registry.task("project_activity_report", ActivityReportPayload, needs_project=True)
async def project_activity_report(
    ctx: TaskContext, payload: ActivityReportPayload
) -> dict[str, Any]:
    """Events per user and per type in a time window of the job's project's event log
    (``since`` inclusive, ``until`` exclusive; both optional). Needs the job's
    ``project_id``."""
    events = await _events(ctx, since=payload.since, until=payload.until)
    report = await ctx.to_thread(activity, events)
    window = {
        "since": None if payload.since is None else utc_iso(payload.since),
        "until": None if payload.until is None else utc_iso(payload.until),
    }
    return {"window": window, **report}
