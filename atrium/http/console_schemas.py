"""Response models of the operator console's endpoints (``/ops/...``, see console.py)."""

from __future__ import annotations

from uuid import UUID

from pydantic import BaseModel, Field

from .job_schemas import JobStatusResponse


class WorkspaceUser(BaseModel):
    user_id: UUID
    email: str
    role: str = Field(description="Their role in the project when they connected")
    connections: int = Field(description="Their connections to this workspace here")


class WorkspaceOverview(BaseModel):
    project_id: UUID
    connections: int
    users: list[WorkspaceUser]
    seq: int = Field(description="The last seq of the project's log this workspace has seen")
    real_time_events: int = Field(description="Messages broadcast since it started")
    mailbox_depth: int
    processed: int = Field(description="Messages its actor handled since it started")


class WorkspacesResponse(BaseModel):
    total: int = Field(description="Workspaces running in this process")
    connections: int = Field(description="Connections to them, all together")
    workspaces: list[WorkspaceOverview] = Field(description="The most connected first")


class DocumentOverview(BaseModel):
    document_id: UUID
    project_id: UUID
    path: str
    peers: int = Field(description="Connections to this document here")
    users: int = Field(description="Distinct users among them")
    seq: int = Field(description="The seq of the document's last stored update")
    snapshot_seq: int = Field(description="The seq its latest snapshot holds updates up to")
    stored_bytes: int = Field(description="Bytes stored: the snapshot plus the updates after it")
    updates_applied: int = Field(description="Updates stored since the actor started")
    mailbox_depth: int


class DocumentsResponse(BaseModel):
    total: int = Field(description="Live documents open in this process")
    peers: int = Field(description="Connections to them, all together")
    documents: list[DocumentOverview] = Field(description="The most connected first")


class OpsListQuery(BaseModel):
    limit: int = Field(default=100, ge=1, le=500)


class JobCountsModel(BaseModel):
    queued: int
    running: int
    failed: int = Field(description="Waiting for a retry")
    dead: int
    cancelled: int


class OpsJobsResponse(BaseModel):
    by_state: JobCountsModel = Field(description="Jobs by state, across all processes")
    completed_recent: int = Field(description="Jobs completed within the last 5 minutes")
    dead: list[JobStatusResponse] = Field(
        description="Dead jobs of every user and project, most recently dead first"
    )


class Percentiles(BaseModel):
    p50: float
    p95: float
    p99: float


class HttpFigures(BaseModel):
    requests: int
    server_errors: int = Field(description="5xx answers")
    client_errors: int = Field(description="4xx answers")
    latency_seconds: Percentiles | None = Field(
        description="Over the last 5 minutes; null when no request was answered in them"
    )


class WebSocketFigures(BaseModel):
    open: dict[str, int] = Field(description="Open connections by transport")
    frames_in: int
    frames_out: int
    deliveries: int
    slow_consumer_closes: int


class WorkspaceFigures(BaseModel):
    running: int | None
    mailbox_depth: int | None


class DatabaseFigures(BaseModel):
    pool_connections: int | None
    pool_in_use: int | None
    query_latency_seconds: Percentiles | None = Field(
        description="Over the last 5 minutes; null when no query ran in them"
    )


class CacheFigures(BaseModel):
    hits: int
    misses: int
    hit_ratio: float | None


class JobFigures(BaseModel):
    by_state: dict[str, int]
    completed_recent: int


class SupervisionFigures(BaseModel):
    restarts: int
    escalations: int


class MetricsSummaryResponse(BaseModel):
    """This process's key figures: totals since it started, live gauges, and latency
    percentiles of the last 5 minutes estimated from the histograms' buckets."""

    http: HttpFigures
    websockets: WebSocketFigures
    workspaces: WorkspaceFigures
    documents: WorkspaceFigures = Field(description="Live document actors, as workspaces")
    database: DatabaseFigures
    project_cache: CacheFigures
    jobs: JobFigures
    supervision: SupervisionFigures
