"""Operational endpoints: liveness and readiness."""

from __future__ import annotations

import logging

import trio
from quart import Blueprint, Response
from quart_schema import document_response, tag

from .json import json_response
from .schemas import HealthResponse, ReadyResponse
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
    """Readiness: 200 only when the database answers within 2 s, else 503."""
    database = False
    with trio.move_on_after(_READY_TIMEOUT):
        try:
            database = await services().db.ping()
        except Exception as error:  # any failure means "not ready", reported, not raised
            log.warning("readiness: database check failed: %s", error)
    checks = {"database": database}
    ok = all(checks.values())
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)
