"""The hot routes (``GET /api/v1/auth/me``, ``GET /api/v1/projects/``) answered past Quart:
the same status, body and headers as the Quart views for every request they take, and
every request they do not take left to those views."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from conftest import Running, StartServer
from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz import SETTINGS, drive
from test_projects import API, new_project, sign_up

from atrium.http.app import create_app
from atrium.http.hot import HotRoutes
from atrium.persistence.database import Database

ME = "/api/v1/auth/me"

Answer = tuple[int, dict[str, str], Any]


async def asgi_get(app: Any, path: str, query: bytes = b"", **headers: str) -> Answer:
    """One GET through an ASGI app: (status, headers, JSON body)."""
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:  # the request is whole: the client waits for its answer
            await trio.sleep_forever()
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [
            (k.replace("_", "-").lower().encode(), v.encode("latin-1")) for k, v in headers.items()
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "extensions": {},
    }
    await app(scope, receive, send)
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    names = {k.decode().lower(): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], names, orjson.loads(body)


class Paths:
    """The same services behind the hot layer and behind Quart alone."""

    def __init__(self, server: Running) -> None:
        assert server.bound.services is not None
        svc = server.bound.services.value
        self.quart = create_app(svc)
        self.passed_on = 0  # requests the hot layer handed to Quart

        async def quart_behind(scope: Any, receive: Any, send: Any) -> None:
            self.passed_on += 1
            await self.quart(scope, receive, send)

        self.hot = HotRoutes(quart_behind, svc)

    async def both(self, path: str, query: bytes = b"", **headers: str) -> tuple[Answer, Answer]:
        """The hot layer's answer (which it must give itself) and Quart's."""
        passed_on = self.passed_on
        hot = await asgi_get(self.hot, path, query, **headers)
        assert self.passed_on == passed_on, "the hot layer handed this request to Quart"
        quart = await asgi_get(self.quart, path, query, **headers)
        return hot, quart


def same(hot: Answer, quart: Answer) -> None:
    """Equal answers, but for the rate-limit count the second request used up."""
    (hot_status, hot_headers, hot_body), (status, headers, body) = hot, quart
    assert (hot_status, hot_body) == (status, body)
    if "x-ratelimit-remaining" in hot_headers:
        remaining = int(hot_headers.pop("x-ratelimit-remaining"))
        assert int(headers.pop("x-ratelimit-remaining")) == max(remaining - 1, 0)
    assert hot_headers == headers


@pytest.fixture
async def uncached(start_server: StartServer) -> Any:
    async with start_server(PROJECT_CACHE_TTL_SECONDS=0, SESSION_CACHE_SECONDS=0) as server:
        yield server


async def test_me_and_the_project_list_answer_as_the_quart_views(
    uncached: Running, db: Database
) -> None:
    ann, bob = await sign_up(uncached, db, "ann", "bob")
    for i in range(3):
        await new_project(uncached, ann, name=f"p{i}")
    paths = Paths(uncached)
    bearer = ann.headers["Authorization"]

    hot, quart = await paths.both(ME, authorization=bearer)
    assert hot[0] == 200 and hot[2]["email"] == ann.email
    same(hot, quart)
    for path, query in [
        (f"{API}/", b""),
        (API, b""),  # both spellings
        (f"{API}/", b"limit=2"),
        (f"{API}/", b"limit=2&offset=1"),
        (f"{API}/", b"offset=5"),
    ]:
        hot, quart = await paths.both(path, query, authorization=bearer)
        assert hot[0] == 200, hot
        same(hot, quart)
    hot, _ = await paths.both(f"{API}/", b"limit=2&offset=1", authorization=bearer)
    assert [p["name"] for p in hot[2]["projects"]] == ["p1", "p0"]
    assert (hot[2]["total"], hot[2]["limit"], hot[2]["offset"]) == (3, 2, 1)
    # Another user sees only their own.
    hot, quart = await paths.both(f"{API}/", authorization=bob.headers["Authorization"])
    assert hot[2]["total"] == 0
    same(hot, quart)


@pytest.mark.parametrize(
    "authorization",
    [
        None,  # no header
        "",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-jwt",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
        "Bearer \xe9\xff",  # latin-1 bytes that are not UTF-8
    ],
)
async def test_a_missing_or_bad_token_gets_the_views_401(
    uncached: Running, authorization: str | None
) -> None:
    paths = Paths(uncached)
    headers = {} if authorization is None else {"authorization": authorization}
    for path in (ME, f"{API}/"):
        hot, quart = await paths.both(path, **headers)
        assert hot[0] == 401 and hot[1]["www-authenticate"] == "Bearer"
        assert set(hot[2]) == {"error"} and hot[2]["error"]["code"]
        same(hot, quart)


async def test_a_revoked_session_and_the_rate_limit_answer_as_the_views(
    start_server: StartServer, db: Database
) -> None:
    async with start_server(
        RATE_LIMIT_PER_MINUTE=4, SESSION_CACHE_SECONDS=0, PROJECT_CACHE_TTL_SECONDS=0
    ) as server:
        ann, bob = await sign_up(server, db, "ann", "bob")
        paths = Paths(server)
        bearer = ann.headers["Authorization"]
        same(*await paths.both(ME, authorization=bearer))  # 2 of 4
        same(*await paths.both(f"{API}/", authorization=bearer))  # 4 of 4
        hot, quart = await paths.both(ME, authorization=bearer)
        assert hot[0] == quart[0] == 429
        assert hot[2]["error"]["code"] == "rate_limited"
        assert int(hot[1]["retry-after"]) > 0
        same(hot, quart)

        r = await server.client.post("/api/v1/auth/logout", headers=bob.headers)
        assert r.status_code == 200
        hot, quart = await paths.both(ME, authorization=bob.headers["Authorization"])
        assert hot[0] == 401 and hot[2]["error"]["code"] == "session_revoked"
        same(hot, quart)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        (b"limit=0", 422, "validation_error"),
        (b"limit=101", 422, "validation_error"),
        (b"limit=abc", 422, "validation_error"),
        (b"limit=-1", 422, "validation_error"),
        (b"limit=020", 200, None),  # not canonical: Quart reads it as 20
        (b"limit=%32", 200, None),  # percent-encoded
        (b"limit=2&limit=3", 422, "validation_error"),  # repeated: a list to Quart
        (b"unknown=1", 200, None),
        (b"limit=99999999999999999999", 422, "validation_error"),
    ],
)
async def test_queries_the_layer_does_not_take_get_the_views_answer(
    uncached: Running, db: Database, query: bytes, status: int, code: str | None
) -> None:
    (ann,) = await sign_up(uncached, db, "ann")
    paths = Paths(uncached)
    answer = await asgi_get(paths.hot, f"{API}/", query, authorization=ann.headers["Authorization"])
    assert (paths.passed_on, answer[0]) == (1, status)
    r = await uncached.client.get(f"{API}/?{query.decode()}", headers=ann.headers)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    else:
        assert r.json()["total"] == 0


async def test_head_and_bodies_go_to_the_views(uncached: Running, db: Database) -> None:
    (ann,) = await sign_up(uncached, db, "ann")
    r = await uncached.client.head(ME, headers=ann.headers)
    assert (r.status_code, r.content) == (200, b"")
    r = await uncached.client.request("GET", ME, headers=ann.headers, content=b'{"x": 1}')
    assert r.status_code == 200 and r.json()["email"] == ann.email


async def test_hot_answers_are_counted_and_logged_under_the_views_routes(
    start_server: StartServer, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_server(ENVIRONMENT="development") as server:
        (ann,) = await sign_up(server, db, "ann")
        with caplog.at_level("INFO", logger="atrium.access"):
            for path in (ME, f"{API}/", API):
                r = await server.client.get(path, headers=ann.headers)
                assert r.status_code == 200
                assert r.headers["x-content-type-options"] == "nosniff"  # the Edge layer
                assert r.headers["x-request-id"]  # the RequestLog layer
                assert r.headers["x-ratelimit-limit"] == "10000"
            r = await server.client.get(ME)
            assert r.status_code == 401
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "atrium.access"]
        assert any(line.startswith(f"GET {ME} 200") for line in lines), lines
        assert sum(line.startswith(f"GET {API}/ 200") for line in lines) == 2, lines
        metrics = (await server.client.get("/metrics")).text
        assert f'route="{ME}",status="200"' in metrics
        assert f'method="GET",route="{API}/",status="200"}} 2.0' in metrics
        assert f'route="{ME}",status="401"' in metrics


async def test_the_project_list_is_served_from_the_cache_past_quart(
    start_server: StartServer, db: Database
) -> None:
    async with start_server(PROJECT_CACHE_TTL_SECONDS=60) as server:
        (ann,) = await sign_up(server, db, "ann")
        await new_project(server, ann, name="one")
        first = (await server.client.get(f"{API}/", headers=ann.headers)).json()
        second = (await server.client.get(f"{API}/", headers=ann.headers)).json()
        assert (first["cached"], second["cached"]) == (False, True)
        assert second["projects"] == first["projects"]
        await new_project(server, ann, name="two")  # a write drops the user's pages
        third = (await server.client.get(f"{API}/", headers=ann.headers)).json()
        assert third["cached"] is False and third["total"] == 2


# Query strings near the layer's rule: known and unknown keys, canonical and not-quite
# numbers, in and out of bounds, repeated, malformed.
QUERY_PARAMETER = st.tuples(
    st.sampled_from(["limit", "offset", "x", "Limit", "limit "]),
    st.sampled_from(["=", "", "=="]),
    st.sampled_from(["0", "1", "20", "100", "101", "-1", "+5", "05", "%31", "abc", "", "9" * 11]),
).map("".join)
QUERIES = st.lists(QUERY_PARAMETER, max_size=3).map(lambda parts: "&".join(parts).encode())


async def test_any_query_gets_the_views_answer_or_is_left_to_them(
    uncached: Running, db: Database
) -> None:
    (ann,) = await sign_up(uncached, db, "ann")
    paths = Paths(uncached)
    bearer = ann.headers["Authorization"]

    async def check(query: bytes) -> None:
        passed_on = paths.passed_on
        hot = await asgi_get(paths.hot, f"{API}/", query, authorization=bearer)
        if paths.passed_on == passed_on:  # taken: it must be the view's answer
            same(hot, await asgi_get(paths.quart, f"{API}/", query, authorization=bearer))
        else:
            assert hot[0] in (200, 422), (query, hot)

    @SETTINGS
    @given(QUERIES)
    @example(b"limit=5&offset=0")
    @example(b"limit=101")
    def run(query: bytes) -> None:
        trio.from_thread.run(check, query)

    await drive(run)()
