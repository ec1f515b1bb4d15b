FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DJANGO_SETTINGS_MODULE=proxy_site.settings.production
WORKDIR /app
COPY pyproject.toml README.md ./
COPY oauthproxy ./oauthproxy
COPY proxy_site ./proxy_site
COPY templates ./templates
COPY deploy ./deploy
COPY manage.py ./
RUN pip install --no-cache-dir . \
    && SECRET_KEY=build PROXY_ENCRYPTION_KEYS=YnVpbGQtb25seS1rZXktMzItYnl0ZXMtbG9uZyEhISE= \
       PUBLIC_BASE_URL=https://build.invalid python manage.py collectstatic --noinput \
    && useradd --system --uid 10001 --home /app proxy
USER proxy
EXPOSE 8000
# Serving only: migrations run once before (docker-compose.yml's `migrate` service).
CMD ["sh", "deploy/serve.sh"]
HEALTHCHECK --interval=10s --timeout=5s --retries=6 CMD ["python", "deploy/healthcheck.py"]
