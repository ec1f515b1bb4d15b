"""Per-process caches of rows that nearly every request reads and that change rarely.

``TTLCache`` is the building block (the gateway's token caches use it too). The MCP server of the URL is
read by every OAuth and gateway request; ``servers`` keeps it for ``proxy_settings.SERVER_CACHE_SECONDS``
(5 s by default), the gateway through an immutable view of the row (``ModelCache.view``). A save or delete
in this process clears it at once (``post_save``/``post_delete`` signals, wired in ``apps.py``); other
processes see the change within the TTL, as they see revocations at the gateway. Callers get their own
copy of the cached instance, so nothing a request sets on it leaks.

``clients`` keeps the client rows that ``authserver.cimd.client_resolve`` looks up on every authorize and
token request, by (server id, ``client_id``), for ``proxy_settings.CLIENT_CACHE_SECONDS`` (5 s by default);
``client_cache_forget`` drops a client's entry when it is saved or deleted in this process, and again when
that transaction commits (see ``authserver/cimd.py`` for what the cache may and may not decide).

``SingleFlight`` lets concurrent async cache misses for one key share one load.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from django.db import transaction

from oauthproxy.core.settings import proxy_settings

T = TypeVar("T")
V = TypeVar("V")



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


class _Entry:
    """One cached row (``None``: no such row) and the read-only views derived from it so far."""

    __slots__ = ("instance", "views")

    def __init__(self, instance):
        self.instance = instance
        self.views: dict[Callable, object] = {}

    def view(self, make: Callable[[object], V]) -> V:
        try:
            return self.views[make]
        except KeyError:
            made = self.views[make] = make(self.instance)  # two racing threads make equal views: harmless
            return made


MISS = object()
"""``ModelCache.view``: nothing is cached under this key (load it with ``ModelCache.view_load``)."""


class ModelCache(Generic[T]):
    """Model instances (or ``None`` for "no such row") by key, loaded on a miss, copied on the way out.

    Async callers that must not touch the database on a hit (the gateway) ask for a *view* instead: an
    immutable value derived from the cached row by ``make(instance or None)``, made once per cached entry,
    so it lives and is dropped with the row (same time to live, same signals)."""

    def __init__(self, *, maxsize: int, setting: str):
        self._entries: TTLCache[_Entry] = TTLCache(maxsize=maxsize)
        self._setting = setting  # the proxy setting holding the time to live, in seconds

    def _load(self, key: Hashable, load: Callable[[], T | None]) -> _Entry:
        entry = _Entry(load())
        ttl = getattr(proxy_settings, self._setting)
        if ttl > 0:
            self._entries.set(key, entry, ttl=ttl)
        return entry

    def get(self, key: Hashable, load: Callable[[], T | None]) -> T | None:
        entry = self._entries.get(key) or self._load(key, load)
        return None if entry.instance is None else copy.copy(entry.instance)

    def view(self, key: Hashable, make: Callable[[T | None], V]) -> V | object:
        """The view ``make`` of the cached entry, or ``MISS``. Never loads: no database access."""
        entry = self._entries.get(key)
        return MISS if entry is None else entry.view(make)

    def view_load(self, key: Hashable, load: Callable[[], T | None], make: Callable[[T | None], V]) -> V:
        """Load the row (a database read: run it off the event loop), cache it, and return its view."""
        return self._load(key, load).view(make)

    def clear(self) -> None:
        self._entries.clear()


servers = ModelCache(maxsize=1000, setting="SERVER_CACHE_SECONDS")
"""THE server cache: enabled servers by slug (``None``: unknown or disabled), for the OAuth endpoints
(``core.servers.server_get_enabled``) and the gateway (its ``GatewayServer`` view)."""


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


# -- single flight -----------------------------------------------------------------------------------

class SingleFlight:
    """Concurrent callers with the same key share one running load instead of each starting their own.

    The load runs as its own task, so a caller that goes away (client disconnect) does not cancel it for
    the others. Keys are per event loop: a task belongs to the loop that created it.
    """

    def __init__(self) -> None:
        self._tasks: dict[tuple[int, Hashable], asyncio.Task] = {}

    async def run(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        slot = (id(loop), key)
        task = self._tasks.get(slot)
        if task is None:
            task = loop.create_task(load())
            self._tasks[slot] = task
            task.add_done_callback(lambda done: self._finished(slot, done))
        return await asyncio.shield(task)

    def _finished(self, slot: tuple[int, Hashable], task: asyncio.Task) -> None:
        if self._tasks.get(slot) is task:
            del self._tasks[slot]
        if not task.cancelled():
            task.exception()  # retrieved: no "exception never retrieved" noise when every caller left
