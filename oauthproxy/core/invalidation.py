"""Revocation reaches every process at once (issue 13, finding 9): an ended session, a disabled or
deleted client, a changed server is forgotten by the per-process caches of the process that made the
change when its transaction commits, and by every other process through PostgreSQL ``LISTEN/NOTIFY``
(channel ``oauthproxy_invalidate``) within a fraction of a second. When the channel is down (another
database, a lost connection being re-established) the caches' lifetimes remain the bound, as before.

Handlers are registered by the parts that own caches (``apps.ready``); ``invalidation_publish`` is called
by the model signals; ``invalidation_listen_ensure`` starts this process's listener thread (the gateway
calls it on its first request: a flag check afterwards).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import connection, connections, transaction

from oauthproxy.core.settings import proxy_settings

logger = logging.getLogger(__name__)

CHANNEL = "oauthproxy_invalidate"
RECONNECT_SECONDS = 1.0

_handlers: list[Callable[[str, str], None]] = []
_listener: threading.Thread | None = None
_listener_lock = threading.Lock()
_stop = threading.Event()
_listening = threading.Event()


def invalidation_handler_register(handler: Callable[[str, str], None]) -> None:
    """``handler(kind, key)`` runs for every invalidation, local or from another process."""
    if handler not in _handlers:
        _handlers.append(handler)


def invalidation_publish(*, kind: str, key: str) -> None:
    """Forget ``kind:key`` here and in every other process once the current transaction commits."""
    transaction.on_commit(lambda: _deliver(kind, key))


def _deliver(kind: str, key: str) -> None:
    invalidation_apply(kind, key)
    if connection.vendor != "postgresql":
        return
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"{kind}:{key}"])
    except Exception:  # the other processes fall back to their cache lifetimes
        logger.warning("invalidation: could not notify other processes of %s", kind, exc_info=True)


def invalidation_apply(kind: str, key: str) -> None:
    for handler in _handlers:
        try:
            handler(kind, key)
        except Exception:
            logger.exception("invalidation handler failed for %s", kind)


def invalidation_listen_ensure() -> None:
    """Start this process's listener thread once (PostgreSQL only)."""
    global _listener
    if _listener is not None and _listener.is_alive():
        return
    with _listener_lock:
        if _listener is not None and _listener.is_alive():
            return
        if connections["default"].vendor != "postgresql" or not proxy_settings.INVALIDATION_LISTEN:
            return
        _stop.clear()
        _listener = threading.Thread(target=_listen_forever, name="invalidation-listener", daemon=True)
        _listener.start()


def invalidation_listen_stop() -> None:
    """Stop the listener thread (tests; the process exiting stops it too)."""
    global _listener
    _stop.set()
    if _listener is not None:
        _listener.join(timeout=5)
        _listener = None


def invalidation_listening() -> bool:
    return _listening.is_set()


def _listen_forever() -> None:
    import psycopg

    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    while not _stop.is_set():
        try:
            with psycopg.connect(**params, autocommit=True) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                _listening.set()
                while not _stop.is_set():
                    for notify in conn.notifies(timeout=0.5):
                        kind, _, key = notify.payload.partition(":")
                        invalidation_apply(kind, key)
        except Exception:
            logger.warning("invalidation: listener connection lost; caches fall back to their lifetimes")
        finally:
            _listening.clear()
        _stop.wait(RECONNECT_SECONDS)
