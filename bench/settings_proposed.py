"""An experiment, not the product: ``bench.settings_bench`` plus configuration changes proposed in
docs/PERFORMANCE.md, so their gain can be measured before anyone applies them
(``python -m bench --settings proposed``). Each change applies only where the tree does not have it yet; since
commit 4a59293 (and the pool in production.py) the tree has all three, and this module changes nothing.

1. PostgreSQL connection pool (Django 5.1+, psycopg_pool). Under ASGI Django runs each request's synchronous
   code in a fresh thread, and connections are per thread: with ``CONN_MAX_AGE`` alone every request outside
   the gateway opened a new PostgreSQL connection, and finished threads' connections piled up.
2. Redis through django-redis, whose connection pools are per process (Django's own RedisCache keeps its pool
   on the cache object, one per thread: a new Redis connection per request).
3. Stand-in for "public clients get no client secret": DOT gave every new client a random secret hashed with
   PBKDF2 (1,000,000 iterations, ~200 ms of CPU). Here such secrets are hashed with a fast hasher instead,
   which measures the same gain.
"""

from bench.settings_bench import *  # noqa: F401,F403

_db = DATABASES["default"]  # noqa: F405
if _db["ENGINE"] == "django.db.backends.postgresql" and "pool" not in _db.get("OPTIONS", {}):
    _db["CONN_MAX_AGE"] = 0  # the pool replaces persistent connections
    _db.setdefault("OPTIONS", {})["pool"] = {"min_size": 2, "max_size": 16, "timeout": 10}

_cache = CACHES["default"]  # noqa: F405
if _cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache":
    _cache["BACKEND"] = "django_redis.cache.RedisCache"

if OAUTH2_PROVIDER.get("CLIENT_SECRET_HASHER", "default") == "default":  # noqa: F405
    PASSWORD_HASHERS = [  # noqa: F405
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.MD5PasswordHasher",
    ]
    OAUTH2_PROVIDER = {**OAUTH2_PROVIDER, "CLIENT_SECRET_HASHER": "md5"}  # noqa: F405
