FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DJANGO_SETTINGS_MODULE=proxy_site.settings.production
WORKDIR /app
COPY pyproject.toml README.md ./
COPY oauthproxy ./oauthproxy
COPY proxy_site ./proxy_site
COPY templates ./templates
COPY manage.py ./
RUN pip install --no-cache-dir . \
    && SECRET_KEY=build PROXY_ENCRYPTION_KEYS=YnVpbGQtb25seS1rZXktMzItYnl0ZXMtbG9uZyEhISE= \
       PUBLIC_BASE_URL=https://build.invalid python manage.py collectstatic --noinput \
    && useradd --system --home /app proxy
USER proxy
EXPOSE 8000
CMD ["sh", "-c", "python manage.py migrate --noinput && exec uvicorn proxy_site.asgi:application --host 0.0.0.0 --port 8000 --workers ${WEB_CONCURRENCY:-2} --proxy-headers --forwarded-allow-ips='*'"]
