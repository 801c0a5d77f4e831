# syntax=docker/dockerfile:1
# Build stage: compile a wheel of extauthz and its dependencies; nothing of it ships.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim, non-root, no compilers, read-only root filesystem friendly.
FROM python:3.11-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="extauthz" \
      org.opencontainers.image.description="Workload-identity authorization for Envoy meshes (ext_authz v3 gRPC server)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EXTAUTHZ_POLICY=/etc/extauthz/policy \
    EXTAUTHZ_LISTEN=0.0.0.0:9191
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels extauthz \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin extauthz
COPY policy /etc/extauthz/policy
USER 10001:10001
EXPOSE 9191
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["extauthz", "health", "--address", "127.0.0.1:9191"]
ENTRYPOINT ["extauthz", "serve"]
