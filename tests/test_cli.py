"""run.py as an operator uses it: help, configuration errors, migrate, serve and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent


def run_py(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def base_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENVIRONMENT", "SECRET_KEY")}
    env.update(DATA_DIR=str(tmp_path / "data"), DATABASE_URL=database_url, METRICS_PORT="0")
    return env


def test_help_explains_the_commands(tmp_path: Path, database_url: str) -> None:
    result = run_py("--help", env=base_env(tmp_path, database_url))
    assert result.returncode == 0
    assert "serve" in result.stdout and "migrate" in result.stdout


def test_bad_configuration_stops_with_one_line(tmp_path: Path, database_url: str) -> None:
    env = base_env(tmp_path, database_url)
    env["ENVIRONMENT"] = "production"
    result = run_py("migrate", env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "atrium: configuration error: SECRET_KEY: is required in production"
    )


def test_migrate_is_idempotent(tmp_path: Path, database_url: str) -> None:
    # The per-test database is already migrated from the template.
    result = run_py("migrate", env=base_env(tmp_path, database_url))
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stdout


async def test_serve_answers_then_stops_cleanly_on_sigterm(
    tmp_path: Path, database_url: str
) -> None:
    env = base_env(tmp_path, database_url)
    env["PORT"] = "0"
    env["WS_PORT"] = "0"
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, str(ROOT / "run.py"), "serve"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        )
        assert process.stdout is not None
        buffer = b""
        with trio.fail_after(60):
            while b"API on " not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, "server exited before listening"
                buffer += chunk
            while not buffer.endswith(b"\n"):
                buffer += await process.stdout.receive_some()
        url = buffer.split(b"API on ")[1].split()[0].decode()
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).json() == {"status": "ok"}
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            rest = b""
            while chunk := await process.stdout.receive_some():
                rest += chunk
            assert await process.wait() == 0
        assert b"atrium: stopped" in rest
