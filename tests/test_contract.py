"""The OpenAPI document is an exact contract: a schema fuzzer proves it against the server.

schemathesis reads ``/openapi.json`` from the real server (port 0, started as run.py
does) and generates requests for every operation from it: valid ones (positive) and
invalid ones (negative: wrong types, missing fields, no or a broken token), with a
logged-in user's token, on generated ids and on the ids of a real project, member and job;
job submissions also get bodies from each task's payload strategy (tests/job_payloads.py).
Every body route also gets a body that is not JSON and one over MAX_BODY_BYTES. Each
response must be no 5xx, carry a status the document lists for that operation, and have
a body and content type matching the schema documented for that status.

How it runs: schemathesis's client is synchronous (requests), so the test hands a worker
thread to it (``trio.to_thread.run_sync``) while the test's trio loop serves. Every
operation is fuzzed to the end and all distinct failures are reported together, so one
run names everything that drifted. Logout is left out: it would revoke the fuzzing
session; deletions run last, so the real project serves the other operations first.
``CONTRACT_EXAMPLES`` (an environment variable, default 10 examples per operation) runs
a longer profile: ``CONTRACT_EXAMPLES=300 python -m pytest tests/test_contract.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import schemathesis
import trio
from conftest import Running, StartServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from job_payloads import job_bodies, known_job_bodies
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from atrium.core.roles import Role
from atrium.http.json import dumps_bytes
from atrium.http.schemas import CollaboratorResponse, UserResponse, respond

EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SKIPPED = {("POST", "/api/v1/auth/logout")}  # it would end the fuzzing session
MAX_BODY_BYTES = 65_536
SERVER_OPTIONS = {
    "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE": "100000",
    "LOGIN_BACKOFF_AFTER_FAILURES": "100000",
}
# Bodies no generator writes: cut-off JSON, and one longer than MAX_BODY_BYTES.
RAW_BODIES = (b'{"name": "cut', b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}')


@dataclass
class Fuzzer:
    """Sends cases to the server and collects distinct failures (one per operation and
    kind of failure, with the first response that showed it)."""

    base_url: str
    auth: dict[str, str]
    ids: dict[str, str]
    bodies: dict[tuple[str, str], st.SearchStrategy[Any]] = field(default_factory=dict)
    """Bodies of one operation (method, path) beyond what its schema generates."""
    known_bodies: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    """Bodies always sent to one operation (method, path), before the generated ones."""
    http: requests.Session = field(default_factory=requests.Session)
    failures: dict[str, str] = field(default_factory=dict)
    calls: int = 0

    def check(self, case: Case, **body: Any) -> None:
        """Send ``case`` (or, with ``data=``, its raw body instead) and validate the answer."""
        self.calls += 1
        response = case.call(base_url=self.base_url, session=self.http, headers=self.auth, **body)
        try:
            case.validate_response(response, checks=CHECKS, headers=self.auth)
        except FailureGroup as group:
            for failure in group.exceptions:
                self.failed(case.operation.label, failure.title, failure.message)

    def failed(self, operation: str, title: str, detail: str) -> None:
        self.failures.setdefault(f"{operation}: {title}", detail[:600])

    def fuzz(self, operation: APIOperation) -> None:
        """Generated cases, valid and invalid, on generated and on real ids."""
        known = {p.name: self.ids[p.name] for p in operation.path_parameters if p.name in self.ids}
        strategies = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(generation_mode=mode))
            if known:
                strategies.append(
                    operation.as_strategy(generation_mode=mode, path_parameters=known)
                )
        key = (operation.method.upper(), operation.path)
        for body in self.known_bodies.get(key, []):
            self.check(operation.Case(body=body, media_type="application/json"))
        self.run(operation.label, st.one_of(strategies), self.check)
        bodies = self.bodies.get(key)
        if bodies is not None:  # examples of their own: the schema's would crowd them out
            self.run(
                f"{operation.label} (bodies)",
                bodies.map(lambda body: operation.Case(body=body, media_type="application/json")),
                self.check,
            )

    def raw_bodies(self, operation: APIOperation) -> None:
        """The bodies in ``RAW_BODIES``, on real ids (random UUIDs for the others)."""
        ids = {p.name: self.ids.get(p.name, str(uuid.uuid4())) for p in operation.path_parameters}
        for raw in RAW_BODIES:
            case = operation.Case(path_parameters=ids, media_type="application/json")
            headers = {**self.auth, "Content-Type": "application/json"}
            self.calls += 1
            response = case.call(
                base_url=self.base_url, session=self.http, headers=headers, data=raw
            )
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as group:
                for failure in group.exceptions:
                    self.failed(operation.label, f"raw body, {failure.title}", failure.message)

    def run(self, label: str, strategy: Any, check: Callable[[Case], None]) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,  # no example database written into the work tree
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def examples(case: Case) -> None:
            check(case)

        try:
            examples()
        except Exception as error:  # not a check failure (a connection reset, say): report it
            self.failed(label, type(error).__name__, str(error))

    def report(self) -> str:
        return "\n\n".join(f"{key}\n{detail}" for key, detail in sorted(self.failures.items()))


def fuzz_all(raw_schema: dict[str, Any], fuzzer: Fuzzer) -> None:
    """Every operation of the document but ``SKIPPED``, deletions last (a worker thread)."""
    schema = schemathesis.openapi.from_dict(raw_schema)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda operation: (operation.method.upper() == "DELETE", operation.path))
    for operation in operations:
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        fuzzer.fuzz(operation)
        if operation.body:
            fuzzer.raw_bodies(operation)


@pytest.mark.long
async def test_every_response_matches_the_openapi_document(start_server: StartServer) -> None:
    async with start_server(**SERVER_OPTIONS) as server:
        owner = await server.signup_login("contract-owner@example.com")
        member = await server.signup_login("contract-member@example.com")
        auth = {"Authorization": f"Bearer {owner['access_token']}"}
        r = await server.client.post("/api/v1/projects/", json={"name": "contract"}, headers=auth)
        assert r.status_code == 201, r.text
        project_id = r.json()["id"]
        r = await server.client.post(
            f"/api/v1/projects/{project_id}/collaborators",
            json={"user_id": member["user_id"]},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        job = {"task_name": "data_processing", "payload": {"csv": "a\n1\n"}}
        r = await server.client.post("/api/v1/jobs/run", json=job, headers=auth)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        r = await server.client.post(
            f"/api/v1/projects/{project_id}/documents",
            json={"path": "/src/app.py", "text": "print('contract')\n"},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        document_id = r.json()["room"]
        document = (await server.client.get("/openapi.json")).json()

        ids = {
            "project_id": project_id,
            "user_id": member["user_id"],
            "job_id": job_id,
            "document_id": document_id,
        }
        # The job payload's schema is the task's (GET /api/v1/jobs/tasks), not the document's.
        run = ("POST", "/api/v1/jobs/run")
        fuzzer = Fuzzer(
            server.bound.url,
            auth,
            ids,
            bodies={run: job_bodies(project_id)},
            known_bodies={run: known_job_bodies(project_id)},
        )
        await trio.to_thread.run_sync(fuzz_all, document, fuzzer)
        assert fuzzer.calls > 0
        assert not fuzzer.failures, (
            f"{len(fuzzer.failures)} failures in {fuzzer.calls} calls\n{fuzzer.report()}"
        )


async def test_a_response_model_writes_the_bytes_a_hand_built_dict_did() -> None:
    """Same field order, UUIDs as strings, enums as values, one "...Z" timestamp format."""
    user_id = uuid.uuid4()
    at = datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)
    user = UserResponse(user_id=user_id, email="a@example.com", role="user", created_at=at)
    assert await respond(user).get_data() == dumps_bytes(
        {"user_id": user_id, "email": "a@example.com", "role": "user", "created_at": at}
    )
    member = CollaboratorResponse(
        user_id=user_id, email="a@example.com", role=Role.VIEWER, invited_at=at, invited_by=None
    )
    body = await respond(member, 201).get_data()
    assert (
        body
        == (
            f'{{"user_id":"{user_id}","email":"a@example.com","role":"viewer",'
            '"invited_at":"2026-01-02T03:04:05.000600Z","invited_by":null}'
        ).encode()
    )


async def test_the_document_lists_what_a_route_answers(server: Running) -> None:
    document = (await server.client.get("/openapi.json")).json()
    paths = document["paths"]
    deleted = paths["/api/v1/projects/{project_id}"]["delete"]["responses"]
    assert list(deleted) == ["204", "401", "403", "404", "422", "429", "503"]
    assert deleted["204"] == {"description": "No Content"}  # no body
    login = paths["/api/v1/auth/login"]["post"]["responses"]
    assert list(login) == ["200", "400", "401", "413", "422", "429", "503"]
    assert login["413"]["description"] == "Request Entity Too Large"
