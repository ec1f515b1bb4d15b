"""``/mcp/<slug>`` straight from ASGI (``proxy_site.asgi`` sends gateway paths here).

``gateway_asgi`` serves the answers of the ``gateway`` view (``gateway.views.gateway_handle``) without
Django's ASGI handler and middleware stack, whose synchronous middlewares each cost a thread hop per request
under ASGI (about 1 ms per request together); none of them has work to do here: no session, user, CSRF
(the endpoint takes bearer tokens only) or HTML. It keeps what matters: reading the body, building the
Django request, cancelling the response when the client disconnects. Which paths are gateway paths comes
from the URL table (``oauthproxy.urls.GATEWAY_PATH``, the gateway route's own pattern).
"""

from __future__ import annotations

import asyncio
import io
import logging

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase

from oauthproxy.core.asgi import body_read, django_response_send, headers_encode, response_send
from oauthproxy.gateway.forwarding import ForwardedResponse
from oauthproxy.gateway.views import ClientGone, gateway_handle, jsonrpc_response
from oauthproxy.urls import GATEWAY_PATH

logger = logging.getLogger(__name__)


# -- the lean ASGI entry -----------------------------------------------------------------------------

def gateway_path_slug(scope: dict) -> str | None:
    """The slug when this HTTP scope is a gateway request, else None."""
    path = scope["path"]
    root_path = scope.get("root_path") or ""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    match = GATEWAY_PATH.match(path[1:]) if path.startswith("/") else None  # the route has no leading slash
    return match["slug"] if match else None


async def gateway_asgi(scope: dict, receive, send, *, slug: str) -> None:
    """Serve one gateway request over ASGI with the ``gateway`` view and no middleware.

    The request is built from the headers alone: the body is read from ``receive`` only after the
    gateway authenticated the request (``gateway_handle``'s ``read_body``), so a stranger's large body
    is never buffered (issue 13, finding 5).
    """

    async def read_body(limit: int) -> bytes:
        body = await body_read(receive, limit=limit)
        if body is None:
            raise ClientGone()
        return body

    try:
        request = ASGIRequest(scope, io.BytesIO(b""))
        result = await gateway_handle(request, slug, read_body=read_body)
    except ClientGone:  # the client went away
        return
    except UnicodeDecodeError:  # as Django's handler: a query string that is not UTF-8
        result = jsonrpc_response(400, "The request could not be decoded.")
    except Exception:  # the last-chance handler Django's ASGI handler would be
        logger.exception("gateway %s: unexpected error", slug)
        result = jsonrpc_response(500, "The gateway failed unexpectedly.")
    if isinstance(result, HttpResponseBase):
        await django_response_send(result, send)
        return
    if result.content is not None:  # small and complete: one piece, with a Content-Length
        try:
            await response_send(send, status=result.status, headers=result.headers.items(), content=result.content)
        finally:
            await result.aclose()
        return
    # Stream until the body ends or the client disconnects, whichever comes first. A disconnect
    # cancels the sender; either way the relay is closed, and with it the internal connection.
    sender = asyncio.ensure_future(_send_forwarded(result, send))
    listener = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((sender, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (listener, sender):
            if not task.done():
                task.cancel()
        await asyncio.wait((sender, listener))
    if not sender.cancelled() and sender.exception() is not None:
        logger.error("gateway %s: streaming the response failed", slug, exc_info=sender.exception())


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_forwarded(forwarded: ForwardedResponse, send) -> None:
    try:
        headers = headers_encode(forwarded.headers.items())
        await send({"type": "http.response.start", "status": forwarded.status, "headers": headers})
        async for chunk in forwarded.body:
            if forwarded.complete:  # the internal server's body has ended: ours ends in the same write
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
                return
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        await forwarded.aclose()
