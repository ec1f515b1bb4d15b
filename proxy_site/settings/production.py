"""Production: several stateless ASGI workers per host, several hosts, all state in PostgreSQL."""

from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F401,F403
from .env import env_bool, env_int, env_list

DEBUG = False
if not SECRET_KEY:  # noqa: F405
    raise ImproperlyConfigured("SECRET_KEY must be set in production")
if not PROXY_ENCRYPTION_KEYS:  # noqa: F405
    raise ImproperlyConfigured("PROXY_ENCRYPTION_KEYS must be set in production")
if not PUBLIC_BASE_URL.startswith("https://") and not env_bool("ALLOW_HTTP_BASE_URL", False):  # noqa: F405
    raise ImproperlyConfigured("PUBLIC_BASE_URL must be https:// in production")

# Pooled connections (psycopg 3's pool, built into Django's PostgreSQL backend): each worker keeps a
# bounded set of open connections. Under ASGI, persistent connections (CONN_MAX_AGE > 0) leak one per
# executor thread instead, so they stay off when pooling.
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":  # noqa: F405
    DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {  # noqa: F405
        "min_size": env_int("DB_POOL_MIN_SIZE", 2),
        "max_size": env_int("DB_POOL_MAX_SIZE", 10),
        "timeout": env_int("DB_POOL_TIMEOUT", 10),
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 60)  # noqa: F405

# Strict by default: only the public host name (the container health check sends it, see deploy/).
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [urlsplit(PUBLIC_BASE_URL).hostname or "localhost"])  # noqa: F405

SESSION_COOKIE_SECURE = PUBLIC_BASE_URL.startswith("https://")  # noqa: F405
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_TRUSTED_ORIGINS = [PUBLIC_BASE_URL]  # noqa: F405
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
