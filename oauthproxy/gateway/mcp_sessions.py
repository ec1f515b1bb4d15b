"""MCP session ids bound to the grant that opened them (issue 13, finding 10), without a database query.

The internal server's ``Mcp-Session-Id`` reaches the client as ``<id>.<tag>``, the tag an HMAC of the id
and the grant's upstream session (which a refresh keeps): ``mcp_session_id_seal``. A client's id is
checked and unwrapped before it goes on (``mcp_session_id_open``); an id sealed for another grant, or one
the gateway never issued, is answered 404 (the MCP answer for a session the server does not know), so a
session id seen elsewhere is useless with another user's token. Stateless: any instance checks it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from functools import lru_cache
from uuid import UUID

from django.conf import settings

TAG_BYTES = 16
_SEPARATOR = "."


@lru_cache(maxsize=4)
def _key(secret: str) -> bytes:
    return hashlib.sha256(b"oauthproxy.gateway.mcp-session-id\x00" + secret.encode()).digest()


def _tag(session_id: str, grant_session: UUID) -> str:
    mac = hmac.new(_key(settings.SECRET_KEY), grant_session.bytes + session_id.encode("latin-1"), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:TAG_BYTES]).rstrip(b"=").decode()


def mcp_session_id_seal(*, session_id: str, grant_session: UUID) -> str:
    """The id the client sees for the internal server's ``session_id``."""
    return f"{session_id}{_SEPARATOR}{_tag(session_id, grant_session)}"


def mcp_session_id_open(*, value: str, grant_session: UUID) -> str | None:
    """The internal server's id inside a client's sealed ``value``; None unless sealed for this grant."""
    session_id, separator, tag = value.rpartition(_SEPARATOR)
    if not separator or not session_id:
        return None
    try:
        expected = _tag(session_id, grant_session)
    except UnicodeEncodeError:
        return None
    return session_id if hmac.compare_digest(tag, expected) else None
