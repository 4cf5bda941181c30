"""Unmodified Yjs clients (npm ``yjs`` + ``y-websocket``) on two real ``run.py`` processes
sharing PostgreSQL and Redis type into one document while Redis is restarted empty and
one process is SIGKILLed and restarted: every replica, every client and REST agree."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import trio
from node_clients import node_modules, open_yclient
from redis_server import RedisServer
from served import Served, start_serving
from test_cluster import process_env, wait_bridged
from test_documents_node import (
    _free_port,
    chars,
    project_with_collaborator,
    ticket,
    type_together,
)

__all__ = ["node_modules"]
pytestmark = pytest.mark.usefixtures("node_modules")

CAP = 60.0


def doc_ws_url(served: Served) -> str:
    return served.url.replace("http://", "ws://") + "/ws/documents"


async def test_clients_on_two_processes_converge_through_a_redis_restart_and_a_sigkill(
    tmp_path: Path, database_url: str, own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    fast = {"DOC_UPDATES_PER_SECOND": "100000"}
    port_a = _free_port()  # A comes back on its port: its client's provider reconnects there
    env_a = {**process_env(tmp_path, "a", database_url, own_redis.url), "PORT": str(port_a), **fast}
    env_b = {**process_env(tmp_path, "b", database_url, own_redis.url), **fast}
    started: dict[str, Served] = {}

    async def serve(name: str, env: dict[str, str]) -> None:
        started[name] = await start_serving(nursery, env, stderr=subprocess.DEVNULL)

    async with trio.open_nursery() as starting:  # both at once: a start takes seconds
        starting.start_soon(serve, "a", env_a)
        starting.start_soon(serve, "b", env_b)
    a, b = started["a"], started["b"]
    restarted: Served | None = None
    try:
        await wait_bridged(a.url)
        await wait_bridged(b.url)
        async with httpx.AsyncClient(base_url=a.url) as http:
            project_id, owner, collab = await project_with_collaborator(http, "Two")
            one = await ticket(http, project_id, owner, "/two.md")
        async with httpx.AsyncClient(base_url=b.url) as http:
            two = await ticket(http, project_id, collab, "/two.md")
        room = one["room"]
        with trio.fail_after(CAP):
            async with (
                open_yclient(nursery, doc_ws_url(a), room, one["ticket"], "on_a") as on_a,
                open_yclient(nursery, doc_ws_url(b), room, two["ticket"], "on_b") as on_b,
            ):
                await on_a.wait_synced()
                await on_b.wait_synced()
                typed_a, typed_b = chars(0x4E00, 30), chars(0x4E00 + 100, 30)
                await type_together(on_a, typed_a, on_b, typed_b, 3)
                # Each sees the other's typing: it crossed processes.
                await on_a.wait_contains(typed_b)
                await on_b.wait_contains(typed_a)

                # Redis is killed and comes back empty while both type.
                more_a, more_b = chars(0x3041, 30), chars(0x30A1, 30)
                async with trio.open_nursery() as typing:
                    typing.start_soon(type_together, on_a, more_a, on_b, more_b, 3)
                    own_redis.stop(kill=True)
                    own_redis.start()
                await on_a.wait_contains(more_b)
                await on_b.wait_contains(more_a)

                # A is SIGKILLed while both type; B's client goes on, A's types offline.
                last_a, last_b = chars(0x0410, 20), chars(0x05D0, 20)
                async with trio.open_nursery() as typing:
                    typing.start_soon(type_together, on_a, last_a, on_b, last_b, 3)
                    a.process.send_signal(signal.SIGKILL)
                    await a.process.wait()
                await on_a.wait_for("close")
                restarted = await start_serving(nursery, env_a, stderr=subprocess.DEVNULL)
                everything = typed_a + typed_b + more_a + more_b + last_a + last_b
                text_a = await on_a.wait_contains(everything)
                text_b = await on_b.wait_contains(everything)
                assert text_a == text_b and sorted(text_a) == sorted(everything)
                async with httpx.AsyncClient(base_url=b.url) as http:
                    three = await ticket(http, project_id, owner, "/two.md")
                    r = await http.get(
                        f"/api/v1/projects/{project_id}/documents/{room}/text",
                        headers=owner.auth,
                    )
                assert r.status_code == 200, r.text
                assert r.json()["text"] == text_a
                async with open_yclient(nursery, doc_ws_url(restarted), room, three["ticket"]) as c:
                    assert await c.wait_contains(everything) == text_a
                async with httpx.AsyncClient(base_url=restarted.url) as http:
                    r = await http.get(
                        f"/api/v1/projects/{project_id}/documents/{room}/text",
                        headers=owner.auth,
                    )
                assert r.json()["text"] == text_a
    finally:
        for served in (a, b, restarted):
            if served is not None and served.process.returncode is None:
                served.process.terminate()
