"""Settings from the environment (12-factor), validated once at start.

Every default is written once: a field default of ``Settings`` (development's value), and
for the few that depend on ENVIRONMENT, one row each in ``ENVIRONMENT_DEFAULTS``.
``Settings.defaults(environment)`` is what an empty environment gives, and ``load_settings``
reads each variable over it; it turns a bad value into one ``ConfigError`` line that names
the variable, so ``run.py`` can print it and exit. Components' own settings records are
built from a process's ``Settings`` (``services.job_settings``, ``root.breaker_settings``,
``ConnectionSettings.of``, ...); built without one, their fields default to ``DEFAULTS``,
never to numbers of their own.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from .logs import LogFormat

Environment = Literal["development", "test", "production"]
HttpParser = Literal["h11", "httptools"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MIN_SECRET_LENGTH = 32
_MIN_SECRET_BITS = 128
_MAKE_A_KEY = 'make one with: python -c "import secrets; print(secrets.token_urlsafe(48))"'
DEFAULT_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:3000")
_WEAK_SECRETS = {"secret", "changeme", "your-super-secret-key-for-jwt-signing"}


class ConfigError(ValueError):
    """A configuration variable is missing or wrong; ``str()`` is one line naming it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class RedisTLSFiles:
    """Files for TLS connections to Redis (a ``rediss://`` REDIS_URL, or REDIS_TLS with
    Sentinel): the CA that signed the servers' certificates (None: the system's CAs), and
    this client's certificate and key, for a server that asks for one (``tls-auth-clients``,
    on by default in redis-server)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class RedisSentinel:
    """A Redis master that Sentinel watches (REDIS_SENTINELS, REDIS_SENTINEL_MASTER):
    atrium asks the sentinels where the master is, and asks again after a failover."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    username: str | None = None  # the master's ACL user (REDIS_USERNAME)
    password: str | None = field(default=None, repr=False)  # REDIS_PASSWORD
    sentinel_password: str | None = field(default=None, repr=False)  # REDIS_SENTINEL_PASSWORD
    tls: bool = False  # REDIS_TLS: TLS to the sentinels and to the master


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a process finds Redis: ``url`` or ``sentinel`` (exactly one), and the TLS
    files its connections use."""

    url: str | None = None
    sentinel: RedisSentinel | None = None
    tls: RedisTLSFiles = RedisTLSFiles()


def _cores() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class EnvironmentDefaults:
    """The defaults that differ by ENVIRONMENT (each one a field of ``Settings``)."""

    ws_port: int | None
    """The dedicated WebSocket listener: on in development, where a browser page finds
    it at a known port; off elsewhere (WebSockets are on the main port too)."""
    log_format: LogFormat
    """JSON lines for a log collector in production; readable text elsewhere."""
    drain_seconds: float
    """SIGTERM: /ready answers 503 this long before the servers stop (a load balancer
    sees it go); no one to tell in development and tests."""


ENVIRONMENT_DEFAULTS: Mapping[Environment, EnvironmentDefaults] = {
    "development": EnvironmentDefaults(ws_port=8001, log_format="text", drain_seconds=0.0),
    "test": EnvironmentDefaults(ws_port=None, log_format="text", drain_seconds=0.0),
    "production": EnvironmentDefaults(ws_port=None, log_format="json", drain_seconds=5.0),
}
_DEVELOPMENT = ENVIRONMENT_DEFAULTS["development"]
# Defaults that follow another setting (also when only that one is set): four people behind
# one address (an office, a NAT) each get their login budget; presence outlives four
# missed heartbeats.
_PEOPLE_PER_ADDRESS = 4
_HEARTBEATS_PER_TTL = 4


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration of one atrium process.

    The field defaults are the defaults of a development process (ENVIRONMENT unset);
    ``Settings.defaults(environment)`` gives another environment's, and ``load_settings``
    reads the environment over them.
    """

    environment: Environment = "development"
    secret_key: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    ws_port: int | None = _DEVELOPMENT.ws_port
    data_dir: Path = Path(".atrium")
    database_url: str | None = None
    redis_url: str | None = None
    redis_sentinel: RedisSentinel | None = None  # instead of REDIS_URL
    redis_tls: RedisTLSFiles = RedisTLSFiles()
    db_pool_size: int = 20
    access_token_expire_minutes: int = 30
    refresh_token_expire_days: int = 7
    rate_limit_per_minute: int = 60
    auth_rate_limit_per_minute: int = 5
    auth_address_rate_limit_per_minute: int = _PEOPLE_PER_ADDRESS * auth_rate_limit_per_minute
    login_backoff_after_failures: int = 5
    login_backoff_max_seconds: int = 30
    password_hash_concurrency: int = field(default_factory=_cores)  # hashes at once
    password_hash_queue_seconds: float = 2.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allowed_origins: tuple[str, ...] = DEFAULT_ORIGINS
    max_body_bytes: int = 1_048_576
    # The main port's HTTP/1.1 parser: llhttp (atrium.seams.llhttp_protocol), or hypercorn's h11.
    http_parser: HttpParser = "httptools"
    log_level: str = "INFO"
    log_format: LogFormat = _DEVELOPMENT.log_format
    drain_seconds: float = _DEVELOPMENT.drain_seconds
    jwt_issuer: str = "workspace-backend"
    jwt_audience: str = "workspace-api"
    admin_token: str | None = None
    project_cache_ttl_seconds: int = 60
    session_cache_seconds: int = 5
    ws_max_message_bytes: int = 65_536
    ws_auth_timeout_seconds: int = 5
    ws_heartbeat_interval_seconds: int = 25
    ws_heartbeat_timeout_seconds: int = 60
    ws_send_queue: int = 1024
    ws_rate_limit_per_second: int = 50
    workspace_idle_seconds: int = 30
    resume_max_events: int = 1000
    ws_max_connections_per_user: int = 20
    ws_user_edits_per_second: int = 20
    # Live documents (atrium/actors/document.py).
    doc_max_update_bytes: int = 1_048_576
    doc_max_bytes: int = 16_777_216  # stored: the snapshot plus the updates after it
    doc_updates_per_second: int = 30  # per user, across their document connections
    doc_idle_seconds: int = 30
    doc_compact_after: int = 500  # updates appended since the last snapshot
    doc_ticket_seconds: int = 60
    doc_activity_seconds: int = 5  # at most one DOCUMENT_EDITED per document this often
    event_log_retention_days: int = 30  # 0: keep events forever
    event_log_max_events_per_project: int = 100_000  # 0: no cap
    worker_concurrency: int = 4  # job actors per process; 0: none (serve only)
    # Fair queues: one user's jobs running at once (across every process), and waiting.
    job_max_running_per_user: int = 2
    job_max_queued_per_user: int = 100
    max_job_retries: int = 3
    job_timeout_seconds: float = 300.0
    job_lease_seconds: float = 30.0
    job_retention_days: int = 30  # 0: keep finished jobs forever
    job_task_modules: tuple[str, ...] = ()  # imported at start: they register more tasks
    job_max_payload_bytes: int = 1_048_576  # a job's payload as JSON; over it: 413
    job_max_result_bytes: int = 8_388_608  # a job's result as JSON; over it: the job is dead
    job_worker_memory_mb: int = 1024  # address-space limit of each job worker process; 0: none
    enable_metrics: bool = True
    metrics_port: int = 9090  # 0: any free port
    # Cluster presence (REDIS_URL): a heartbeat keeps this process's entries for the TTL.
    presence_heartbeat_seconds: float = 2.0
    presence_ttl_seconds: float = _HEARTBEATS_PER_TTL * presence_heartbeat_seconds
    # Redis circuit breaker: open after this many failures in a row; while open, Redis is
    # PINGed after 0.25 s, doubling to at most reset_seconds between probes; this many
    # probes in a row that succeed close it (docs/REDIS.md).
    redis_breaker_failures: int = 5
    redis_breaker_reset_seconds: float = 1.0
    redis_breaker_successes: int = 1
    # While Redis is away, open workspaces and live documents read the log this often (a
    # fallback: NOTIFY on the log carries other processes' events and updates at once).
    degraded_poll_seconds: float = 1.0
    workers: int = 1  # serving processes (run.py --workers); more than 1: a process group
    reuse_port: bool = False  # bind PORT and WS_PORT with SO_REUSEPORT (a --workers process)

    @classmethod
    def defaults(cls, environment: Environment = "development") -> Settings:
        """What a process in ``environment`` runs with when no variable is set (but
        SECRET_KEY, which production requires and development keeps in DATA_DIR)."""
        return cls(environment=environment, **dataclasses.asdict(ENVIRONMENT_DEFAULTS[environment]))

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def redis(self) -> RedisAddress | None:
        """Where Redis is (REDIS_URL or REDIS_SENTINELS), or None without Redis."""
        if self.redis_url is None and self.redis_sentinel is None:
            return None
        return RedisAddress(self.redis_url, self.redis_sentinel, self.redis_tls)


DEFAULTS = Settings()
"""A development process's defaults: where components' own settings records
(``JobSettings``, ``BreakerSettings``, ...) take the defaults of their fields, so that a
record built without a ``Settings`` (in a test, a benchmark) has the process's numbers."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def _port(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = _int(env, name, 0, minimum=0)
    if value > 65535:
        raise ConfigError(name, f"must be a TCP port (0-65535), got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, f"must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(name, f"must be 0 or more seconds, got {raw!r}")
    return value


def _worker_memory_mb(env: Mapping[str, str], default: int) -> int:
    # Below this a worker process dies while it starts (Python, atrium and Polars loaded),
    # and trio-parallel starts another, again and again, until the job times out.
    least = 512
    value = _int(env, "JOB_WORKER_MEMORY_MB", default, minimum=0)
    if 0 < value < least:
        raise ConfigError("JOB_WORKER_MEMORY_MB", f"must be 0 (no limit) or at least {least}")
    return value


def _positive_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _seconds(env, name, default)
    if value <= 0:
        raise ConfigError(name, f"must be more than 0 seconds, got {value:g}")
    return value


# Longer waits between probes would leave Redis unused for that long after it answers
# again: the seed's 60 (the fixed open period it used to be) is refused, not obeyed.
_MAX_BREAKER_RESET_SECONDS = 10.0


def _breaker_reset(env: Mapping[str, str], default: float) -> float:
    value = _positive_seconds(env, "REDIS_BREAKER_RESET_SECONDS", default)
    if value > _MAX_BREAKER_RESET_SECONDS:
        raise ConfigError(
            "REDIS_BREAKER_RESET_SECONDS",
            f"is now the longest wait between two probes of an open breaker (default {default:g}), "
            f"at most {_MAX_BREAKER_RESET_SECONDS:g}, got {value:g}",
        )
    return value


def _trusted_proxies(raw: str | None) -> tuple[IPNetwork, ...]:
    networks = []
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                "TRUSTED_PROXIES", f"{item.strip()!r} is not an IP address or CIDR network"
            ) from None
    return tuple(networks)


def _sentinel_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    addresses = []
    for text in (item.strip() for item in raw.split(",")):
        if not text:
            continue
        host, colon, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                "REDIS_SENTINELS", f"{text!r} is not host:port (e.g. sentinel-1:26379)"
            )
        addresses.append((host, int(port)))
    if not addresses:
        raise ConfigError("REDIS_SENTINELS", "names no sentinel (host:port,...)")
    return tuple(addresses)


def _redis_sentinel(env: Mapping[str, str], redis_url: str | None) -> RedisSentinel | None:
    """The Sentinel settings, or None without REDIS_SENTINELS (then the options that only
    Sentinel uses must be unset: a REDIS_URL carries its own credentials and scheme)."""
    raw = env.get("REDIS_SENTINELS", "").strip()
    master = env.get("REDIS_SENTINEL_MASTER", "").strip()
    tls = _bool(env, "REDIS_TLS", False)
    if not raw:
        if master:
            raise ConfigError("REDIS_SENTINEL_MASTER", "needs REDIS_SENTINELS (host:port,...)")
        credentials = ("REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_SENTINEL_PASSWORD")
        stray = [name for name in credentials if env.get(name, "").strip()]
        stray += ["REDIS_TLS"] if tls else []
        if stray:
            raise ConfigError(stray[0], "is for REDIS_SENTINELS only (a REDIS_URL carries its own)")
        return None
    if redis_url is not None:
        raise ConfigError("REDIS_SENTINELS", "set REDIS_URL or REDIS_SENTINELS, not both")
    if not master:
        raise ConfigError("REDIS_SENTINEL_MASTER", "is required with REDIS_SENTINELS")
    return RedisSentinel(
        addresses=_sentinel_addresses(raw),
        master=master,
        username=env.get("REDIS_USERNAME", "").strip() or None,
        password=env.get("REDIS_PASSWORD", "") or None,
        sentinel_password=env.get("REDIS_SENTINEL_PASSWORD", "") or None,
        tls=tls,
    )


def _redis_tls(
    env: Mapping[str, str], redis_url: str | None, sentinel: RedisSentinel | None
) -> RedisTLSFiles:
    files: dict[str, str | None] = {}
    for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
        value = env.get(name, "").strip() or None
        if value is not None:
            if not os.access(value, os.R_OK) or not Path(value).is_file():
                raise ConfigError(name, f"{value!r} is not a readable file")
            uses_tls = (redis_url or "").startswith("rediss://") or (
                sentinel is not None and sentinel.tls
            )
            if not uses_tls:
                raise ConfigError(name, "needs a rediss:// REDIS_URL or REDIS_TLS=true")
        files[name] = value
    cert, key = files["REDIS_TLS_CERT_FILE"], files["REDIS_TLS_KEY_FILE"]
    if (cert is None) != (key is None):
        missing = "REDIS_TLS_KEY_FILE" if key is None else "REDIS_TLS_CERT_FILE"
        raise ConfigError(missing, "is required with the other (a certificate and its key)")
    return RedisTLSFiles(files["REDIS_TLS_CA_FILE"], cert, key)


def secret_key_problem(key: str) -> str | None:
    """Why ``key`` is too weak to sign production tokens, or None when it will do.

    A key must have 32+ characters, must not be a short unit repeated (``'changeme' * 4``)
    and must carry an estimated 128+ bits: Shannon entropy of its character frequencies
    times its length. The estimate is generous to real random keys (``token_urlsafe(48)``
    scores about 340) and stingy with keyboard patterns and repeated letters.
    """
    if len(key) < _MIN_SECRET_LENGTH:
        return f"is too short ({len(key)} characters, need {_MIN_SECRET_LENGTH}+)"
    if key.lower() in _WEAK_SECRETS:
        return "is a known placeholder"
    # The smallest period p such that key[i] == key[i + p]; a key built from a repeated
    # unit has one no longer than half its length.
    period = next(p for p in range(1, len(key) + 1) if key[p:] == key[:-p] or p == len(key))
    if period <= len(key) // 2:
        return f"repeats a {period}-character unit"
    counts = Counter(key)
    per_char = -sum(n / len(key) * math.log2(n / len(key)) for n in counts.values())
    bits = per_char * len(key)
    if bits < _MIN_SECRET_BITS:
        return f"has too little variety (about {bits:.0f} bits, need {_MIN_SECRET_BITS}+)"
    return None


def _origins(raw: str | None) -> tuple[str, ...] | None:
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ConfigError("ALLOWED_ORIGINS", "is not a valid JSON list") from None
        if not isinstance(parsed, list) or not all(isinstance(o, str) for o in parsed):
            raise ConfigError("ALLOWED_ORIGINS", "must be a JSON list of strings")
        items = [o.strip() for o in parsed]
    else:
        items = [o.strip() for o in text.split(",") if o.strip()]
    for origin in items:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError("ALLOWED_ORIGINS", f"{origin!r} is not an http(s) origin or '*'")
    return tuple(o.rstrip("/") for o in items)


def _secret_key(env: Mapping[str, str], environment: Environment, data_dir: Path) -> str:
    key = env.get("SECRET_KEY", "").strip()
    if environment == "production":
        if not key:
            raise ConfigError("SECRET_KEY", "is required in production")
        problem = secret_key_problem(key)
        if problem is not None:
            raise ConfigError("SECRET_KEY", f"{problem}; {_MAKE_A_KEY}")
        return key
    if key:
        return key
    # Development: one random key per data directory, so tokens survive a restart.
    path = data_dir / "secret_key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Read and validate settings from ``env`` (default: ``os.environ``).

    ``overrides`` (command-line flags) win over the environment. Raises ``ConfigError``
    naming the first bad variable.
    """
    env = dict(os.environ if env is None else env)
    for key, value in overrides.items():
        if value is not None:
            env[key.upper()] = str(value)

    environment = env.get("ENVIRONMENT", "development").strip().lower() or "development"
    if environment not in ("development", "test", "production"):
        raise ConfigError(
            "ENVIRONMENT", f"must be development, test or production, got {environment!r}"
        )
    typed_env: Environment = environment  # type: ignore[assignment]
    d = Settings.defaults(typed_env)
    log_level = env.get("LOG_LEVEL", "").strip().upper() or d.log_level
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("LOG_LEVEL", f"must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    log_format = env.get("LOG_FORMAT", "").strip().lower() or d.log_format
    http_parser = env.get("HTTP_PARSER", "").strip().lower() or d.http_parser
    if http_parser not in ("h11", "httptools"):
        raise ConfigError("HTTP_PARSER", f"must be h11 or httptools, got {http_parser!r}")
    if log_format not in ("json", "text"):
        raise ConfigError("LOG_FORMAT", f"must be json or text, got {log_format!r}")
    database_url = env.get("DATABASE_URL", "").strip() or None
    if database_url and not database_url.startswith(("postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL", "must be a postgresql:// URL")
    redis_url = env.get("REDIS_URL", "").strip() or None
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("REDIS_URL", "must be a redis:// or rediss:// URL")
    redis_sentinel = _redis_sentinel(env, redis_url)
    redis_tls = _redis_tls(env, redis_url, redis_sentinel)
    data_dir = Path(env.get("DATA_DIR", "").strip() or d.data_dir).expanduser()
    admin_token = env.get("ADMIN_TOKEN", "").strip() or None
    if typed_env == "production" and admin_token is not None and len(admin_token) < 16:
        raise ConfigError("ADMIN_TOKEN", "must be at least 16 characters in production")
    origins = _origins(env.get("ALLOWED_ORIGINS"))
    auth_limit = _int(env, "AUTH_RATE_LIMIT_PER_MINUTE", d.auth_rate_limit_per_minute)
    heartbeat = _positive_seconds(env, "PRESENCE_HEARTBEAT_SECONDS", d.presence_heartbeat_seconds)
    presence_ttl = _positive_seconds(env, "PRESENCE_TTL_SECONDS", _HEARTBEATS_PER_TTL * heartbeat)
    if presence_ttl <= heartbeat:
        raise ConfigError(
            "PRESENCE_TTL_SECONDS",
            f"must be longer than PRESENCE_HEARTBEAT_SECONDS ({heartbeat:g}), got {presence_ttl:g}",
        )

    return Settings(
        environment=typed_env,
        secret_key=_secret_key(env, typed_env, data_dir),
        host=env.get("HOST", "").strip() or d.host,
        port=_port(env, "PORT", d.port) or 0,  # 0: any free port
        ws_port=_port(env, "WS_PORT", d.ws_port),
        data_dir=data_dir,
        database_url=database_url,
        redis_url=redis_url,
        redis_sentinel=redis_sentinel,
        redis_tls=redis_tls,
        db_pool_size=_int(env, "DB_POOL_SIZE", d.db_pool_size),
        access_token_expire_minutes=_int(
            env, "ACCESS_TOKEN_EXPIRE_MINUTES", d.access_token_expire_minutes
        ),
        refresh_token_expire_days=_int(
            env, "REFRESH_TOKEN_EXPIRE_DAYS", d.refresh_token_expire_days
        ),
        rate_limit_per_minute=_int(env, "RATE_LIMIT_PER_MINUTE", d.rate_limit_per_minute),
        auth_rate_limit_per_minute=auth_limit,
        auth_address_rate_limit_per_minute=_int(
            env, "AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE", _PEOPLE_PER_ADDRESS * auth_limit
        ),
        login_backoff_after_failures=_int(
            env, "LOGIN_BACKOFF_AFTER_FAILURES", d.login_backoff_after_failures
        ),
        login_backoff_max_seconds=_int(
            env, "LOGIN_BACKOFF_MAX_SECONDS", d.login_backoff_max_seconds
        ),
        password_hash_concurrency=_int(
            env, "PASSWORD_HASH_CONCURRENCY", d.password_hash_concurrency
        ),
        password_hash_queue_seconds=_seconds(
            env, "PASSWORD_HASH_QUEUE_SECONDS", d.password_hash_queue_seconds
        ),
        trusted_proxies=_trusted_proxies(env.get("TRUSTED_PROXIES")),
        allowed_origins=origins if origins is not None else d.allowed_origins,
        max_body_bytes=_int(env, "MAX_BODY_BYTES", d.max_body_bytes, minimum=1024),
        log_level=log_level,
        log_format=log_format,  # type: ignore[arg-type]
        http_parser=http_parser,  # type: ignore[arg-type]
        drain_seconds=_seconds(env, "DRAIN_SECONDS", d.drain_seconds),
        jwt_issuer=env.get("JWT_ISSUER", "").strip() or d.jwt_issuer,
        jwt_audience=env.get("JWT_AUDIENCE", "").strip() or d.jwt_audience,
        admin_token=admin_token,
        project_cache_ttl_seconds=_int(
            env, "PROJECT_CACHE_TTL_SECONDS", d.project_cache_ttl_seconds, minimum=0
        ),
        session_cache_seconds=_int(
            env, "SESSION_CACHE_SECONDS", d.session_cache_seconds, minimum=0
        ),
        ws_max_message_bytes=_int(
            env, "WS_MAX_MESSAGE_BYTES", d.ws_max_message_bytes, minimum=1024
        ),
        ws_auth_timeout_seconds=_int(env, "WS_AUTH_TIMEOUT_SECONDS", d.ws_auth_timeout_seconds),
        ws_heartbeat_interval_seconds=_int(
            env, "WS_HEARTBEAT_INTERVAL_SECONDS", d.ws_heartbeat_interval_seconds
        ),
        ws_heartbeat_timeout_seconds=_int(
            env, "WS_HEARTBEAT_TIMEOUT_SECONDS", d.ws_heartbeat_timeout_seconds
        ),
        ws_send_queue=_int(env, "WS_SEND_QUEUE", d.ws_send_queue, minimum=16),
        ws_rate_limit_per_second=_int(env, "WS_RATE_LIMIT_PER_SECOND", d.ws_rate_limit_per_second),
        workspace_idle_seconds=_int(env, "WORKSPACE_IDLE_SECONDS", d.workspace_idle_seconds),
        resume_max_events=_int(env, "RESUME_MAX_EVENTS", d.resume_max_events),
        ws_max_connections_per_user=_int(
            env, "WS_MAX_CONNECTIONS_PER_USER", d.ws_max_connections_per_user
        ),
        ws_user_edits_per_second=_int(env, "WS_USER_EDITS_PER_SECOND", d.ws_user_edits_per_second),
        doc_max_update_bytes=_int(
            env, "DOC_MAX_UPDATE_BYTES", d.doc_max_update_bytes, minimum=1024
        ),
        doc_max_bytes=_int(env, "DOC_MAX_BYTES", d.doc_max_bytes, minimum=1024),
        doc_updates_per_second=_int(env, "DOC_UPDATES_PER_SECOND", d.doc_updates_per_second),
        doc_idle_seconds=_int(env, "DOC_IDLE_SECONDS", d.doc_idle_seconds),
        doc_compact_after=_int(env, "DOC_COMPACT_AFTER", d.doc_compact_after),
        doc_ticket_seconds=_int(env, "DOC_TICKET_SECONDS", d.doc_ticket_seconds),
        doc_activity_seconds=_int(env, "DOC_ACTIVITY_SECONDS", d.doc_activity_seconds),
        event_log_retention_days=_int(
            env, "EVENT_LOG_RETENTION_DAYS", d.event_log_retention_days, minimum=0
        ),
        event_log_max_events_per_project=_int(
            env, "EVENT_LOG_MAX_EVENTS_PER_PROJECT", d.event_log_max_events_per_project, minimum=0
        ),
        worker_concurrency=_int(env, "WORKER_CONCURRENCY", d.worker_concurrency, minimum=0),
        job_max_running_per_user=_int(env, "JOB_MAX_RUNNING_PER_USER", d.job_max_running_per_user),
        job_max_queued_per_user=_int(env, "JOB_MAX_QUEUED_PER_USER", d.job_max_queued_per_user),
        max_job_retries=_int(env, "MAX_JOB_RETRIES", d.max_job_retries, minimum=0),
        job_timeout_seconds=_positive_seconds(env, "JOB_TIMEOUT_SECONDS", d.job_timeout_seconds),
        job_lease_seconds=_positive_seconds(env, "JOB_LEASE_SECONDS", d.job_lease_seconds),
        job_retention_days=_int(env, "JOB_RETENTION_DAYS", d.job_retention_days, minimum=0),
        job_task_modules=tuple(
            m.strip() for m in env.get("JOB_TASK_MODULES", "").split(",") if m.strip()
        ),
        job_max_payload_bytes=_int(
            env, "JOB_MAX_PAYLOAD_BYTES", d.job_max_payload_bytes, minimum=1024
        ),
        job_max_result_bytes=_int(
            env, "JOB_MAX_RESULT_BYTES", d.job_max_result_bytes, minimum=1024
        ),
        job_worker_memory_mb=_worker_memory_mb(env, d.job_worker_memory_mb),
        enable_metrics=_bool(env, "ENABLE_METRICS", d.enable_metrics),
        metrics_port=_port(env, "METRICS_PORT", d.metrics_port) or 0,
        presence_heartbeat_seconds=heartbeat,
        presence_ttl_seconds=presence_ttl,
        redis_breaker_failures=_int(env, "REDIS_BREAKER_FAILURES", d.redis_breaker_failures),
        redis_breaker_reset_seconds=_breaker_reset(env, d.redis_breaker_reset_seconds),
        redis_breaker_successes=_int(env, "REDIS_BREAKER_SUCCESSES", d.redis_breaker_successes),
        degraded_poll_seconds=_positive_seconds(
            env, "DEGRADED_POLL_SECONDS", d.degraded_poll_seconds
        ),
        workers=_int(env, "WORKERS", d.workers),
        reuse_port=_bool(env, "REUSE_PORT", d.reuse_port),
    )
