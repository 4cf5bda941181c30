"""The peer in bench/http.py: a minimal FastAPI + uvicorn app doing the work of two atrium routes.

    python -m bench.peer_fastapi --port 8101 --database-url URL --secret KEY
        [--issuer workspace-backend] [--audience workspace-api] [--pool-size 20]

(from the repository root; needs the ``bench`` extra: ``pip install -e '.[bench]'``).

- ``GET /api/v1/auth/me``: verify the HS256 bearer token with PyJWT (same issuer,
  audience and required claims as ``atrium.tokens``), then run atrium's session query
  (``accounts.find_session_user``) and answer the user as JSON.
- ``GET /api/v1/projects/?limit=&offset=``: the same authentication, then atrium's
  project-list query (``projects.list_projects``), answered in atrium's JSON shape.
- ``GET /health``: 200, for the bench to wait on.

Nothing is cached: every request verifies its token and runs its queries, which is what
atrium does with SESSION_CACHE_SECONDS=0 and PROJECT_CACHE_TTL_SECONDS=0 (atrium still
remembers verified tokens). The asyncpg pool is configured as atrium's (no reset on
release, no inactivity timer, atrium's default DB_POOL_SIZE of 20), so the two differ in
their stacks, not in their SQL or pool. JSON goes out through orjson, as in atrium.
uvicorn runs with its defaults (``loop="auto"``, ``http="auto"``: uvloop and httptools
when installed, else asyncio and h11), without an access log.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import asyncpg
import jwt
import orjson
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import Response

# Copied from atrium/persistence/accounts.py (find_session_user).
SESSION_SQL = (
    "SELECT u.id, u.email, u.role, u.created_at FROM users u"
    " JOIN sessions s ON s.user_id = u.id"
    " WHERE u.id = $1 AND s.id = $2 AND s.revoked_at IS NULL"
)
# Copied from atrium/persistence/projects.py (_PROJECT_COLUMNS and list_projects).
_PROJECT_COLUMNS = (
    "p.id, p.name, p.description, p.visibility, p.owner_id, p.created_at, p.updated_at,"
    " (SELECT count(*) FROM project_members c WHERE c.project_id = p.id) AS collaborator_count"
)
LIST_SQL = (
    "WITH mine AS ("
    "  SELECT m.project_id, m.role, p.created_at FROM project_members m"
    "  JOIN projects p ON p.id = m.project_id"
    "  WHERE m.user_id = $1 AND p.deleted_at IS NULL)"
    " SELECT t.total, page.* FROM (SELECT count(*) AS total FROM mine) t"
    " LEFT JOIN LATERAL ("
    f"  SELECT {_PROJECT_COLUMNS}, mine.role FROM mine"
    "   JOIN projects p ON p.id = mine.project_id"
    "   ORDER BY mine.created_at DESC, mine.project_id LIMIT $2 OFFSET $3) page ON true"
)
_REQUIRED = ["sub", "exp", "iat", "aud", "iss", "jti", "sid", "typ"]


async def _keep_session(connection: asyncpg.Connection) -> None:
    """No reset on release, as atrium's pool (``persistence/database.py``)."""


def _json(value: object) -> Response:
    return Response(orjson.dumps(value), media_type="application/json")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class _TokenSettings:
    secret: str
    issuer: str
    audience: str


async def current_user(request: Request) -> asyncpg.Record:
    """The user row of a valid access token whose session is live; 401 otherwise."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "token_missing")
    settings: _TokenSettings = request.app.state.token
    try:
        claims = jwt.decode(
            token.strip(),
            settings.secret,
            algorithms=["HS256"],
            audience=settings.audience,
            issuer=settings.issuer,
            options={"require": _REQUIRED},
        )
    except jwt.PyJWTError:
        raise HTTPException(401, "token_invalid") from None
    if claims["typ"] != "access":
        raise HTTPException(401, "token_wrong_type")
    pool: asyncpg.Pool = request.app.state.pool
    row = await pool.fetchrow(SESSION_SQL, uuid.UUID(claims["sub"]), uuid.UUID(claims["sid"]))
    if row is None:
        raise HTTPException(401, "session_revoked")
    return row


# FastAPI resolves annotations at run time: this alias must live at module level.
User = Annotated[asyncpg.Record, Depends(current_user)]


def create_app(
    database_url: str, secret: str, issuer: str, audience: str, pool_size: int
) -> FastAPI:
    """The peer app: a pool opened for its lifespan, and the three routes above."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size,
            reset=_keep_session,
            max_inactive_connection_lifetime=0,
        )
        try:
            yield
        finally:
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan)
    app.state.token = _TokenSettings(secret, issuer, audience)

    # Routes return their response (orjson bytes) rather than a dict, as atrium's
    # ``json_response`` does: no response-model pass.
    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/api/v1/auth/me")
    async def me(user: User) -> Response:
        return _json(
            {
                "user_id": str(user["id"]),
                "email": user["email"],
                "role": user["role"],
                "created_at": user["created_at"],
            }
        )

    @app.get("/api/v1/projects/")
    async def list_projects(
        request: Request,
        user: User,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> Response:
        pool: asyncpg.Pool = request.app.state.pool
        rows = await pool.fetch(LIST_SQL, user["id"], limit, offset)
        projects = [
            {
                "id": str(r["id"]),
                "name": r["name"],
                "description": r["description"],
                "visibility": r["visibility"],
                "owner_id": str(r["owner_id"]),
                "created_at": _iso(r["created_at"]),
                "updated_at": _iso(r["updated_at"]),
                "collaborator_count": r["collaborator_count"],
                "status": "active",
                "role": r["role"],
                "workspace_url": f"/ws/{r['id']}",
            }
            for r in rows
            if r["id"] is not None
        ]
        return _json(
            {
                "projects": projects,
                "total": int(rows[0]["total"]),
                "limit": limit,
                "offset": offset,
                "cached": False,
                "cache_expires_at": None,
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--secret", required=True, help="atrium's SECRET_KEY")
    parser.add_argument("--issuer", default="workspace-backend")
    parser.add_argument("--audience", default="workspace-api")
    parser.add_argument("--pool-size", type=int, default=20)
    args = parser.parse_args()
    app = create_app(args.database_url, args.secret, args.issuer, args.audience, args.pool_size)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
