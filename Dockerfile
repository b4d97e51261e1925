# streamgate container image (see docs/deploy.md).
#
#   docker build -t streamgate .
#   docker run --rm --init -p 8080:8080 -p 9901:9901 --stop-timeout 330 \
#     -v "$PWD/deploy:/etc/streamgate:ro" streamgate
#
# The config is read from /etc/streamgate/gateway.yaml; no config is baked in. Mount the
# directory rather than the single file (in Kubernetes: the ConfigMap as a directory, never
# with subPath), so that a changed file reaches the gateway and it reloads.
#
# Ports: 8080 proxy (server.listen), 9901 admin (admin.listen). Inside a container the
# config must listen on 0.0.0.0 for a published port to answer; the HEALTHCHECK talks to
# 127.0.0.1 and works either way.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder: wheel + venv
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway

# Build the project's wheel, then install it with its runtime dependencies (and nothing
# else: no test extras, no build tools) into a venv that is copied whole to the final stage.
# The venv gets no pip of its own; the builder's pip installs into it with --python.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install /wheels/streamgate-*.whl

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="streamgate" \
      org.opencontainers.image.description="An async streaming reverse proxy for LLM traffic"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 streamgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin streamgate \
 && mkdir -p /etc/streamgate

COPY --from=builder /opt/venv /opt/venv

# The HEALTHCHECK asks the admin listener's /healthz; override the URL when admin.listen
# uses another port.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STREAMGATE_HEALTHCHECK_URL=http://127.0.0.1:9901/healthz

USER 10001:10001

EXPOSE 8080 9901

# python -c with urllib: the slim image has no curl, and we do not add one.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['STREAMGATE_HEALTHCHECK_URL'], timeout=2)"]

# SIGTERM starts the graceful drain: /readyz turns 503, streams in flight get up to
# server.shutdown_grace to finish. A second SIGTERM (or SIGINT) stops at once.
STOPSIGNAL SIGTERM

CMD ["streamgate", "serve", "--config", "/etc/streamgate/gateway.yaml"]
