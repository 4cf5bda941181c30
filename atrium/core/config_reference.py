"""The configuration reference: one row for every variable ``load_settings`` reads.

docs/CONFIGURATION.md is written from these rows and nothing else
(``python -m atrium.core.config_reference > docs/CONFIGURATION.md``), and the suite fails when
the two differ or when ``load_settings`` reads a variable that has no row here. The rows are
kept apart from ``config.py`` so the settings model can change shape without the reference
moving: a default changed there is a row to change here, and the test names it.
Links in ``meaning`` are relative to ``docs/``.
"""

from __future__ import annotations

import sys
from typing import NamedTuple


class EnvVar(NamedTuple):
    """Variables documented together (``HOST`` / ``PORT``), their default and meaning
    (Markdown)."""

    names: tuple[str, ...]
    default: str
    meaning: str


ENVIRONMENT_VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(
        ("ENVIRONMENT",),
        "`development`",
        "`development`, `test` or `production`.",
    ),
    EnvVar(
        ("SECRET_KEY",),
        "generated (dev)",
        (
            "JWT signing key. **Required in production**: 32+ characters, not a "
            "known placeholder, not a repeated unit, an estimated 128+ bits (see "
            "[Accounts and login](SECURITY.md#accounts-and-login)). In development "
            "a random key is generated once and kept in `DATA_DIR/secret_key` (mode"
            " 600), so tokens survive a restart."
        ),
    ),
    EnvVar(
        ("HOST", "PORT"),
        "`127.0.0.1` / `8000`",
        "Where the HTTP API listens (`PORT=0`: any free port).",
    ),
    EnvVar(
        ("DATA_DIR",),
        "`./.atrium`",
        "Embedded PostgreSQL data (`pg/`) and the development key.",
    ),
    EnvVar(
        ("DATABASE_URL",),
        "unset",
        ("`postgresql://...` of an external server. Unset: embedded PostgreSQL in `DATA_DIR`."),
    ),
    EnvVar(
        ("DB_POOL_SIZE",),
        "`20`",
        "Maximum connections in the asyncpg pool.",
    ),
    EnvVar(
        ("REDIS_URL",),
        "unset",
        (
            "Redis for running several instances (see [Many "
            "instances](OPERATIONS.md#many-instances)): workspace events, cursors "
            "and job progress cross between processes through it. Unset: one "
            "instance, PostgreSQL only."
        ),
    ),
    EnvVar(
        ("REDIS_SENTINELS",),
        "unset",
        (
            "Instead of `REDIS_URL`: the Sentinels that watch Redis, "
            "`host:port,host:port,...` (`[::1]:26379` for IPv6). atrium asks them "
            "where the master is and follows it through a failover (see "
            "[docs/REDIS.md](REDIS.md#sentinel-failover-and-tls)). Setting both is "
            "an error."
        ),
    ),
    EnvVar(
        ("REDIS_SENTINEL_MASTER",),
        "unset",
        (
            "With `REDIS_SENTINELS` (required): the name the Sentinels know the "
            "master by (`sentinel monitor NAME ...`)."
        ),
    ),
    EnvVar(
        ("REDIS_USERNAME", "REDIS_PASSWORD"),
        "unset",
        (
            "With `REDIS_SENTINELS`: the master's ACL user and password (a "
            "`REDIS_URL` carries its own)."
        ),
    ),
    EnvVar(
        ("REDIS_SENTINEL_PASSWORD",),
        "unset",
        (
            "With `REDIS_SENTINELS`: the Sentinels' own password (`requirepass` in "
            "their configuration), if they have one."
        ),
    ),
    EnvVar(
        ("REDIS_TLS",),
        "`false`",
        (
            "With `REDIS_SENTINELS`: TLS to the Sentinels and the master (a "
            "`REDIS_URL` says it with `rediss://`)."
        ),
    ),
    EnvVar(
        ("REDIS_TLS_CA_FILE",),
        "unset",
        (
            "With a `rediss://` URL or `REDIS_TLS`: the CA certificate (PEM) that "
            "signed the servers' certificates. Unset: the system's CAs."
        ),
    ),
    EnvVar(
        ("REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"),
        "unset",
        (
            "With a `rediss://` URL or `REDIS_TLS`: this client's certificate and "
            "key (PEM, both or neither), for a Redis that asks for one "
            "(`tls-auth-clients`, redis-server's default)."
        ),
    ),
    EnvVar(
        ("ACCESS_TOKEN_EXPIRE_MINUTES",),
        "`30`",
        "Lifetime of access tokens.",
    ),
    EnvVar(
        ("REFRESH_TOKEN_EXPIRE_DAYS",),
        "`7`",
        "Lifetime of refresh tokens.",
    ),
    EnvVar(
        ("RATE_LIMIT_PER_MINUTE",),
        "`60`",
        "Authenticated API calls per user per minute.",
    ),
    EnvVar(
        ("AUTH_RATE_LIMIT_PER_MINUTE",),
        "`5`",
        ("Login attempts per (client address, email) pair per minute; signups per address."),
    ),
    EnvVar(
        ("AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE",),
        "4 x `AUTH_RATE_LIMIT_PER_MINUTE`",
        "Login attempts per client address per minute, any emails.",
    ),
    EnvVar(
        ("LOGIN_BACKOFF_AFTER_FAILURES",),
        "`5`",
        ("Failed logins for one email (from any address) before each further attempt must wait."),
    ),
    EnvVar(
        ("LOGIN_BACKOFF_MAX_SECONDS",),
        "`30`",
        "Cap of that wait (it doubles from 1 s per further failure).",
    ),
    EnvVar(
        ("PASSWORD_HASH_CONCURRENCY",),
        "the core count",
        "argon2 computations (hash or verify) in flight at once in the process.",
    ),
    EnvVar(
        ("PASSWORD_HASH_QUEUE_SECONDS",),
        "`2`",
        (
            "How long a login or signup waits for a hashing slot before 503 "
            "`server_busy` (decimals allowed)."
        ),
    ),
    EnvVar(
        ("TRUSTED_PROXIES",),
        "empty",
        (
            "Comma-separated IPs or CIDR networks of reverse proxies whose "
            "`X-Forwarded-For` is believed."
        ),
    ),
    EnvVar(
        ("ALLOWED_ORIGINS",),
        "`http://localhost:3000,http://127.0.0.1:3000`",
        ("CORS allowlist: a JSON list (as in the seed) or comma-separated; `*` allows any."),
    ),
    EnvVar(
        ("MAX_BODY_BYTES",),
        "`1048576`",
        "Larger request bodies get 413.",
    ),
    EnvVar(
        ("HTTP_PARSER",),
        "`httptools`",
        (
            "How the main port reads HTTP/1.1 requests: `httptools` (atrium's own protocol on"
            " llhttp, `atrium/seams/llhttp_protocol.py`, cheaper per request: see"
            " [BENCHMARKS](BENCHMARKS.md)) or `h11` (hypercorn's protocol, as before). With"
            " `httptools` a few malformed or unusual requests that h11 accepts get 400"
            " `bad_request` and a close: Content-Length with Transfer-Encoding, two equal"
            " Content-Lengths, an obs-fold header line, bare LF line ends, a method llhttp does"
            " not know or in lower case. Either way a request the protocol refuses gets a JSON"
            " error (400 `bad_request`, 431 `headers_too_large`, 501 `not_implemented`)."
            " WebSocket upgrades, h2c (with `Connection: upgrade`) and HTTP/2 are served by"
            " hypercorn either way; `WS_PORT` and the metrics port are not affected."
        ),
    ),
    EnvVar(
        ("LOG_LEVEL",),
        "`INFO`",
        "`DEBUG`, `INFO`, `WARNING`, `ERROR`.",
    ),
    EnvVar(
        ("LOG_FORMAT",),
        "`json` in production, else `text`",
        (
            "`json`: one JSON object a line on stderr; `text`: one readable line. "
            "See [Logs](OPERATIONS.md#logs)."
        ),
    ),
    EnvVar(
        ("DRAIN_SECONDS",),
        "`5` in production, else `0`",
        (
            "After SIGTERM, how long `/ready` answers 503 while the process still "
            "serves, before it closes WebSockets and stops (decimals allowed)."
        ),
    ),
    EnvVar(
        ("JWT_ISSUER", "JWT_AUDIENCE"),
        "`workspace-backend` / `workspace-api`",
        "The seed's `iss` and `aud` claims.",
    ),
    EnvVar(
        ("WS_PORT",),
        "`8001` in development, unset otherwise",
        (
            "Port of the dedicated WebSocket listener (wsproto over its own "
            "sockets; same paths and frames as `/ws/` on `PORT`). Unset: no "
            "listener."
        ),
    ),
    EnvVar(
        ("ADMIN_TOKEN",),
        "unset",
        (
            "Operator token for `/health/supervisor` and the console's `/ops/...` "
            "endpoints outside development (16+ characters in production). See "
            "[Operator console](OPERATIONS.md#operator-console)."
        ),
    ),
    EnvVar(
        ("PROJECT_CACHE_TTL_SECONDS",),
        "`60`",
        "TTL of the per-user project list cache (`0`: off).",
    ),
    EnvVar(
        ("SESSION_CACHE_SECONDS",),
        "`5`",
        (
            "How long an instance trusts a session it checked. A logout or a "
            "refresh-token reuse takes effect at once on this instance, and with "
            "`REDIS_URL` at once on every instance too (see [Presence and shared "
            "state](OPERATIONS.md#presence-and-shared-state-across-instances)); "
            "without Redis, on another instance within this many seconds. `0`: "
            "check the database on every request."
        ),
    ),
    EnvVar(
        ("WS_MAX_MESSAGE_BYTES",),
        "`65536`",
        "Largest WebSocket frame a client may send (larger: close 1009).",
    ),
    EnvVar(
        ("WS_AUTH_TIMEOUT_SECONDS",),
        "`5`",
        "Time for the first `AUTH` frame when no header was sent.",
    ),
    EnvVar(
        ("WS_HEARTBEAT_INTERVAL_SECONDS", "WS_HEARTBEAT_TIMEOUT_SECONDS"),
        "`25` / `60`",
        ("Server `PING` interval; a client silent for the timeout is dropped (4009)."),
    ),
    EnvVar(
        ("WS_SEND_QUEUE",),
        "`1024`",
        ("Messages waiting for one connection before it is closed as a slow consumer (4008)."),
    ),
    EnvVar(
        ("WS_RATE_LIMIT_PER_SECOND",),
        "`50`",
        "Client messages per second per connection (bursts of twice that).",
    ),
    EnvVar(
        ("WORKSPACE_IDLE_SECONDS",),
        "`30`",
        "A workspace with no connections stops after this long.",
    ),
    EnvVar(
        ("RESUME_MAX_EVENTS",),
        "`1000`",
        ("Most events replayed on resume; an older `since_seq` gets `recovered: false`."),
    ),
    EnvVar(
        ("WS_MAX_CONNECTIONS_PER_USER",),
        "`20`",
        (
            "Open WebSockets one user may hold per process (both transports "
            "together); the next is closed at join with 4011 "
            "`too_many_connections`."
        ),
    ),
    EnvVar(
        ("WS_USER_EDITS_PER_SECOND",),
        "`20`",
        (
            "`FILE_CHANGE`s per second one user may send across all their "
            "connections in this process (bursts of twice that); over it an edit "
            "gets `ERROR rate_limited` and is not stored."
        ),
    ),
    EnvVar(
        ("DOC_MAX_UPDATE_BYTES",),
        "`1048576`",
        (
            "Largest Yjs update one live-document message may carry; a larger one is not"
            " applied and its connection is closed with 1009."
        ),
    ),
    EnvVar(
        ("DOC_MAX_BYTES",),
        "`16777216`",
        (
            "Bytes a live document may store (its snapshot plus the updates after it,"
            " compacted first when that helps); an update past it is not applied and its"
            " connection is closed with 4012 `document_too_large`."
        ),
    ),
    EnvVar(
        ("DOC_UPDATES_PER_SECOND",),
        "`30`",
        "Live-document updates per second one user may send across their document connections.",
    ),
    EnvVar(
        ("DOC_IDLE_SECONDS",),
        "`30`",
        "A live document with no connections is compacted and stopped after this long.",
    ),
    EnvVar(
        ("DOC_COMPACT_AFTER",),
        "`500`",
        (
            "A live document's updates are folded into a new snapshot once this many were"
            " appended since the last one (and when it stops idle)."
        ),
    ),
    EnvVar(
        ("DOC_TICKET_SECONDS",),
        "`60`",
        "How long a live-document ticket may open connections after it is issued.",
    ),
    EnvVar(
        ("DOC_ACTIVITY_SECONDS",),
        "`5`",
        (
            "Live-document edits reach the project's event log and workspace as at most one"
            " `DOCUMENT_EDITED` per document in this many seconds (who edited, how many"
            " updates; never the content)."
        ),
    ),
    EnvVar(
        ("EVENT_LOG_RETENTION_DAYS",),
        "`30`",
        (
            "Events older than this are pruned from the event log (at start, then "
            "every 10 minutes). `0`: keep forever."
        ),
    ),
    EnvVar(
        ("EVENT_LOG_MAX_EVENTS_PER_PROJECT",),
        "`100000`",
        "At most this many newest events are kept per project. `0`: no cap.",
    ),
    EnvVar(
        ("WORKER_CONCURRENCY",),
        "`4`",
        (
            "Job actors per process (`serve` and `worker`): jobs that run at once. "
            "`0` in `serve`: this process runs no jobs (leave them to workers)."
        ),
    ),
    EnvVar(
        ("JOB_MAX_RUNNING_PER_USER",),
        "`2`",
        (
            "One user's jobs running at once, across every process (kept by the "
            "database). Below `WORKER_CONCURRENCY`, so another user's job finds an "
            "actor free; see [fair queues](JOBS.md#fair-queues)."
        ),
    ),
    EnvVar(
        ("JOB_MAX_QUEUED_PER_USER",),
        "`100`",
        (
            "One user's jobs waiting to run (queued, or failed and awaiting a "
            "retry); one more is refused with 429 `job_queue_full` and "
            "`Retry-After`."
        ),
    ),
    EnvVar(
        ("MAX_JOB_RETRIES",),
        "`3`",
        (
            "Default retries after a job's first failed attempt (per job: "
            "`max_retries`); then it is `dead`."
        ),
    ),
    EnvVar(
        ("JOB_TIMEOUT_SECONDS",),
        "`300`",
        ("Default time limit of one attempt (per job: `timeout`); decimals allowed."),
    ),
    EnvVar(
        ("JOB_LEASE_SECONDS",),
        "`30`",
        (
            "A running job's lease, renewed every third of it (at most every 0.5 "
            "s). A worker that dies loses its jobs to another worker this long "
            "after its last renewal."
        ),
    ),
    EnvVar(
        ("JOB_RETENTION_DAYS",),
        "`30`",
        (
            "Finished jobs (completed, dead, cancelled) older than this are deleted"
            " (at start, then every 10 minutes). `0`: keep forever."
        ),
    ),
    EnvVar(
        ("ENABLE_METRICS",),
        "`true`",
        (
            "Serve Prometheus metrics on `METRICS_PORT` (see "
            "[Metrics](OPERATIONS.md#metrics)); `false`: no metrics listener."
        ),
    ),
    EnvVar(
        ("METRICS_PORT",),
        "`9090`",
        "Port of the metrics listener (on `HOST`; `0`: any free port).",
    ),
    EnvVar(
        ("REDIS_BREAKER_FAILURES",),
        "`5`",
        (
            "Redis circuit breaker: failed Redis calls in a row that open it (calls"
            " then fail at once, without trying)."
        ),
    ),
    EnvVar(
        ("REDIS_BREAKER_RESET_SECONDS",),
        "`1`",
        (
            "The longest wait between two probes (a PING on a connection of its "
            "own) of an open breaker: the first comes after 0.25 s, doubling, with "
            "jitter. At most 10 (before issue 20: the seed's 60-second open period;"
            " see [docs/REDIS.md](REDIS.md#the-breaker-and-how-it-recovers))."
        ),
    ),
    EnvVar(
        ("REDIS_BREAKER_SUCCESSES",),
        "`1`",
        (
            "Probes in a row that must succeed to close an open breaker (calls "
            "never wait on a probe)."
        ),
    ),
    EnvVar(
        ("DEGRADED_POLL_SECONDS",),
        "`1`",
        (
            "With `REDIS_URL`: while Redis is away, how often open workspaces read "
            "the log for other instances' events, and open live documents the "
            "updates other instances stored (a fallback: those arrive at once "
            "through PostgreSQL NOTIFY; see [Many "
            "instances](OPERATIONS.md#many-instances) and [Across "
            "processes](DOCUMENTS.md#across-processes)). Decimals allowed."
        ),
    ),
    EnvVar(
        ("PRESENCE_HEARTBEAT_SECONDS",),
        "`2`",
        (
            "With `REDIS_URL`: how often a process renews its presence entries in "
            "Redis and reaps those of processes that stopped renewing theirs "
            "(decimals allowed)."
        ),
    ),
    EnvVar(
        ("PRESENCE_TTL_SECONDS",),
        "4 x `PRESENCE_HEARTBEAT_SECONDS`",
        (
            "With `REDIS_URL`: how long a process's presence entries outlive its "
            "last heartbeat; its users leave (`USER_LEAVE`) within this plus one "
            "heartbeat of its death. Must be longer than the heartbeat."
        ),
    ),
    EnvVar(
        ("JOB_WORKER_MEMORY_MB",),
        "`1024`",
        (
            "Address-space limit (`RLIMIT_AS`) of each job worker process; a step "
            "that exceeds it ends its job `dead`. A 1 MiB CSV needs under 512, a "
            "100 MB one about 910 "
            "([docs/JOBS.md](JOBS.md#where-cpu-heavy-work-runs)). `0` (no limit) or"
            " at least 512."
        ),
    ),
    EnvVar(
        ("JOB_TASK_MODULES",),
        "empty",
        (
            "Comma-separated Python modules imported at start; each registers more "
            "tasks (`@atrium.tasks.registry.task(...)`)."
        ),
    ),
    EnvVar(
        ("JOB_MAX_PAYLOAD_BYTES",),
        "`1048576`",
        (
            "Largest job payload, as JSON; over it the submission gets 413 "
            "`job_payload_too_large` "
            "([docs/JOBS.md](JOBS.md#listings-and-size-limits))."
        ),
    ),
    EnvVar(
        ("JOB_MAX_RESULT_BYTES",),
        "`8388608`",
        (
            "Largest job result, as JSON; over it the result is not stored and the "
            "job ends `dead` with an error naming the limit."
        ),
    ),
    EnvVar(
        ("WORKERS",),
        "`1`",
        (
            "Serving processes of `run.py serve` (the `--workers` flag wins): more "
            "than 1 runs a supervisor and that many processes sharing `PORT` and "
            "`WS_PORT` (see [Several processes on one "
            "machine](OPERATIONS.md#several-processes-on-one-machine---workers)). "
            "`run.py worker` ignores it."
        ),
    ),
    EnvVar(
        ("REUSE_PORT",),
        "`false`",
        (
            "Bind `PORT` and `WS_PORT` with `SO_REUSEPORT`, so several processes "
            "share them (the kernel spreads new connections). `--workers` sets it "
            "for its processes; leave it off otherwise, so a second server on a "
            "taken port fails to start instead of silently taking half the traffic."
        ),
    ),
)

_PREAMBLE = """\
# Configuration

<!-- Generated from atrium/core/config_reference.py: edit the rows there, then run
     python -m atrium.core.config_reference > docs/CONFIGURATION.md -->

Everything is read from the environment at start and validated; a bad value stops the
start with one line naming the variable, e.g.
`atrium: configuration error: PORT: must be an integer, got 'eighty'`.
Flags `--host`, `--port`, `--data-dir` override `HOST`, `PORT`, `DATA_DIR`, and
`--workers` overrides `WORKERS`.

| Variable | Default | Meaning |
|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown(rows: tuple[EnvVar, ...] = ENVIRONMENT_VARIABLES) -> str:
    """docs/CONFIGURATION.md: the preamble, then one table row per ``EnvVar``."""
    lines = [
        f"| {' / '.join(f'`{name}`' for name in row.names)} | {_cell(row.default)} "
        f"| {_cell(row.meaning)} |"
        for row in rows
    ]
    return _PREAMBLE + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
