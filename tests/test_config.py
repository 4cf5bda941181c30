"""Configuration: validated at start, one clear line naming the bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from atrium.config import ConfigError, load_settings


def test_defaults_suit_development(tmp_path: Path) -> None:
    settings = load_settings({"DATA_DIR": str(tmp_path)})
    assert settings.environment == "development"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.access_token_expire_minutes == 30
    assert settings.auth_rate_limit_per_minute == 5
    assert settings.rate_limit_per_minute == 60
    assert settings.database_url is None


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
        ({"ALLOWED_ORIGINS": "[not json"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "ftp://files.example.com"}, "ALLOWED_ORIGINS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATA_DIR": str(tmp_path), **env})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert "\n" not in str(caught.value)


def test_production_accepts_a_strong_key(tmp_path: Path) -> None:
    key = "k" * 16 + "0123456789abcdefXYZ"
    settings = load_settings(
        {"DATA_DIR": str(tmp_path), "ENVIRONMENT": "production", "SECRET_KEY": key}
    )
    assert settings.is_production and settings.secret_key == key
    assert settings.ws_port is None


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
