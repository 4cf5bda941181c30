# atrium: the API (`python run.py`, the default command) and the job worker
# (`python run.py worker`) from one image. Multi-stage: the build stage installs the
# package into a virtual environment; the final stage copies only that environment, so no
# compiler, pip cache or source tree ships (every compiled dependency comes as a wheel).

FROM python:3.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned versions first (requirements/runtime.lock, see docs/DEPENDENCIES.md): a layer
# that changes only with the lock; then atrium itself, resolving nothing again.
COPY requirements/runtime.lock ./requirements/
RUN pip install --no-cache-dir -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY atrium ./atrium
RUN pip install --no-cache-dir --no-deps .

FROM python:3.12-slim-bookworm AS runtime
# A system user with no shell and no home of its own; it owns only /data.
RUN groupadd --system --gid 10001 atrium \
    && useradd --system --uid 10001 --gid atrium --no-create-home \
        --shell /usr/sbin/nologin atrium \
    && mkdir /data \
    && chown atrium:atrium /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY run.py ./
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATA_DIR=/data
USER 10001:10001
# PORT (REST and /ws/), WS_PORT when set (the dedicated WebSocket listener), METRICS_PORT.
EXPOSE 8000 8001 9090
# Liveness only (no I/O in the app); readiness is /ready, for the load balancer. No curl in
# a slim image: the standard library asks.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2).status != 200)"]
# SIGTERM drains (DRAIN_SECONDS), then stops within about 30 s: give it a grace period of
# at least 35 s (compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["python", "run.py", "serve"]
