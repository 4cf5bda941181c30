"""The operator console: the ``/console`` page and the JSON it polls (``/ops/...``).

The page is static (``atrium/static/console.*``) and holds no data: it asks for the
operator token, keeps it in the tab's sessionStorage and sends it in an Authorization
header to the endpoints below (and ``/health/supervisor``), which check it exactly as
``/health/supervisor`` does (``ops.require_operator``).
"""

from __future__ import annotations

from quart import Blueprint, Response, current_app
from quart_schema import (
    document_response,
    hide,
    security_scheme,
    tag,
    validate_querystring,
)

from ..core.metrics import COMPLETED_WINDOW
from ..persistence import jobs as store
from ..persistence.jobs import JobError
from .console_schemas import (
    DocumentsResponse,
    MetricsSummaryResponse,
    OpsJobsResponse,
    OpsListQuery,
    WorkspacesResponse,
)
from .errors import error_response
from .job_schemas import JobStatusResponse
from .jobs import job_response, parse_job_id
from .ops import require_operator
from .schemas import error_responses, respond
from .security import services

blueprint = Blueprint("console", __name__)

_OPERATOR = (401, 403)
_STATUS = {"job_not_found": 404, "job_state_conflict": 409}


@blueprint.errorhandler(JobError)
async def job_error(error: JobError) -> Response:
    return error_response(_STATUS.get(error.code, 400), error.code, error.message)


@blueprint.get("/console")
@hide
async def console() -> Response:
    """The operator console page (its data comes from the endpoints below)."""
    return await current_app.send_static_file("console.html")


@blueprint.get("/ops/workspaces")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(WorkspacesResponse, 200)
@error_responses(*_OPERATOR, 422)
@validate_querystring(OpsListQuery)
async def workspaces(query_args: OpsListQuery) -> Response:
    """The workspaces open in this process, the most connected first (at most
    ``limit``): each with its connections and users. Operator token."""
    require_operator()
    total, connections, shown = services().workspaces.overview(query_args.limit)
    return respond(
        WorkspacesResponse.model_validate(
            {"total": total, "connections": connections, "workspaces": shown}
        )
    )


@blueprint.get("/ops/documents")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(DocumentsResponse, 200)
@error_responses(*_OPERATOR, 422)
@validate_querystring(OpsListQuery)
async def documents(query_args: OpsListQuery) -> Response:
    """The live documents open in this process, the most connected first (at most
    ``limit``): each with its peers, its last seq and snapshot seq, and the bytes it
    stores. Operator token."""
    require_operator()
    total, peers, shown = services().documents.overview(query_args.limit)
    return respond(
        DocumentsResponse.model_validate({"total": total, "peers": peers, "documents": shown})
    )


@blueprint.get("/ops/jobs")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(OpsJobsResponse, 200)
@error_responses(*_OPERATOR, 422, 503)
@validate_querystring(OpsListQuery)
async def jobs(query_args: OpsListQuery) -> Response:
    """The job queue across all processes: jobs by state, those completed within the
    last 5 minutes, and the dead jobs of every user and project, most recently dead
    first (at most ``limit``). Operator token."""
    require_operator()
    svc = services()
    queue = svc.jobs.queue
    counts = await store.count_jobs(svc.db, completed_since=queue.now() - COMPLETED_WINDOW)
    dead = await store.list_dead(svc.db, limit=query_args.limit)
    return respond(
        OpsJobsResponse.model_validate(
            {
                "by_state": {str(state): n for state, n in counts.by_state.items()},
                "completed_recent": counts.completed_recent,
                "dead": [job_response(job, result=False) for job in dead],
            }
        )
    )


@blueprint.post("/ops/jobs/<job_id>/retry")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(JobStatusResponse, 200)
@error_responses(*_OPERATOR, 404, 409, 422, 503)
async def retry_job(job_id: str) -> Response:
    """Queue any user's ``failed``, ``dead`` or ``cancelled`` job again now, with a fresh
    retry budget (as its creator may with ``POST /api/v1/jobs/{job_id}/retry``). 409
    ``job_state_conflict`` for a job in another state. Operator token."""
    require_operator()
    job = await services().jobs.retry(parse_job_id(job_id), None)
    return respond(job_response(job))


@blueprint.get("/ops/metrics")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(MetricsSummaryResponse, 200)
@error_responses(*_OPERATOR)
async def metrics() -> Response:
    """This process's key metrics as JSON (the Prometheus registry, summed): requests,
    errors, latency percentiles, WebSocket connections, pool use, cache hit ratio,
    queue depths. Operator token."""
    require_operator()
    summary = await services().metrics.summary()
    return respond(MetricsSummaryResponse.model_validate(summary))
