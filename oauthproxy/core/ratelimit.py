"""Fixed-window rate limits on the shared cache (Redis in production, so limits hold across instances).

Open endpoints are limited per (endpoint, server, key). The key is chosen by the caller: the client_id
where one is known, so one misbehaving client cannot lock out other clients that share a hosted
client's egress IPs (DESIGN §5.9); the IP address only where nothing better exists, with limits high
enough for a NAT of many users.

One counter per (name, hashed key, window number). On Redis a hit is one round trip: ``INCR`` and
``EXPIRE`` in one ``MULTI`` transaction (the counter of a window lives one second longer than the window;
renewing its lifetime on every hit changes nothing, since the next window has a key of its own). Other
cache backends (local memory in tests and ``make run``) count with ``add`` and ``incr``.
"""

import hashlib
import time

from django.core.cache import cache

from oauthproxy.core.exceptions import RateLimited
from oauthproxy.core.settings import proxy_settings

DEFAULT_LIMITS = {
    # name: (requests, window seconds)
    "register:ip": (60, 60),
    "authorize:client": (120, 60),
    "token:client": (600, 60),
    "token:ip": (3000, 60),
    "introspect:credential": (6000, 60),
}


def _limit(name: str) -> tuple[int, int]:
    overrides = proxy_settings.RATE_LIMITS or {}
    return overrides.get(name, DEFAULT_LIMITS[name])


def rate_limit_hit(*, name: str, key: str) -> None:
    """Count one request; raise RateLimited (429 with Retry-After) once the window's budget is spent."""
    limit, window = _limit(name)
    if limit <= 0:
        return
    now = int(time.time())
    bucket = now // window
    # The key may hold client-supplied text (a client_id): hash it so any cache backend accepts it.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    count = _count(f"rl:{name}:{digest}:{bucket}", timeout=window + 1)
    if count > limit:
        raise RateLimited(retry_after=window - (now % window) or 1)


def _count(cache_key: str, *, timeout: int) -> int:
    """Add one to the counter *cache_key* (created with *timeout* seconds to live); return the new count."""
    return counters_add([(cache_key, timeout)])[0]


def counters_add(counters: list[tuple[str, int]]) -> list[int]:
    """Add one to each ``(cache key, seconds to live)`` counter; return the new counts. On Redis all of them
    in one round trip (one ``MULTI`` of ``INCR`` and ``EXPIRE`` per counter)."""
    redis = _redis_client()
    if redis is not None:
        pipe = redis.pipeline(transaction=True)
        for cache_key, timeout in counters:
            key = cache.make_key(cache_key)  # the cache's prefix and version, as django-redis would store it
            pipe.incr(key)
            pipe.expire(key, timeout)
        results = pipe.execute()
        return [int(count) for count in results[::2]]
    return [_count_one(cache_key, timeout) for cache_key, timeout in counters]


def _count_one(cache_key: str, timeout: int) -> int:
    # add() is atomic on Redis and locmem; incr() then counts.
    if cache.add(cache_key, 1, timeout=timeout):
        return 1
    try:
        return cache.incr(cache_key)
    except ValueError:  # expired between add and incr
        cache.add(cache_key, 1, timeout=timeout)
        return 1


def _redis_client():
    """The raw Redis client behind the default cache when it is django-redis, else None."""
    get_client = getattr(getattr(cache, "client", None), "get_client", None)
    return get_client(write=True) if get_client is not None else None


def client_ip(request) -> str:
    """The caller's address. Behind a load balancer configure it to set REMOTE_ADDR (uvicorn
    --proxy-headers with --forwarded-allow-ips)."""
    return request.META.get("REMOTE_ADDR", "unknown")
