"""Request and response models: validation at the edge and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from quart import Response
from quart_schema import OpenAPIProvider, document_response
from werkzeug.routing import Rule

from ..core.emails import email_problem
from ..core.roles import Role
from .json import json_response

F = TypeVar("F", bound=Callable[..., Any])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> Callable[[F], F]:
    """Document ``ErrorResponse`` as the body of each of ``statuses`` (OpenAPI)."""

    def decorate(route: F) -> F:
        for status in reversed(statuses):
            route = document_response(ErrorResponse, status)(route)
        return route

    return decorate


# The statuses a kind of route can answer with besides its own (``error_responses``). The
# contract test (tests/test_contract.py) fails on any status a route answers that its
# OpenAPI entry does not list.

SIGNED_IN = (401, 429, 503)
"""Behind ``require_user``: no, a bad or a revoked token (401), the user's rate limit
(429 rate_limited), the database away while the session is looked up (503
database_unavailable)."""

JSON_BODY = (400, 413, 422)
"""With a JSON body: not UTF-8 JSON or nested too deep (400 malformed_json), longer than
MAX_BODY_BYTES (413 payload_too_large), not matching the request model (422
validation_error)."""

BY_ID = (404, 422)
"""With ids in the path: not found or not a member (404), not a UUID (422 invalid_id)."""


class NoContent(BaseModel):
    """The marker of a response without a body (``no_content``)."""


def no_content(route: F) -> F:
    """Document a 204 response without a body (OpenAPI)."""
    return document_response(NoContent, 204)(route)


class BinaryContent(BaseModel):
    """The marker of a response whose body is raw bytes (``binary_content``)."""


def binary_content(route: F) -> F:
    """Document a 200 response whose body is ``application/octet-stream`` (OpenAPI)."""
    return document_response(BinaryContent, 200)(route)


def respond(body: BaseModel, status: int = 200) -> Response:
    """The response for a response model (validated as it was built), as orjson bytes.

    ``model_dump`` keeps UUIDs, datetimes and enums as Python values, so the JSON (and its
    one timestamp format) is written by the same encoder as every other body.
    """
    return json_response(body.model_dump(), status)


class ContractProvider(OpenAPIProvider):
    """quart-schema's OpenAPI document, with bodiless responses (``NoContent``) documented
    without content, raw bytes (``BinaryContent``) as ``application/octet-stream``, and
    every response described by its status's reason phrase."""

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        for operations in paths.values():
            for operation in operations.values():
                responses = dict(sorted(operation["responses"].items()))
                for status, response in responses.items():
                    if not response.get("description"):
                        response["description"] = HTTPStatus(int(status)).phrase
                operation["responses"] = responses
        return paths, components

    def build_response_object(
        self, model: type[Any], headers_model: type[Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if model is NoContent:
            return {"description": HTTPStatus.NO_CONTENT.phrase}, {}
        if model is BinaryContent:
            binary = {"schema": {"type": "string", "format": "binary"}}
            return {
                "description": HTTPStatus.OK.phrase,
                "content": {"application/octet-stream": binary},
            }, {}
        return super().build_response_object(model, headers_model)


def _account_email(value: object) -> object:
    # Before any other check: NUL and friends must be a 422, never reach the database.
    if isinstance(value, str) and (problem := email_problem(value)) is not None:
        raise ValueError(problem)
    return value


AccountEmail = Annotated[str, BeforeValidator(_account_email)]
"""An email naming an existing account: free text, minus what ``email_problem`` refuses."""


class SignupRequest(_Strict):
    email: Annotated[EmailStr, BeforeValidator(_account_email)] = Field(max_length=320)
    password: str = Field(min_length=8, max_length=1024)


class SignupResponse(BaseModel):
    message: str
    user_id: UUID


class LoginRequest(_Strict):
    email: AccountEmail = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class LoginResponse(BaseModel):
    user_id: UUID
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


class RefreshRequest(_Strict):
    refresh_token: str = Field(min_length=1, max_length=4096)


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


class MessageResponse(BaseModel):
    message: str


class UserResponse(BaseModel):
    user_id: UUID
    email: str
    role: str
    created_at: datetime


class HealthResponse(BaseModel):
    status: Literal["ok"]


class DatabaseCheck(BaseModel):
    ok: bool
    error: str | None = None


class SupervisionCheck(BaseModel):
    ok: bool
    down: list[str]


class RedisCheck(BaseModel):
    """The bridge to other processes (present with REDIS_URL). Not ok is ``degraded``,
    not unready: the process still serves its own clients."""

    ok: bool
    state: Literal["connected", "degraded"]
    breaker: Literal["closed", "open", "half_open"]


class ReadyChecks(BaseModel):
    database: DatabaseCheck
    supervision: SupervisionCheck | None = None
    redis: RedisCheck | None = None
    draining: bool | None = None  # present (true) only while the process drains


class ReadyResponse(BaseModel):
    ready: bool
    status: Literal["ready", "degraded", "not_ready"]
    checks: ReadyChecks


class FailureModel(BaseModel):
    type: str
    message: str
    at: str


class ChildModel(BaseModel):
    name: str
    kind: str
    restart: str
    state: str
    restart_count: int
    escalation_count: int = Field(
        description="How often this child, a nested supervisor, gave up and failed upward"
    )
    last_failure: FailureModel | None
    uptime: float | None
    mailbox_depth: int | None
    supervisor: SupervisorModel | None
    detail: dict[str, Any] | None = None  # what the child says of itself (the bridge: state)


class SupervisorModel(BaseModel):
    name: str
    strategy: str
    state: str
    uptime: float
    healthy: bool
    children: list[ChildModel]


ChildModel.model_rebuild()  # it refers to SupervisorModel, defined after it


class SupervisorTreeResponse(BaseModel):
    pid: int = Field(
        description="The process that answered (under run.py --workers, several share a port)"
    )
    supervisor: SupervisorModel | None
    contained_failures: dict[str, int] = Field(
        description="Connections and requests ended by an unexpected exception, by kind"
    )


class OnlineUser(BaseModel):
    user_id: UUID
    connections: int
    last_seen: datetime
    status: Literal["active", "idle"]


class WorkspaceStatusResponse(BaseModel):
    project_id: UUID
    active_collaborators: int
    connections: int
    online_users: list[OnlineUser]
    workspace_url: str
    real_time_events: int
    seq: int


# -- projects, collaborators and the event log --------------------------------------------

Visibility = Literal["private", "team"]


def _project_text(value: str | None, info: ValidationInfo) -> str | None:
    # PostgreSQL text cannot hold NUL; refuse it here rather than fail at the database.
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if info.field_name == "name" and value is not None and not value.strip():
        raise ValueError("must not be blank")
    return value


class ProjectCreateRequest(_Strict):
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)
    visibility: Visibility = "private"

    @field_validator("name", "description")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _project_text(value, info)


class ProjectUpdateRequest(_Strict):
    """Only the fields given change; ``description: null`` clears the description."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)
    visibility: Visibility | None = None

    @field_validator("name", "description")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _project_text(value, info)

    @model_validator(mode="after")
    def _something_to_change(self) -> ProjectUpdateRequest:
        if not self.model_fields_set:
            raise ValueError("give at least one of name, description, visibility")
        for required in ("name", "visibility"):
            if required in self.model_fields_set and getattr(self, required) is None:
                raise ValueError(f"{required} cannot be null")
        return self


class ProjectListQuery(BaseModel):
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)


class ProjectResponse(BaseModel):
    id: UUID
    name: str
    description: str | None
    visibility: Visibility
    owner_id: UUID = Field(description="The primary owner (other members may be owners too)")
    created_at: datetime
    updated_at: datetime
    collaborator_count: int = Field(description="Every member, owners included")
    status: Literal["active"]
    role: Role = Field(description="The caller's role in this project")
    workspace_url: str


class ProjectListResponse(BaseModel):
    projects: list[ProjectResponse]
    total: int
    limit: int
    offset: int
    cached: bool = Field(description="Served from the per-user cache")
    cache_expires_at: datetime | None = Field(
        description="When the served cache entry expires; null when not served from cache"
    )


class CollaboratorAddRequest(_Strict):
    """Exactly one of ``user_id`` and ``email`` names the user to add."""

    user_id: UUID | None = None
    email: AccountEmail | None = Field(default=None, min_length=1, max_length=320)
    role: Role = Role.COLLABORATOR

    @model_validator(mode="after")
    def _exactly_one_user(self) -> CollaboratorAddRequest:
        if (self.user_id is None) == (self.email is None):
            raise ValueError("give exactly one of user_id and email")
        return self


class Collaboration(BaseModel):
    user_id: UUID
    project_id: UUID
    role: Role
    invited_at: datetime
    invited_by: UUID | None = Field(description="Who added the member; null for the creator")


class CollaboratorAddedResponse(BaseModel):
    message: str
    collaboration: Collaboration


class CollaboratorResponse(BaseModel):
    user_id: UUID
    email: str
    role: Role
    invited_at: datetime
    invited_by: UUID | None


class CollaboratorListResponse(BaseModel):
    project_id: UUID
    collaborators: list[CollaboratorResponse]
    total: int


class RoleChangeRequest(_Strict):
    role: Role


class EventListQuery(BaseModel):
    since_seq: int = Field(default=0, ge=0, le=2**63 - 1)
    limit: int = Field(default=100, ge=1, le=1000)


class EventResponse(BaseModel):
    project_id: UUID
    seq: int
    type: str
    actor_id: UUID | None
    payload: dict[str, Any]
    created_at: datetime


class EventListResponse(BaseModel):
    project_id: UUID
    events: list[EventResponse]
    next_seq: int = Field(description="Pass as since_seq to read on")
    last_seq: int = Field(description="The project's latest seq when read")
    has_more: bool
    oldest_seq: int | None = Field(
        description="The oldest seq the log still holds (older ones were pruned); null: none"
    )
    truncated: bool = Field(description="Events after since_seq were pruned (retention)")
