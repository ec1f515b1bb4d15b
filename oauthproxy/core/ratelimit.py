"""Fixed-window rate limits on the shared cache (Redis in production, so limits hold across instances).

Open endpoints are limited per (endpoint, server, key), in two kinds (issue 13, finding 3: no lockouts by
strangers):

- *source* limits (``authorize:source``, ``token:source``, ``token:ip``, ``register:ip``) count every
  request, authenticated or not, per caller address together with the client_id it names: a stranger
  spends their own budget only, never a victim's, whose requests come from elsewhere;
- *client* limits (``authorize:client``, ``token:client``), which protect the shared upstream and the
  client's own users, count only requests that passed: a valid authorization request, a token request
  whose client authenticated and whose grant was good. They are checked before (``rate_limit_check``) and
  counted after (``rate_limit_count``), so junk naming a victim's client_id never fills them.

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
    "authorize:source": (120, 60),  # per address and client_id, every request
    "authorize:client": (120, 60),  # per client_id, valid authorization requests only
    "token:source": (600, 60),  # per address and client_id, every request
    "token:client": (600, 60),  # per client_id, successful token requests only
    "token:ip": (3000, 60),  # per address, requests without a client_id
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
    # The key may hold client-supplied text (a client_id): hashed so any cache backend accepts it.
    count = _count(_cache_key(name, key, now // window), timeout=window + 1)
    if count > limit:
        raise RateLimited(retry_after=window - (now % window) or 1)


def rate_limit_check(*, name: str, key: str) -> None:
    """Raise RateLimited when this window's budget is spent, without counting this request: with
    ``rate_limit_count`` after it succeeded, a limit only successful requests can fill."""
    limit, window = _limit(name)
    if limit <= 0:
        return
    now = int(time.time())
    if counter_get(_cache_key(name, key, now // window)) >= limit:
        raise RateLimited(retry_after=window - (now % window) or 1)


def rate_limit_count(*, name: str, key: str) -> None:
    """Count one successful request against ``name`` (see ``rate_limit_check``)."""
    limit, window = _limit(name)
    if limit > 0:
        _count(_cache_key(name, key, int(time.time()) // window), timeout=window + 1)


def _cache_key(name: str, key: str, bucket: int) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"rl:{name}:{digest}:{bucket}"


def counter_get(cache_key: str) -> int:
    """The value of the counter *cache_key* (0 when it does not exist or expired)."""
    redis = _redis_client()
    value = redis.get(cache.make_key(cache_key)) if redis is not None else cache.get(cache_key)
    return int(value or 0)


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
