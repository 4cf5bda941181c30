"""Configuration: validated at start, one clear line naming the bad variable."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
from pathlib import Path

import pytest
from conftest import test_settings as make_test_settings

from atrium.actors.workspace import WorkspaceSettings
from atrium.core.breaker import BreakerSettings
from atrium.core.config import (
    ENVIRONMENT_DEFAULTS,
    ConfigError,
    Environment,
    Settings,
    load_settings,
    secret_key_problem,
)
from atrium.domain.services import job_settings, workspace_settings
from atrium.jobs import JobSettings
from atrium.realtime.presence import PresenceSettings
from atrium.runtime.root import breaker_settings


def test_defaults_suit_development(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path)})
    assert settings.environment == "development"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.access_token_expire_minutes == 30
    assert settings.auth_rate_limit_per_minute == 5
    assert settings.rate_limit_per_minute == 60
    assert settings.database_url is None


@pytest.mark.parametrize("environment", ["development", "test", "production"])
def test_the_settings_model_holds_every_default_once(
    tmp_path: Path, environment: Environment
) -> None:
    # An empty environment (but the key production requires) gives exactly the model's
    # defaults for that ENVIRONMENT: nothing in load_settings has a default of its own.
    key = secrets.token_urlsafe(48)
    env = {"ENVIRONMENT": environment, "SECRET_KEY": key, "DATA_DIR": str(tmp_path)}
    loaded = load_settings(env)
    model = Settings.defaults(environment)
    assert loaded == dataclasses.replace(model, secret_key=key, data_dir=tmp_path)
    assert loaded.password_hash_concurrency == (os.cpu_count() or 1)
    assert loaded.ws_port == ENVIRONMENT_DEFAULTS[environment].ws_port
    assert loaded.drain_seconds == (5.0 if environment == "production" else 0.0)


def test_settings_built_as_documented_are_what_an_empty_environment_gives(
    tmp_path: Path,
) -> None:
    # ``Settings()``: a development process with nothing set (its key aside).
    loaded = load_settings({"DATA_DIR": str(tmp_path)})
    assert Settings(secret_key=loaded.secret_key, data_dir=tmp_path) == loaded
    assert Settings() == Settings.defaults()
    assert Settings().ws_port == 8001


def test_components_records_default_to_the_settings_model() -> None:
    # A record built without settings (a test's, a benchmark's) is what a process with
    # default settings builds: the rules that derive one from the other agree too.
    defaults = Settings()
    assert BreakerSettings() == breaker_settings(defaults)
    assert JobSettings() == job_settings(defaults)
    assert WorkspaceSettings() == workspace_settings(defaults)
    assert PresenceSettings() == PresenceSettings(
        defaults.presence_heartbeat_seconds, defaults.presence_ttl_seconds
    )


def test_development_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = load_settings({"DATA_DIR": str(tmp_path)})
    second = load_settings({"DATA_DIR": str(tmp_path)})
    assert len(first.secret_key) >= 32
    assert first.secret_key == second.secret_key
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ENVIRONMENT": "production"}, "SECRET_KEY"),
        ({"ENVIRONMENT": "production", "SECRET_KEY": "short"}, "SECRET_KEY"),
        (
            {"ENVIRONMENT": "production", "SECRET_KEY": "your-super-secret-key-for-jwt-signing"},
            "SECRET_KEY",
        ),
        ({"ENVIRONMENT": "staging-ish"}, "ENVIRONMENT"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"ACCESS_TOKEN_EXPIRE_MINUTES": "0"}, "ACCESS_TOKEN_EXPIRE_MINUTES"),
        ({"DB_POOL_SIZE": "-3"}, "DB_POOL_SIZE"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        # Now the longest wait between probes: the seed's 60 s would keep Redis unused.
        ({"REDIS_BREAKER_RESET_SECONDS": "60"}, "REDIS_BREAKER_RESET_SECONDS"),
        ({"REDIS_BREAKER_RESET_SECONDS": "0"}, "REDIS_BREAKER_RESET_SECONDS"),
        ({"REDIS_BREAKER_SUCCESSES": "0"}, "REDIS_BREAKER_SUCCESSES"),
        ({"ALLOWED_ORIGINS": "[not json"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "ftp://files.example.com"}, "ALLOWED_ORIGINS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"DRAIN_SECONDS": "-1"}, "DRAIN_SECONDS"),
        ({"DRAIN_SECONDS": "soon"}, "DRAIN_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATA_DIR": str(tmp_path), **env})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert "\n" not in str(caught.value)


def test_production_accepts_a_strong_key(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(48)
    settings = load_settings(
        {"DATA_DIR": str(tmp_path), "ENVIRONMENT": "production", "SECRET_KEY": key}
    )
    assert settings.is_production and settings.secret_key == key
    assert settings.ws_port is None
    # Behind a load balancer: JSON lines, and time for it to notice a drain.
    assert (settings.log_format, settings.drain_seconds) == ("json", 5.0)


def test_logs_are_text_and_shutdown_is_prompt_in_development(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path)})
    assert (settings.log_format, settings.drain_seconds) == ("text", 0.0)
    settings = load_settings(
        {"DATA_DIR": str(tmp_path), "LOG_FORMAT": "JSON", "DRAIN_SECONDS": "1.5"}
    )
    assert (settings.log_format, settings.drain_seconds) == ("json", 1.5)


def test_origins_accept_the_seeds_json_list_and_commas(tmp_path: Path) -> None:
    seed = load_settings(
        {
            "DATA_DIR": str(tmp_path),
            "ALLOWED_ORIGINS": '["http://localhost:3000", "https://x.example.com/"]',
        }
    )
    assert seed.allowed_origins == ("http://localhost:3000", "https://x.example.com")
    commas = load_settings(
        {
            "DATA_DIR": str(tmp_path),
            "ALLOWED_ORIGINS": "https://a.example.com, https://b.example.com",
        }
    )
    assert commas.allowed_origins == ("https://a.example.com", "https://b.example.com")


def test_flags_override_the_environment(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path), "PORT": "9000"}, port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    "key",
    [
        "a" * 32,
        "changeme" * 4,
        "0123456789" * 4,
        "k" * 16 + "0123456789abcdefXYZ",  # 35 characters, about 116 bits by the estimate
        # 128 random bits in hex: under the estimate's bar, use more (a fixed id: every
        # pytest-xdist worker must collect the same tests)
        pytest.param(secrets.token_hex(16), id="token_hex_16"),
        "Ab1!" * 10,
    ],
)
def test_production_refuses_repeated_or_low_variety_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATA_DIR": str(tmp_path), "ENVIRONMENT": "production", "SECRET_KEY": key})
    assert caught.value.variable == "SECRET_KEY"
    assert "secrets.token_urlsafe(48)" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_generated_keys_and_the_test_key_pass_the_entropy_check(tmp_path: Path) -> None:
    for _ in range(20):
        assert secret_key_problem(secrets.token_urlsafe(48)) is None
        assert secret_key_problem(secrets.token_hex(32)) is None
    assert secret_key_problem(make_test_settings(tmp_path).secret_key) is None


def test_trusted_proxies_parse_addresses_and_networks(tmp_path: Path) -> None:
    settings = load_settings(
        {"DATA_DIR": str(tmp_path), "TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8 ,::1,"}
    )
    assert settings.trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert load_settings({"DATA_DIR": str(tmp_path)}).trusted_proxies == ()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TRUSTED_PROXIES": "10.0.0.0/8,proxy.internal"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES"),
        ({"PASSWORD_HASH_CONCURRENCY": "0"}, "PASSWORD_HASH_CONCURRENCY"),
        ({"PASSWORD_HASH_QUEUE_SECONDS": "-1"}, "PASSWORD_HASH_QUEUE_SECONDS"),
        ({"PASSWORD_HASH_QUEUE_SECONDS": "nan"}, "PASSWORD_HASH_QUEUE_SECONDS"),
        ({"AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE": "none"}, "AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE"),
        ({"LOGIN_BACKOFF_MAX_SECONDS": "0"}, "LOGIN_BACKOFF_MAX_SECONDS"),
    ],
)
def test_bad_identity_settings_name_the_variable(
    tmp_path: Path, env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATA_DIR": str(tmp_path), **env})
    assert caught.value.variable == variable


def test_login_limit_defaults(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path), "AUTH_RATE_LIMIT_PER_MINUTE": "7"})
    assert settings.auth_address_rate_limit_per_minute == 28
    assert (settings.login_backoff_after_failures, settings.login_backoff_max_seconds) == (5, 30)
    assert settings.password_hash_concurrency >= 1
    assert settings.password_hash_queue_seconds == 2.0
