"""``make test``: PostgreSQL (or SQLite with ``DATABASE_URL=sqlite://``), fast hashers, loopback CIMD allowed."""

import os

import dj_database_url

from .base import *  # noqa: F401,F403

DEBUG = False
SECRET_KEY = "test-secret-key-not-for-production"
ALLOWED_HOSTS = ["*"]
PUBLIC_BASE_URL = "https://proxy.example.test"
PROXY_ENCRYPTION_KEYS = [
    "dGVzdC1rZXktb25lLTMyLWJ5dGVzLWxvbmctZXhhYyE=",  # 32 bytes
]
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/oauthproxy"),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # One test database per test run, so concurrent runs on one machine never drop each other's database.
    DATABASES["default"]["TEST"] = {"NAME": f"test_oauthproxy_{os.getpid()}"}
# (SQLite: Django's in-memory test database, private to the test process.)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher", "oauthproxy.core.hashers.GeneratedSecretHasher"]
# No listener thread holding a connection to the test database (tests that need it turn it on); loopback
# upstreams and internal servers (the tests' listeners) allowed (tests of the destination policy turn it off).
OAUTHPROXY = {  # noqa: F405
    **OAUTHPROXY,  # noqa: F405
    "CIMD_ALLOW_PRIVATE_ADDRESSES": True,
    "INVALIDATION_LISTEN": False,
    "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": True,
}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
STATIC_ROOT = None  # nothing collected outside production images; avoids WhiteNoise warnings
WHITENOISE_USE_FINDERS = True
