"""Production: several stateless ASGI workers per host, several hosts, all state in PostgreSQL."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F401,F403
from .env import env_bool, env_int

DEBUG = False
if not SECRET_KEY:  # noqa: F405
    raise ImproperlyConfigured("SECRET_KEY must be set in production")
if not PROXY_ENCRYPTION_KEYS:  # noqa: F405
    raise ImproperlyConfigured("PROXY_ENCRYPTION_KEYS must be set in production")
if not PUBLIC_BASE_URL.startswith("https://") and not env_bool("ALLOW_HTTP_BASE_URL", False):  # noqa: F405
    raise ImproperlyConfigured("PUBLIC_BASE_URL must be https:// in production")

# Persistent connections: each worker keeps its connections instead of reconnecting per request.
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 300)  # noqa: F405

SESSION_COOKIE_SECURE = PUBLIC_BASE_URL.startswith("https://")  # noqa: F405
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_TRUSTED_ORIGINS = [PUBLIC_BASE_URL]  # noqa: F405
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
