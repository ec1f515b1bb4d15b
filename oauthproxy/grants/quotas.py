"""Per-client quotas on upstream-touching operations (shared-quota protection, DESIGN §1).

Every MCP client of a server reaches the upstream through the same single OAuth client, so the
upstream's rate limits and quotas are shared by all of them. One misbehaving client must not spend the
budget of the others: each client gets its own budget per minute and per day for the operations that
cost an upstream call (a login sent upstream, an upstream token refresh).

Counters live on the shared cache (Redis in production), in fixed windows aligned to the epoch (the day
window is the UTC day), so every process and host counts against the same budget. Limits come from the
server (``client_upstream_rate_limit``, ``client_upstream_daily_quota``), else from the settings
``proxy_settings.CLIENT_UPSTREAM_PER_MINUTE`` and ``CLIENT_UPSTREAM_PER_DAY``; 0 means unlimited.
"""

import time
from dataclasses import dataclass, field

from django.core.cache import cache

from oauthproxy.core.audit import audit_record
from oauthproxy.core.exceptions import RateLimited
from oauthproxy.core.ratelimit import counters_add
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import AuditEvent, Client

OPERATIONS = ("authorize", "refresh")
"""``authorize``: a user is sent to the upstream login (the code exchange follows from it);
``refresh``: the proxy refreshes an upstream token."""

WINDOWS = (("minute", 60), ("day", 86400))


class QuotaExceeded(RateLimited):
    """A client spent its budget of upstream operations: 429 with ``Retry-After``.

    Its error is ``temporarily_unavailable``, which RFC 6749 §4.1.2.1 defines for the authorization
    endpoint's error redirect (``slow_down``, the device flow's code, is not valid there)."""

    error = "temporarily_unavailable"

    def __init__(self, *, operation: str, window: str, limit: int, retry_after: int):
        super().__init__(
            f"This client has reached its limit of {limit} upstream operations per {window}; "
            f"retry in {retry_after} seconds.",
            retry_after=retry_after,
        )
        self.operation = operation
        self.window = window
        self.limit = limit


@dataclass(frozen=True)
class QuotaWindowUsage:
    window: str  # minute or day
    limit: int  # 0: unlimited
    used: int
    rejected: int
    by_operation: dict[str, int] = field(default_factory=dict)
    resets_in: int = 0

    @property
    def remaining(self) -> int | None:
        return None if not self.limit else max(self.limit - self.used, 0)


def quota_limits(*, server) -> dict[str, int]:
    """The per-client limits of a server: ``{"minute": n, "day": n}``; 0 is unlimited."""
    per_minute = server.client_upstream_rate_limit
    per_day = server.client_upstream_daily_quota
    return {
        "minute": int(proxy_settings.CLIENT_UPSTREAM_PER_MINUTE if per_minute is None else per_minute),
        "day": int(proxy_settings.CLIENT_UPSTREAM_PER_DAY if per_day is None else per_day),
    }


def _bucket(seconds: int, now: float) -> tuple[int, int]:
    """(bucket number, seconds until the bucket ends)."""
    now = int(now)
    return now // seconds, seconds - (now % seconds) or 1


def _key(client_pk, window: str, bucket: int, suffix: str = "") -> str:
    return f"quota:{client_pk}:{window}:{bucket}{':' + suffix if suffix else ''}"


def quota_consume(*, client: Client, operation: str) -> None:
    """Count one upstream operation for this client, or raise ``QuotaExceeded`` (a ``RateLimited``:
    429, ``Retry-After``) without counting it when either window's budget is spent.

    Call it right before the upstream call it guards. The first rejection of a window is audited.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown quota operation {operation!r}; use one of {', '.join(OPERATIONS)}")
    limits = quota_limits(server=client.server)
    now = time.time()
    buckets = [(window, seconds, *_bucket(seconds, now)) for window, seconds in WINDOWS]
    # The windows' counters and the operation's own, in one round trip; a refused operation takes them back.
    counters = [(_key(client.pk, window, bucket), seconds + 1) for window, seconds, bucket, _ in buckets]
    counters += [(_key(client.pk, window, bucket, operation), seconds + 1) for window, seconds, bucket, _ in buckets]
    counts = counters_add(counters)
    for (window, seconds, bucket, resets_in), count in zip(buckets, counts, strict=False):
        limit = limits[window]
        if limit and count > limit:
            for key, _ttl in counters:  # a refused operation spends nothing
                try:
                    cache.decr(key)
                except ValueError:  # the window just ended
                    pass
            counters_add([(_key(client.pk, window, bucket, "rejected"), seconds + 1)])
            if cache.add(_key(client.pk, window, bucket, "audited"), 1, timeout=seconds + 1):
                audit_record(
                    kind=AuditEvent.Kind.QUOTA_EXCEEDED,
                    server=client.server,
                    client=client,
                    message=f"{operation} refused: limit of {limit} upstream operations per {window} reached",
                    detail={"operation": operation, "window": window, "limit": limit},
                )
            raise QuotaExceeded(operation=operation, window=window, limit=limit, retry_after=resets_in)


def quota_usage(*, client: Client) -> list[QuotaWindowUsage]:
    """The counters of the current minute and day for one client (for the admin and the API)."""
    return quota_usage_many(clients=[client])[client.pk]


def quota_usage_many(*, clients) -> dict:
    """``{client.pk: [QuotaWindowUsage, ...]}`` with one cache round trip for all clients."""
    now = time.time()
    keys: dict[tuple, str] = {}
    for client in clients:
        for window, seconds in WINDOWS:
            bucket, _ = _bucket(seconds, now)
            keys[(client.pk, window, "")] = _key(client.pk, window, bucket)
            keys[(client.pk, window, "rejected")] = _key(client.pk, window, bucket, "rejected")
            for operation in OPERATIONS:
                keys[(client.pk, window, operation)] = _key(client.pk, window, bucket, operation)
    values = cache.get_many(list(keys.values())) if keys else {}

    def read(client_pk, window, suffix) -> int:
        return int(values.get(keys[(client_pk, window, suffix)]) or 0)

    usage = {}
    for client in clients:
        limits = quota_limits(server=client.server)
        usage[client.pk] = [
            QuotaWindowUsage(
                window=window,
                limit=limits[window],
                used=read(client.pk, window, ""),
                rejected=read(client.pk, window, "rejected"),
                by_operation={operation: read(client.pk, window, operation) for operation in OPERATIONS},
                resets_in=_bucket(seconds, now)[1],
            )
            for window, seconds in WINDOWS
        ]
    return usage
