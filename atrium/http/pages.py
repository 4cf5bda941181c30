"""The pages a browser opens: ``/demo`` (atrium.js at work) and ``/docs`` (Swagger UI).

Both are static files from ``atrium/static`` (served at ``/static/``, as are atrium.js
and the vendored Swagger UI), so they work offline and under a CSP that allows only
'self' (the Edge layer sets it). quart-schema's own ``/docs`` is off: it loads Swagger UI
from a CDN and starts it with an inline script.
"""

from __future__ import annotations

from quart import Blueprint, Response, current_app
from quart_schema import hide

blueprint = Blueprint("pages", __name__)


@blueprint.get("/demo")
@hide
async def demo() -> Response:
    """The demo page: log in, pick a project, presence, cursors and edits, live."""
    return await current_app.send_static_file("demo.html")


@blueprint.get("/docs")
@hide
async def docs() -> Response:
    """Swagger UI for ``/openapi.json``, from assets shipped with the package."""
    return await current_app.send_static_file("docs.html")
