"""Per-process caches of rows that nearly every request reads and that change rarely.

``TTLCache`` is the building block (the gateway's token and server caches use it too). The MCP server of
the URL is read by every OAuth request; ``server_cached`` keeps it for ``proxy_settings.SERVER_CACHE_SECONDS``
(5 s by default). A save or delete in this process clears it at once (``post_save``/``post_delete``
signals, wired in ``apps.py``); other processes see the change within the TTL, as they see revocations at
the gateway. Callers get their own copy of the cached instance, so nothing a request sets on it leaks.

``clients`` keeps the client rows that ``services.cimd.client_resolve`` looks up on every authorize and
token request, by (server id, ``client_id``), for ``proxy_settings.CLIENT_CACHE_SECONDS`` (5 s by default);
``client_cache_forget`` drops a client's entry when it is saved or deleted in this process, and again when
that transaction commits (see ``services/cimd.py`` for what the cache may and may not decide).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from django.db import transaction

from oauthproxy.core.settings import proxy_settings

T = TypeVar("T")

_MISSING = object()


class TTLCache(Generic[T]):
    """A bounded LRU whose entries expire after a time to live. Thread-safe; all operations O(1)."""

    def __init__(self, *, maxsize: int):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, tuple[T, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> T | None:
        now = time.monotonic()
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return entry[0]

    def set(self, key: Hashable, value: T, *, ttl: float) -> None:
        with self._lock:
            self._data[key] = (value, time.monotonic() + ttl)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class ModelCache(Generic[T]):
    """Model instances (or ``None`` for "no such row") by key, loaded on a miss, copied on the way out."""

    def __init__(self, *, maxsize: int, setting: str):
        self._entries: TTLCache[object] = TTLCache(maxsize=maxsize)
        self._setting = setting  # the proxy setting holding the time to live, in seconds

    def get(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        cached = self._entries.get(key)
        if cached is None:
            loaded = load()
            cached = _MISSING if loaded is None else loaded
            ttl = getattr(proxy_settings, self._setting)
            if ttl > 0:
                self._entries.set(key, cached, ttl=ttl)
        return None if cached is _MISSING else copy.copy(cached)

    def clear(self) -> None:
        self._entries.clear()


servers = ModelCache(maxsize=1000, setting="SERVER_CACHE_SECONDS")


def server_cache_clear(**_signal_kwargs) -> None:
    servers.clear()


class KeyedModelCache(ModelCache[T]):
    """A ``ModelCache`` whose entries can also be dropped one by one, and whose copies share no mutable
    field value (a JSON field's dict or list) with the cached instance either."""

    def get(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        instance = super().get(key, load)
        if instance is not None:
            values = vars(instance)
            for name, value in values.items():
                if isinstance(value, dict | list):
                    values[name] = copy.deepcopy(value)
        return instance

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key)


clients: KeyedModelCache = KeyedModelCache(maxsize=10_000, setting="CLIENT_CACHE_SECONDS")


def client_cache_key(*, server_id, client_id: str) -> tuple:
    return (server_id, client_id)


def client_cache_forget(*, instance, **_signal_kwargs) -> None:
    """A client was saved or deleted: drop its entry now, and once more when the transaction commits, so a
    request of this process that read the old row before the commit cannot keep it for a whole TTL."""
    key = client_cache_key(server_id=instance.server_id, client_id=instance.client_id)
    clients.forget(key)
    transaction.on_commit(lambda: clients.forget(key), using=_signal_kwargs.get("using"), robust=True)


def client_cache_clear(**_signal_kwargs) -> None:
    clients.clear()
