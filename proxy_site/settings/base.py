"""Settings shared by every environment. Environment-specific modules import * from here."""

from pathlib import Path

import dj_database_url

from .env import env_bool, env_int, env_list, env_str
from .oauth import *  # noqa: F401,F403  (the OAuth settings live in their own module)

BASE_DIR = Path(__file__).resolve().parent.parent.parent

SECRET_KEY = env_str("SECRET_KEY", "")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

# The public base URL clients see (no trailing slash). Issuer and resource URIs derive from it, so
# it must be byte-identical to what clients use; behind a TLS-terminating proxy set it to https://...
PUBLIC_BASE_URL = env_str("PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/")

# Comma-separated urlsafe-base64 32-byte keys, newest first. The first encrypts; all decrypt.
# Generate one with: python -c "import base64,os;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"
PROXY_ENCRYPTION_KEYS = env_list("PROXY_ENCRYPTION_KEYS")

# GET /metrics (Prometheus) is open unless this is set; then scrapers send "Authorization: Bearer <token>".
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # Management API tokens: per user, stored as digests only (DESIGN §5.1), with an expiry.
    "knox",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI served from our static files, no CDN
    "oauth2_provider",
    "oauthproxy",
    "oauthproxy.console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "oauthproxy.core.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "proxy_site.urls"
ASGI_APPLICATION = "proxy_site.asgi.application"
WSGI_APPLICATION = "proxy_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DB_CONN_MAX_AGE", 0),
        conn_health_checks=True,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL:
    CACHES = {
        "default": {
            # django-redis keeps one connection pool per process; Django's own backend builds one per
            # thread, i.e. a new Redis connection for every request under ASGI.
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "oauthproxy",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# Django sessions hold admin logins only (the admin, its "Try it" test, the API's session auth). The OAuth
# flow keeps its consent binding in the PendingAuthorization row and the HttpOnly browser-key cookie; no OAuth
# request loads or saves a session (the S4 profile has none), so a cache or Redis session backend would save
# nothing on the flow and would only log admins out on a Redis flush or eviction. The database backend stays.
SESSION_ENGINE = "django.contrib.sessions.backends.db"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",  # user passwords
    "oauthproxy.core.hashers.GeneratedSecretHasher",  # generated client secrets only (see oauthproxy/hashers.py)
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Static files (the admin's CSS) are served by WhiteNoise from the ASGI app itself, so a deployment
# needs no separate file server. `collectstatic` fills STATIC_ROOT in the image.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on same-origin form posts
# and Django's CSRF check refuses the admin login and the consent form. Nothing goes to other sites.
SECURE_REFERRER_POLICY = "same-origin"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "oauthproxy.core.exceptions.exception_handler",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "MCP OAuth Proxy management API",
    "DESCRIPTION": (
        "Manage the MCP servers of your teams, their registered clients, sessions and audit log. "
        "Authenticate with `Authorization: Token <token>` (create one at /api/v1/tokens/ while logged in "
        "to the admin). Staff who are not superusers see their own teams' objects only. "
        "Secrets are write-only."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The document describes the management API only, not the OAuth endpoints MCP clients use.
    "PREPROCESSING_HOOKS": ["oauthproxy.console.api.schema_management_endpoints_only"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact": {"()": "oauthproxy.core.logging.RedactSecretsFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["redact"]},
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        # oauthlib logs request bodies (codes, secrets) at DEBUG; never let that through.
        "oauthlib": {"level": "WARNING"},
        "django.db.backends": {"level": "INFO"},
        # uvicorn's own loggers do not propagate to the root: route them through the redacting handler
        # (the access log line holds the request path with its query: /callback?code=...&state=...).
        # The filter on the loggers themselves also covers handlers added later (a --log-config).
        "uvicorn.access": {"handlers": ["console"], "filters": ["redact"], "propagate": False},
        "uvicorn.error": {"handlers": ["console"], "filters": ["redact"], "propagate": False},
    },
}
