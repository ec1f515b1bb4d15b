#!/bin/sh
# The app container's command (Dockerfile CMD, docker-compose.yml `app`): serve with several uvicorn
# workers. Migrations run once, before, in the compose `migrate` service; never here.
set -eu
# Several workers add their metrics up through files in this directory; stale files from an earlier
# start would count twice, so it starts empty.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
  rm -rf "${PROMETHEUS_MULTIPROC_DIR:?}"/*
fi
# X-Forwarded-For/-Proto are trusted only from FORWARDED_ALLOW_IPS (uvicorn reads it; its default is
# 127.0.0.1): set it to the address of the TLS-terminating proxy, never to '*' on a published port.
exec uvicorn proxy_site.asgi:application --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
  --workers "${WEB_CONCURRENCY:-2}" --proxy-headers --no-server-header
