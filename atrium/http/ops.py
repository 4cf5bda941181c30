"""Operational endpoints: liveness and readiness."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import trio
from quart import Blueprint, Response, request
from quart_schema import document_response, security_scheme, tag

from .errors import ApiError
from .json import json_response
from .schemas import (
    HealthResponse,
    ReadyResponse,
    SupervisorTreeResponse,
    error_responses,
)
from .security import services

blueprint = Blueprint("ops", __name__)
log = logging.getLogger("atrium.http")

_READY_TIMEOUT = 2.0


@blueprint.get("/health")
@tag(["ops"])
@document_response(HealthResponse, 200)
async def health() -> Response:
    """Liveness: the process answers. No I/O."""
    return json_response({"status": "ok"})


@blueprint.get("/ready")
@tag(["ops"])
@document_response(ReadyResponse, 200)
@document_response(ReadyResponse, 503)
async def ready() -> Response:
    """Readiness: 200 only when the database answers within 2 s and no permanent child of
    the supervision tree is down or restarting, else 503."""
    svc = services()
    database = False
    with trio.move_on_after(_READY_TIMEOUT):
        try:
            database = await svc.db.ping()
        except Exception as error:  # any failure means "not ready", reported, not raised
            log.warning("readiness: database check failed: %s", error)
    checks = {"database": database}
    if svc.supervisor is not None:
        checks["supervision"] = svc.supervisor.healthy()
    ok = all(checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


def _require_operator() -> None:
    settings = services().settings
    if settings.environment == "development":
        return
    expected = settings.admin_token
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if expected is None:
        raise ApiError(403, "operator_disabled", "Set ADMIN_TOKEN to use operator endpoints")
    # Bytes, not str: compare_digest refuses a str with non-ASCII characters (a TypeError).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise ApiError(
            401,
            "operator_token_required",
            "A valid operator token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


@blueprint.get("/health/supervisor")
@tag(["ops"])
@security_scheme([{"bearer": []}])
@document_response(SupervisorTreeResponse, 200)
@error_responses(401)
async def supervisor_tree() -> Response:
    """The process's supervision tree: every supervisor and child with its state, restart
    count, last failure, uptime and mailbox depth; and ``contained_failures``, the
    connections and requests that an unexpected exception ended (each alone, never a
    child of the tree), by kind. Needs ``Authorization: Bearer <ADMIN_TOKEN>`` outside
    development."""
    _require_operator()
    svc = services()
    root = svc.supervisor
    tree: dict[str, Any] | None = None if root is None else root.snapshot().to_dict()
    return json_response({"supervisor": tree, "contained_failures": svc.failures.counts()})
