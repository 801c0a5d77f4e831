# syntax=docker/dockerfile:1
# extauthz: Envoy ext_authz (v3) gRPC server deciding by workload identity (SPIFFE).
#
#   docker build -t extauthz --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) .
#   docker run --read-only --cap-drop ALL -v "$PWD/policy:/etc/extauthz/policy:ro" extauthz
#
# Runs as uid 10001 with a read-only root filesystem: it writes nothing but its unix socket,
# and only when asked to listen on one (mount a writable /run/extauthz for that).

# --- build: wheels for extauthz and every dependency; nothing of this stage ships -------------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz
RUN pip install --no-cache-dir --upgrade "pip>=24" \
 && pip wheel --no-cache-dir --wheel-dir /wheels ".[otlp]"

# --- runtime: slim, non-root, no compilers, no pip --------------------------------------------
FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="extauthz" \
      org.opencontainers.image.description="Workload-identity authorization for Envoy meshes (ext_authz v3 gRPC server)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/operations.md"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EXTAUTHZ_POLICY=/etc/extauthz/policy \
    EXTAUTHZ_LISTEN=127.0.0.1:9191
# Install from the wheels only (no index, no compilers), byte-compiled now so that nothing is
# written at run time, then drop pip itself: the image runs extauthz and nothing else.
# opentelemetry-proto is reinstalled last: xds-protos ships an older copy of its modules.
# (DL3013: the versions are pinned by the wheels built above; --no-index reaches nothing else.)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "extauthz[otlp]" \
 && pip install --no-cache-dir --no-index --find-links=/wheels --force-reinstall --no-deps \
        opentelemetry-proto \
 && python -m compileall -q /usr/local/lib/python3.11/site-packages \
 && pip uninstall --yes pip setuptools wheel \
 && useradd --system --uid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin extauthz \
 && mkdir -p /run/extauthz \
 && chown 10001:10001 /run/extauthz
COPY --chown=0:0 policy /etc/extauthz/policy
USER 10001:10001
WORKDIR /run/extauthz
EXPOSE 9191
# SIGTERM drains in-flight checks (NOT_SERVING first, then --grace-period) before exiting.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["extauthz", "health", "--address", "127.0.0.1:9191"]
ENTRYPOINT ["extauthz"]
CMD ["serve"]
