"""The configuration reference (docs/CONFIGURATION.md, written from
``atrium/core/config_reference.py``) states the defaults that the settings model holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

from atrium.core import config_reference as reference
from atrium.core.config import Environment, Settings

FIELDS = {field.name for field in dataclasses.fields(Settings)}
# Defaults the reference states as a rule, not a value: generated, or following another
# setting (test_config.py checks the rules themselves); and REDIS_TLS, Sentinel's flag,
# which is not the field ``redis_tls`` (the TLS files).
RULES = {
    "REDIS_TLS",
    "SECRET_KEY",
    "PASSWORD_HASH_CONCURRENCY",
    "AUTH_ADDRESS_RATE_LIMIT_PER_MINUTE",
    "PRESENCE_TTL_SECONDS",
}


def shown(value: object) -> str:
    """A default as the reference writes it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{','.join(value)}`" if value else "empty"
    if isinstance(value, Path):
        return f"`./{value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def test_the_reference_states_the_models_defaults() -> None:
    environments: tuple[Environment, ...] = get_args(Environment)
    models = [Settings.defaults(environment) for environment in environments]
    checked, wrong = 0, []
    for row in reference.ENVIRONMENT_VARIABLES:
        names = [name.lower() for name in row.names]
        if set(row.names) & RULES or not set(names) <= FIELDS:
            continue
        by_environment = {tuple(getattr(m, name) for name in names) for m in models}
        if len(by_environment) == 1 or names == ["environment"]:
            expected = " / ".join(shown(getattr(models[0], name)) for name in names)
            if row.default != expected:
                wrong.append(f"{'/'.join(row.names)}: {row.default!r}, the model: {expected!r}")
        else:  # one default per environment: each is named
            for model in models:
                value = " / ".join(shown(getattr(model, name)) for name in names)
                if value not in row.default:
                    wrong.append(f"{'/'.join(row.names)}: {row.default!r} lacks {value!r}")
        checked += 1
    assert wrong == [], (
        f"docs/CONFIGURATION.md's defaults differ from atrium/core/config.py: {wrong}"
    )
    assert checked >= 50
