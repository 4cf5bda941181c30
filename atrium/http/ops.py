"""Operational endpoints: liveness, readiness and the supervision tree (operators)."""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any, Literal

import trio
from quart import Blueprint, Response, request
from quart_schema import document_response, security_scheme, tag

from ..supervision import SupervisorSnapshot
from .errors import ApiError
from .json import json_response
from .schemas import (
    DatabaseCheck,
    HealthResponse,
    ReadyChecks,
    ReadyResponse,
    RedisCheck,
    SupervisionCheck,
    SupervisorModel,
    SupervisorTreeResponse,
    error_responses,
    respond,
)
from .security import services

blueprint = Blueprint("ops", __name__)
log = logging.getLogger("atrium.http")

_READY_TIMEOUT = 2.0


@blueprint.get("/health")
@tag(["ops"])
@document_response(HealthResponse, 200)
async def health() -> Response:
    """Liveness: the process answers. No I/O.

    A probe's request (no ``Origin``) is answered by the Edge layer before the app; a
    page's request reaches this route and gets the CORS headers with its answer."""
    return respond(HealthResponse(status="ok"))


@blueprint.get("/ready")
@tag(["ops"])
@document_response(ReadyResponse, 200)
@document_response(ReadyResponse, 503)
async def ready() -> Response:
    """Readiness: 200 only when the database answers within 2 s and no permanent child of
    the supervision tree is down or restarting, else 503. ``checks`` says which failed:
    ``database.error`` why the database did not answer, ``supervision.down`` the children
    that are not running (nested ones as ``parent/child``), ``draining: true`` that the
    process got SIGTERM and is about to stop (it still serves meanwhile).

    ``status`` is ``ready``, ``not_ready`` (503), or ``degraded``: ready (200) but Redis is
    away (``checks.redis``, present with REDIS_URL), so this process serves its own
    clients alone until it rejoins; the load balancer should keep sending it traffic."""
    svc = services()
    database: dict[str, Any] = {"ok": False}
    with trio.move_on_after(_READY_TIMEOUT) as waiting:
        try:
            database["ok"] = await svc.db.ping()
        except Exception as error:  # any failure means "not ready", reported, not raised
            log.warning("readiness: database check failed: %s", error)
            database["error"] = str(error) or type(error).__name__
    if waiting.cancelled_caught:
        database["error"] = f"no answer within {_READY_TIMEOUT} s"
    checks = ReadyChecks(database=DatabaseCheck(**database))
    if svc.supervisor is not None:
        checks.supervision = SupervisionCheck(
            ok=svc.supervisor.healthy(), down=_down(svc.supervisor.snapshot())
        )
    bridge = svc.bridge
    if bridge is not None:  # no I/O: the bridge's own state, kept by its loops
        connected = bridge.connected
        checks.redis = RedisCheck(
            ok=connected,
            state="connected" if connected else "degraded",
            breaker=bridge.redis.breaker.state.value,
        )
    ok = checks.database.ok and (checks.supervision is None or checks.supervision.ok)
    if svc.draining.is_set():  # shutting down: the load balancer should send no more
        checks.draining = True
        ok = False
    status: Literal["ready", "degraded", "not_ready"] = "ready"
    if not ok:
        status = "not_ready"
    elif checks.redis is not None and not checks.redis.ok:
        status = "degraded"
    # Fields never set stay out of the body (no "error" when the database answered).
    body = ReadyResponse(ready=ok, status=status, checks=checks).model_dump(exclude_unset=True)
    return json_response(body, 200 if ok else 503)


def _down(tree: SupervisorSnapshot, prefix: str = "") -> list[str]:
    """The permanent children of ``tree`` (and of its running subtrees) not running."""
    down: list[str] = []
    for child in tree.children:
        path = prefix + child.name
        if child.state != "running":
            if child.restart == "permanent":
                down.append(path)
        elif child.supervisor is not None:
            down.extend(_down(child.supervisor, path + "/"))
    return down


def require_operator() -> None:
    """Let the operator through: ``Authorization: Bearer <ADMIN_TOKEN>`` (anyone in
    development). Raises 403 operator_disabled when no ADMIN_TOKEN is set, 401
    operator_token_required for a missing or wrong token (compared in constant time)."""
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
@error_responses(401, 403)
async def supervisor_tree() -> Response:
    """The process's id and supervision tree: every supervisor and child with its state, restart
    count, last failure, uptime and mailbox depth; and ``contained_failures``, the
    connections and requests that an unexpected exception ended (each alone, never a
    child of the tree), by kind. Needs ``Authorization: Bearer <ADMIN_TOKEN>`` outside
    development."""
    require_operator()
    svc = services()
    root = svc.supervisor
    tree = None if root is None else SupervisorModel.model_validate(root.snapshot().to_dict())
    return respond(
        SupervisorTreeResponse(
            pid=os.getpid(), supervisor=tree, contained_failures=svc.failures.counts()
        )
    )
