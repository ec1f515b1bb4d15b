"""``make run``: zero-setup development server (SQLite unless DATABASE_URL is set)."""

import os

from .base import *  # noqa: F401,F403
from .env import env_bool, env_list

DEBUG = env_bool("DEBUG", True)
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-local-development-key-change-me"  # noqa: F405
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["*"])
if not PROXY_ENCRYPTION_KEYS:  # noqa: F405
    # A fixed development key so `make run` works without setup. Never use it in production.
    PROXY_ENCRYPTION_KEYS = ["bG9jYWwtZGV2ZWxvcG1lbnQta2V5LTMyLWJ5dGVzISE="]

# Serve static files straight from the apps (no collectstatic needed for `make run`).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = True
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
STATIC_ROOT = None  # nothing collected outside production images; avoids WhiteNoise warnings

# `make run` talks to a local upstream and internal server: loopback destinations are allowed for every
# team (OUTBOUND_ALLOW_SPECIAL_ADDRESSES=false to try the production policy).
OAUTHPROXY = {**OAUTHPROXY, "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": env_bool("OUTBOUND_ALLOW_SPECIAL_ADDRESSES", True)}  # noqa: F405
