"""``/api/v1/jobs``: submit background jobs, follow them, cancel and retry them.

The rules live in ``atrium.jobs.JobService`` (and the SQL it calls) and use the
caller's rights now (docs/JOBS.md, "Rights"): a job without a project is its creator's; a
project job is seen by the project's members, cancelled by its creator (while a member)
and the owners, retried by its creator (while a collaborator or an owner) and the owners.
A job the caller may not see answers exactly like one that does not exist (404
job_not_found). Lists never carry payloads or results, only their sizes.
"""

from __future__ import annotations

import uuid

from quart import Blueprint, Response, g
from quart_schema import (
    document_response,
    security_scheme,
    tag,
    validate_querystring,
    validate_request,
)

from ..core.jobs import Job, JobError, JobStatus, Priority, QueueFull
from ..core.projects import ProjectError
from ..jobs import JobService
from ..tasks import InvalidPayload, UnknownTask
from .errors import ApiError, error_response
from .job_schemas import (
    JobListQuery,
    JobListResponse,
    JobProgress,
    JobRunRequest,
    JobStatusResponse,
    JobSubmitResponse,
    TaskListResponse,
    TaskResponse,
)
from .schemas import BY_ID, JSON_BODY, SIGNED_IN, error_responses, respond
from .security import require_user, services

blueprint = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")

_STATUS = {
    "job_queue_full": 429,
    "job_not_found": 404,
    "project_not_found": 404,
    "forbidden_role": 403,
    "priority_forbidden": 403,
    "job_state_conflict": 409,
    "job_payload_too_large": 413,
}


@blueprint.errorhandler(JobError)
async def job_error(error: JobError) -> Response:
    response = error_response(_STATUS.get(error.code, 400), error.code, error.message)
    if isinstance(error, QueueFull):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


@blueprint.errorhandler(ProjectError)
async def project_error(error: ProjectError) -> Response:
    return error_response(_STATUS.get(error.code, 400), error.code, error.message)


@blueprint.errorhandler(UnknownTask)
async def unknown_task(error: UnknownTask) -> Response:
    return error_response(
        422, "unknown_task", f"task_name: no task named {error.args[0]!r} (GET /api/v1/jobs/tasks)"
    )


@blueprint.errorhandler(InvalidPayload)
async def invalid_payload(error: InvalidPayload) -> Response:
    return error_response(422, "invalid_payload", str(error))


def _service() -> JobService:
    jobs = services().jobs
    if jobs is None:
        raise ApiError(503, "jobs_unavailable", "Background jobs are not available here")
    return jobs


def parse_job_id(value: str) -> uuid.UUID:
    """``job_<uuid>`` (or a bare UUID); 422 invalid_id otherwise."""
    try:
        return uuid.UUID(value.removeprefix("job_"))
    except ValueError:
        raise ApiError(422, "invalid_id", "The job id is not job_<uuid>") from None


def job_response(job: Job, *, result: bool = True) -> JobStatusResponse:
    """A job as the API shows it (``result`` left null in lists)."""
    return JobStatusResponse.model_validate(
        {
            "job_id": f"job_{job.id}",
            "status": job.status.value,
            "result": job.result if result else None,
            "error": job.error,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
            "next_attempt_at": job.next_attempt_at if job.status is JobStatus.FAILED else None,
            "retry_count": job.retry_count,
            "max_retries": job.max_retries,
            "timeout": job.timeout_seconds,
            "task_name": job.task_name,
            "priority": job.priority.name.lower(),
            "progress": JobProgress(percent=job.progress, message=job.progress_message),
            "attempts": job.attempts,
            "project_id": job.project_id,
            "user_id": job.user_id,
            "payload_bytes": job.payload_bytes,
            "result_bytes": job.result_bytes,
        }
    )


@blueprint.post("/run")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(JobSubmitResponse, 202)
@document_response(JobSubmitResponse, 200)
@error_responses(*SIGNED_IN, *JSON_BODY, 403, 404)
@require_user
@validate_request(JobRunRequest)
async def run_job(data: JobRunRequest) -> Response:
    """Queue a job: 202 with its id, place in the queue and an estimated completion.

    The payload is checked against the task's schema now (422 ``invalid_payload`` naming
    the field, also for a NUL character or a date with no UTC form; 422 ``unknown_task``;
    413 ``job_payload_too_large`` past JOB_MAX_PAYLOAD_BYTES). With ``project_id`` the
    caller must be an owner or a collaborator there (404 ``project_not_found``, 403
    ``forbidden_role`` for a viewer); ``priority: high`` needs an owner of the project
    (403 ``priority_forbidden``). An ``idempotency_key`` the caller used before returns
    that first job with 200.
    """
    submission = await _service().submit(
        g.user.id,
        task_name=data.task_name,
        payload=data.payload,
        priority=Priority[data.priority.upper()],
        timeout_seconds=data.timeout,
        max_retries=data.max_retries,
        project_id=data.project_id,
        idempotency_key=data.idempotency_key,
    )
    job = submission.job
    return respond(
        JobSubmitResponse(
            job_id=f"job_{job.id}",
            status=job.status.value,
            estimated_completion=submission.estimated_completion,
            position_in_queue=submission.position_in_queue,
        ),
        202 if submission.created else 200,
    )


@blueprint.get("/tasks")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(TaskListResponse, 200)
@error_responses(*SIGNED_IN)
@require_user
async def list_tasks() -> Response:
    """Every task a job can run: name, description and the JSON schema of its payload."""
    registry = _service().queue.registry
    return respond(
        TaskListResponse(
            tasks=[
                TaskResponse(
                    name=task.name,
                    description=task.description,
                    needs_project=task.needs_project,
                    payload_schema=task.payload_schema(),
                )
                for task in registry
            ]
        )
    )


@blueprint.get("/")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(JobListResponse, 200)
@error_responses(*SIGNED_IN, 404, 422)
@require_user
@validate_querystring(JobListQuery)
async def list_jobs(query_args: JobListQuery) -> Response:
    """The caller's jobs (less those of projects they are no longer a member of), newest
    first; with ``project_id``, every job of that project (members only: 404 otherwise).
    Filter by ``status``; page with ``limit``/``offset``. Payloads and results are left
    out (``payload_bytes``, ``result_bytes`` give their sizes): fetch a result from
    ``/{job_id}/status``."""
    page = await _service().list(
        g.user.id,
        status=None if query_args.status is None else JobStatus(query_args.status),
        project_id=query_args.project_id,
        limit=query_args.limit,
        offset=query_args.offset,
    )
    return respond(
        JobListResponse(
            jobs=[job_response(j, result=False) for j in page.jobs],
            total=page.total,
            limit=query_args.limit,
            offset=query_args.offset,
        )
    )


@blueprint.get("/<job_id>/status")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(JobStatusResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID)
@require_user
async def job_status(job_id: str) -> Response:
    """The job: status, result, progress and every attempt (start, end, error)."""
    job = await _service().get(parse_job_id(job_id), g.user.id)
    return respond(job_response(job))


@blueprint.post("/<job_id>/cancel")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(JobStatusResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, 403, 409)
@require_user
async def cancel_job(job_id: str) -> Response:
    """Cancel (the creator while a member of the job's project, or one of its owners). A
    waiting job is ``cancelled`` at once; a running one is stopped through its cancel
    scope within a second (the answer then says ``running``; its status turns
    ``cancelled``). 409 ``job_state_conflict`` for a finished job; 403 for another
    member."""
    job = await _service().cancel(parse_job_id(job_id), g.user.id)
    return respond(job_response(job))


@blueprint.post("/<job_id>/retry")
@tag(["jobs"])
@security_scheme([{"bearer": []}])
@document_response(JobStatusResponse, 200)
@error_responses(*SIGNED_IN, *BY_ID, 403, 409)
@require_user
async def retry_job(job_id: str) -> Response:
    """Queue a ``failed``, ``dead`` or ``cancelled`` job again now, with a fresh retry
    budget; its attempts so far are kept. The creator may while a collaborator or an owner
    of the job's project, and its owners may (403 ``forbidden_role`` otherwise); a
    ``high`` job retried by anyone but an owner runs at ``normal``. 409 for a job in any
    other state."""
    job = await _service().retry(parse_job_id(job_id), g.user.id)
    return respond(job_response(job))
