# Imagine bot: `docker build -t imagine-bot .`, then
#   docker run --env-file .env -e DATA_DIR=/data -v imagine-data:/data imagine-bot
# (or docker-compose.yml). -e DATA_DIR=/data wins over a .env written for running without Docker.
# Two stages: the builder installs the bot and its dependencies into a venv; the final image copies only that venv.
# PYTHON_IMAGE is for machines without the official image (see .ci/docker/make-base-image.sh); the default is it.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
# README.* is optional (the glob matches nothing until the project has one).
COPY README.* ./
COPY bot ./bot
# pip's compiled bytecode stays (about 0.5 s faster start); nothing writes more at run time (PYTHONDONTWRITEBYTECODE).
RUN pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="imagine-bot" \
      org.opencontainers.image.description="Self-hostable Discord bot that generates images with /imagine" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/data \
    HTTP_PORT=8080 \
    HTTP_HOST=0.0.0.0
# HTTP_HOST=0.0.0.0: inside the container, so the HEALTHCHECK and a Prometheus container reach /metrics; the
# port is still published only if you publish it (the bot itself needs no inbound port).

# A fixed numeric uid/gid so volume ownership is predictable on the host (chown 10001:10001 a bind mount).
RUN groupadd --gid 10001 bot \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /data --shell /usr/sbin/nologin bot \
    && mkdir -p /data \
    && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080

# The bot drains running jobs on SIGTERM for SHUTDOWN_GRACE_S (default 20 s): give `docker stop -t` /
# compose's stop_grace_period at least that plus 10 s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "bot.service.healthcheck"]

ENTRYPOINT ["python", "-m", "bot"]
CMD []
