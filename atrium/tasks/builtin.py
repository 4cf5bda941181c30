"""The built-in tasks: real work on real data (CSV statistics, project export, activity)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from ..core.timestamps import utc_iso, utc_now_iso
from ..persistence import exports
from ._csv import summarise_csv
from ._documents import project_documents
from ._registry import PermanentJobError, TaskContext, registry

# Events read per query by the project tasks (each page is one progress step).
EVENT_PAGE = 5000


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataProcessingPayload(_Payload):
    csv: str = Field(min_length=1, description="CSV text; the first row names the columns")
    columns: list[str] | None = Field(
        default=None, min_length=1, description="Only these columns (default: all)"
    )


@registry.task("data_processing", DataProcessingPayload)
async def data_processing(ctx: TaskContext, payload: DataProcessingPayload) -> dict[str, Any]:
    """Statistics of a CSV document: row count, the columns, and per column either
    count/mean/min/max/stddev (numeric columns) or the counts of distinct values.

    Malformed CSV (fields that do not match the header, a bad quote) ends the job `dead`
    with the line named; retrying would not help.
    """
    await ctx.progress(5, "summarising")
    # Parsed and summarised with Polars in a worker process: a timeout kills it.
    summary: dict[str, Any] = await ctx.run_sync(summarise_csv, payload.csv, payload.columns)
    await ctx.progress(100, f"summarised {summary['rows']} rows")
    return summary


class ProjectExportPayload(_Payload):
    include_events: bool = Field(default=True, description="Include the whole event log")
    include_documents: bool = Field(
        default=True, description="Include each live document's path and text"
    )


async def _events(ctx: TaskContext, **window: Any) -> list[dict[str, Any]]:
    assert ctx.project_id is not None
    events: list[dict[str, Any]] = []
    while True:
        after = events[-1]["seq"] if events else 0
        page = await exports.project_events(
            ctx.db, ctx.project_id, after_seq=after, limit=EVENT_PAGE, **window
        )
        events.extend(page)
        await ctx.progress(min(90, 10 + len(events) // EVENT_PAGE), f"{len(events)} events read")
        if len(page) < EVENT_PAGE:
            return events


@registry.task("project_export", ProjectExportPayload, needs_project=True)
async def project_export(ctx: TaskContext, payload: ProjectExportPayload) -> dict[str, Any]:
    """The job's project, its members, its whole event log and its live documents (each
    one's path and text, as stored when it is read) as one JSON document (stored as the
    job's result). Needs the job's ``project_id``."""
    assert ctx.project_id is not None
    snapshot = await exports.project_snapshot(ctx.db, ctx.project_id)
    if snapshot is None:
        raise PermanentJobError("the project no longer exists")
    await ctx.progress(10, "project and members read")
    events = await _events(ctx) if payload.include_events else []
    documents = await project_documents(ctx) if payload.include_documents else []
    await ctx.progress(95, f"{len(documents)} documents read")
    return {
        "exported_at": utc_now_iso(),
        **snapshot,
        "event_count": len(events),
        "events": events,
        "documents": documents,
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
    report = await ctx.run_sync(activity, events)
    window = {
        "since": None if payload.since is None else utc_iso(payload.since),
        "until": None if payload.until is None else utc_iso(payload.until),
    }
    return {"window": window, **report}
