"""The long-lived objects of one database pool, built together in one place.

``build_services`` is the one constructor: the composition root (``atrium.runtime.root``) calls it
when the ``database`` child has opened its pool and hands the result down, typed, to the
children that serve (HTTP, the WebSocket listener, the workspace supervisor, the pruner).
A new pool (the ``database`` child restarted) gets a new ``Services``, and under the
root's ``rest_for_one`` every child after it restarts onto it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from ..actors.bridge import Bridge
from ..actors.document import DocumentSettings
from ..actors.workspace import WorkspaceSettings
from ..core.config import Settings
from ..core.events import Event, EventPublisher
from ..core.failures import ContainedFailures
from ..core.metrics import Metrics
from ..identity.admission import Admission, LocalAdmission, SharedAdmission
from ..identity.cache import MemoryUserCache, SharedUserCache, UserCache
from ..identity.passwords import Passwords
from ..identity.ratelimit import (
    LoginBackoff,
    MemoryLoginBackoff,
    MemoryRateLimiter,
    RateLimiter,
    SharedLoginBackoff,
    SharedRateLimiter,
)
from ..identity.sessions import LocalSessionEnds, SessionEnds, SharedSessionEnds
from ..identity.tickets import TicketCodec
from ..identity.tokens import TokenCodec, VerifiedTokens
from ..jobs import JobEvents, JobQueue, JobService, JobSettings, RetryPolicy
from ..persistence.database import Database
from ..persistence.redis import Redis
from ..persistence.shared import Generations, LoginFailures, RateWindows, Scripts
from ..realtime.cluster import Cluster
from ..realtime.presence import ClusterPresence, LocalPresence, PresenceSettings
from ..supervision import Supervisor
from ..tasks import load_task_modules
from .accounts import Accounts
from .document_activity import DocumentActivity
from .document_content import DocumentContent
from .document_sessions import DocumentConnectionSettings, DocumentSessions
from .documents import Documents
from .projects import Projects
from .realtime import ConnectionSettings, Realtime
from .workspaces import Workspaces


@dataclass(frozen=True, slots=True)
class Services:
    """What request handlers and connections use; every field is set at construction.

    ``clock`` (wall-clock seconds) drives rate-limit windows and cache expiry; tests
    substitute their own. ``project_cache`` holds each user's project-list pages;
    ``session_cache`` remembers live sessions for SESSION_CACHE_SECONDS; ``admission``
    checks an authenticated request's session and counts it against the user's rate
    limit (with Redis, in one round trip when the session is cached); ``passwords``
    bounds argon2 work process-wide; ``login_backoff`` slows logins to an email that keeps
    failing; ``failures`` counts the requests and connections that ended in an unexpected
    exception. ``accounts`` (signup, login, refresh, logout, signing a request in),
    ``projects`` and ``workspaces`` are the application services;
    ``realtime`` serves workspace WebSockets; ``supervisor`` is the process's root (None
    for an app built outside a supervision tree, as some tests do); ``jobs`` submits and
    manages background jobs (its ``queue`` is what the ``jobs`` subtree runs);
    ``draining`` is set once the process is shutting down (``/ready`` then answers 503).
    ``metrics`` is the process's Prometheus metrics (``atrium.core.metrics``).
    ``documents`` is the registry of live documents (what the ``documents`` child runs);
    ``document_sessions`` issues document tickets and serves document WebSockets;
    ``document_activity`` turns document edits into coalesced DOCUMENT_EDITED events (run
    by the ``documents`` child); ``document_content`` serves documents over REST.
    ``session_ends`` closes a revoked session's WebSockets (on every process, with
    Redis); ``cluster`` (with Redis) is what the ``cluster`` child runs: the presence
    heartbeat and reaper, and the revocation listener.
    ``bridge`` relays live workspace traffic to and from other processes through
    ``redis`` (both None without REDIS_URL).
    """

    settings: Settings
    db: Database
    tokens: TokenCodec
    verified_tokens: VerifiedTokens
    limiter: RateLimiter
    clock: Callable[[], float]
    project_cache: UserCache
    session_cache: UserCache
    admission: Admission
    passwords: Passwords
    login_backoff: LoginBackoff
    failures: ContainedFailures
    accounts: Accounts
    projects: Projects
    workspaces: Workspaces
    realtime: Realtime
    supervisor: Supervisor | None
    jobs: JobService
    draining: trio.Event
    metrics: Metrics
    session_ends: SessionEnds
    documents: Documents
    document_sessions: DocumentSessions
    document_activity: DocumentActivity
    document_content: DocumentContent
    cluster: Cluster | None = None
    bridge: Bridge | None = None
    redis: Redis | None = None


def job_settings(settings: Settings) -> JobSettings:
    """How this process runs jobs, from its settings."""
    lease = settings.job_lease_seconds
    return JobSettings(
        concurrency=settings.worker_concurrency,
        max_running_per_user=settings.job_max_running_per_user,
        max_queued_per_user=settings.job_max_queued_per_user,
        lease_seconds=lease,
        default_timeout=settings.job_timeout_seconds,
        default_max_retries=settings.max_job_retries,
        retention_days=settings.job_retention_days,
        poll_seconds=min(1.0, lease / 3),
        drain_seconds=min(5.0, lease / 2),
        retry=RetryPolicy(),
        max_payload_bytes=settings.job_max_payload_bytes,
        max_result_bytes=settings.job_max_result_bytes,
        worker_memory_mb=settings.job_worker_memory_mb,
    )


def workspace_settings(settings: Settings) -> WorkspaceSettings:
    return WorkspaceSettings(
        resume_max_events=settings.resume_max_events,
        idle_timeout=settings.workspace_idle_seconds,
        # A batch of edits reaches every outbox at once: keep it well inside a
        # connection's queue, so a burst is never taken for a slow consumer.
        edit_batch=max(1, min(64, settings.ws_send_queue // 8)),
    )


def document_settings(settings: Settings) -> DocumentSettings:
    return DocumentSettings(
        max_update_bytes=settings.doc_max_update_bytes,
        max_document_bytes=settings.doc_max_bytes,
        idle_timeout=settings.doc_idle_seconds,
        compact_after=settings.doc_compact_after,
    )


def build_services(
    settings: Settings,
    db: Database,
    *,
    clock: Callable[[], float] = time.time,
    failures: ContainedFailures | None = None,
    supervisor: Supervisor | None = None,
    draining: trio.Event | None = None,
    publisher: EventPublisher | None = None,
    project_cache: UserCache | None = None,
    metrics: Metrics | None = None,
    bridge: Bridge | None = None,
) -> Services:
    """Assemble the services for ``settings`` on an open database.

    Project events go to this pool's live workspaces unless ``publisher`` says otherwise;
    ``project_cache`` replaces the in-memory project-list cache (tests pass both).
    ``metrics`` is the process's (the root makes one that outlives a new pool); without
    it the services count into a registry of their own. ``bridge`` (REDIS_URL set) is
    the workspaces' relay to other processes; with its Redis, rate limits, login backoff,
    both caches, presence and session revocation are shared with every process using it
    (``_Shared``).
    """
    if metrics is None:
        metrics = Metrics()
    codec = TokenCodec(
        secret=settings.secret_key,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl_seconds=settings.access_token_expire_minutes * 60,
        refresh_ttl_seconds=settings.refresh_token_expire_days * 86400,
    )
    if failures is None:
        failures = ContainedFailures()
    redis = None if bridge is None else bridge.redis
    shared = None if redis is None else _Shared(settings, db, redis, clock)
    if project_cache is None:
        ttl = settings.project_cache_ttl_seconds
        project_cache = (
            MemoryUserCache(ttl, clock) if shared is None else shared.cache("projects", ttl)
        )
    # Other processes' appends to live documents, announced on the log that the
    # workspaces follow, go to the documents open here.
    document_notices, notices = trio.open_memory_channel[tuple[uuid.UUID, int | None]](1024)
    workspaces = Workspaces(
        db,
        workspace_settings(settings),
        count_deliveries=metrics.ws_deliveries.inc,
        relay=bridge,
        count_gap_fills=metrics.workspace_gap_fills.inc,
        presence=LocalPresence() if shared is None else shared.presence,
        document_notices=document_notices,
    )
    load_task_modules(settings.job_task_modules)
    jobs = JobQueue(job_settings(settings), database=lambda: db, clock=clock, metrics=metrics)
    realtime = Realtime(
        db=db,
        tokens=codec,
        workspaces=workspaces,
        allowed_origins=settings.allowed_origins,
        settings=ConnectionSettings.of(settings),
        failures=failures,
        metrics=metrics,
    )
    # Document activity is neither a membership nor a deletion: the document sockets need
    # not see it, only the workspaces.
    document_activity = DocumentActivity(
        db, workspaces if publisher is None else publisher, settings.doc_activity_seconds
    )
    documents = Documents(
        db,
        document_settings(settings),
        on_edit=document_activity.note,
        relay=bridge,
        notify_log=workspaces.notifies,
        notices=notices,
    )
    document_sessions = DocumentSessions(
        db=db,
        tickets=TicketCodec(
            secret=settings.secret_key,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_seconds=settings.doc_ticket_seconds,
        ),
        documents=documents,
        realtime=realtime,
        settings=DocumentConnectionSettings.of(settings),
        clock=clock,
    )
    # Committed project events reach the live workspaces, then the document sockets (a
    # member removed is disconnected from both), then the open documents' actors (which
    # drop a removed member's peers in mailbox order: nothing they queued is applied).
    publish = _Publishers(
        (workspaces if publisher is None else publisher, document_sessions, documents)
    )
    cluster = None if shared is None else shared.cluster(realtime)
    limiter: RateLimiter
    session_cache: UserCache
    admission: Admission
    if shared is None:
        limiter = MemoryRateLimiter(clock)
        session_cache = MemoryUserCache(settings.session_cache_seconds, clock)
        admission = LocalAdmission(session_cache, limiter)
    else:
        limiter, session_cache, admission = shared.admission(settings.session_cache_seconds)
    verified_tokens = VerifiedTokens(codec)
    passwords = Passwords(settings.password_hash_concurrency, settings.password_hash_queue_seconds)
    login_backoff = _login_backoff(settings, clock) if shared is None else shared.backoff()
    session_ends = LocalSessionEnds(realtime) if cluster is None else cluster.session_ends
    return Services(
        settings=settings,
        db=db,
        tokens=codec,
        verified_tokens=verified_tokens,
        limiter=limiter,
        clock=clock,
        project_cache=project_cache,
        session_cache=session_cache,
        admission=admission,
        passwords=passwords,
        login_backoff=login_backoff,
        failures=failures,
        accounts=Accounts(
            settings=settings,
            db=db,
            tokens=codec,
            verified_tokens=verified_tokens,
            limiter=limiter,
            passwords=passwords,
            login_backoff=login_backoff,
            admission=admission,
            session_cache=session_cache,
            session_ends=session_ends,
        ),
        projects=Projects(db, project_cache, publish),
        workspaces=workspaces,
        realtime=realtime,
        supervisor=supervisor,
        jobs=JobService(jobs, JobEvents(publish, workspaces)),
        draining=trio.Event() if draining is None else draining,
        metrics=metrics,
        session_ends=session_ends,
        documents=documents,
        document_sessions=document_sessions,
        document_activity=document_activity,
        document_content=DocumentContent(db, documents),
        cluster=cluster,
        bridge=bridge,
        redis=redis,
    )


@dataclass(frozen=True, slots=True)
class _Publishers:
    """An ``EventPublisher`` that hands committed events to each of ``targets`` in turn."""

    targets: tuple[EventPublisher, ...]

    async def publish(self, project_id: uuid.UUID, events: Sequence[Event]) -> None:
        for target in self.targets:
            await target.publish(project_id, events)


# -- shared state (REDIS_URL) ---------------------------------------------------------------


def _login_backoff(settings: Settings, clock: Callable[[], float]) -> MemoryLoginBackoff:
    return MemoryLoginBackoff(
        settings.login_backoff_after_failures, settings.login_backoff_max_seconds, clock
    )


class _Shared:
    """The Redis-backed parts of one ``Services``: each falls back to this process's own
    state while Redis cannot be reached."""

    def __init__(
        self, settings: Settings, db: Database, redis: Redis, clock: Callable[[], float]
    ) -> None:
        self.settings, self.db, self.redis, self.clock = settings, db, redis, clock
        self.scripts = Scripts(redis)  # one queue: concurrent requests share round trips
        self.presence = ClusterPresence(
            redis,
            db,
            PresenceSettings(settings.presence_heartbeat_seconds, settings.presence_ttl_seconds),
        )

    def cache(self, name: str, ttl_seconds: float) -> SharedUserCache:
        return SharedUserCache(
            Generations(self.scripts, name, ttl_seconds), ttl_seconds, self.clock
        )

    def admission(
        self, session_ttl: float
    ) -> tuple[SharedRateLimiter, SharedUserCache, SharedAdmission]:
        """The rate limiter, the session cache, and the admission that asks Redis about
        both at once."""
        limiter = SharedRateLimiter(
            RateWindows(self.scripts), MemoryRateLimiter(self.clock), self.clock
        )
        sessions = self.cache("sessions", session_ttl)
        return limiter, sessions, SharedAdmission(sessions, limiter)

    def backoff(self) -> LoginBackoff:
        fallback = _login_backoff(self.settings, self.clock)
        return SharedLoginBackoff(
            LoginFailures(self.scripts),
            fallback,
            self.settings.login_backoff_after_failures,
            self.settings.login_backoff_max_seconds,
            self.clock,
        )

    def cluster(self, realtime: Realtime) -> Cluster:
        return Cluster(self.presence, SharedSessionEnds(self.redis, self.db, realtime))
