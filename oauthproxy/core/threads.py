"""Database work from async code (the ASGI entry points), off the event loop.

``run_in_db_thread`` runs a function in a worker thread, handling its database connection the way Django
does per request. Short cache refills run on a few dedicated threads that keep their connections.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

T = TypeVar("T")

CACHE_LOAD_THREADS = 2  # per process: threads (and database connections) for cache refills

_cache_load_executor: ThreadPoolExecutor | None = None


def _cache_load_threads() -> ThreadPoolExecutor:
    # Created on first use, in the worker process that uses it.
    global _cache_load_executor
    if _cache_load_executor is None:
        _cache_load_executor = ThreadPoolExecutor(max_workers=CACHE_LOAD_THREADS, thread_name_prefix="db-cache-load")
    return _cache_load_executor


async def run_in_db_thread(fn: Callable[..., T], /, *args: Any, cache_load: bool = False, **kwargs: Any) -> T:
    """Run database work in a worker thread, handling its connection the way Django does per request.

    ``cache_load``: a short indexed read filling a cache. These run on a few dedicated threads, each
    keeping its database connection (``CONN_MAX_AGE``), so a cache refill costs the query and Django's
    connection health check, not a new connection. Anything that may block (row locks, upstream calls)
    runs on the event loop's default executor instead.
    """
    executor = _cache_load_threads() if cache_load else None
    return await sync_to_async(_with_connection_hygiene, thread_sensitive=False, executor=executor)(
        fn, *args, **kwargs
    )


def _with_connection_hygiene(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Worker threads see no request_started/finished signals: drop broken or expired connections
    # ourselves, before (a stale pooled one) and after (CONN_MAX_AGE reached; 0 closes it right away).
    close_old_connections()
    try:
        return fn(*args, **kwargs)
    finally:
        close_old_connections()


