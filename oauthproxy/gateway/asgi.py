"""``/mcp/<slug>``: the gateway's HTTP face. Parses, authenticates, calls ``gateway_forward``, streams.

Two ways in, one view:

- ``gateway`` is an ordinary async Django view (routed in ``oauthproxy.gateway.urls``), so the URL works
  under any Django ASGI setup and in Django's test client.
- ``gateway_asgi`` serves the same view straight from ASGI (``proxy_site.asgi`` sends ``/mcp/...`` there).
  It skips Django's middleware stack, whose synchronous middlewares each cost a thread hop per request
  under ASGI (about 1 ms per request together); none of them has work to do here: no session, user,
  CSRF (the endpoint takes bearer tokens only) or HTML. It keeps what matters: reading the body,
  building the Django request, cancelling the response when the client disconnects.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time

from django.core.handlers.asgi import ASGIRequest
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from oauthproxy.core import metrics
from oauthproxy.core.asgi import BodyTooLarge, body_read, django_response_send, headers_encode, response_send
from oauthproxy.core.exceptions import OAuthError, oauth_error_response
from oauthproxy.gateway.auth import bearer_challenge, gateway_token_authenticate
from oauthproxy.gateway.forwarding import (
    ForwardedResponse,
    GatewayError,
    gateway_forward,
    jsonrpc_error,
    max_request_bytes,
)
from oauthproxy.gateway.servers import GatewayServer, gateway_server_get

logger = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "POST", "DELETE")
# The slug part of the route, as in oauthproxy.gateway.urls (a trailing slash is tolerated).
GATEWAY_PATH = re.compile(r"^/mcp/(?P<slug>[a-z0-9-]{1,64})/?$")


@csrf_exempt
async def gateway(request: HttpRequest, slug: str) -> HttpResponseBase:
    result = await gateway_handle(request, slug)
    if isinstance(result, HttpResponseBase):
        return result
    if result.content is not None:
        response = HttpResponse(result.content, status=result.status, headers=result.headers)
    else:
        response = StreamingHttpResponse(result.body, status=result.status, headers=result.headers)
    if "content-type" not in result.headers:
        del response["Content-Type"]  # Django's text/html default would be a lie
    return response


async def gateway_handle(request: HttpRequest, slug: str) -> HttpResponse | ForwardedResponse:
    """The gateway's answer: an error response of its own, or the internal server's (body unread)."""
    started = time.perf_counter()
    try:
        result = await _handle(request, slug)
    except DatabaseError:
        # Only cache misses reach the database: cached tokens keep working while it is away.
        logger.exception("gateway %s: database unavailable", slug)
        result = jsonrpc_response(503, "The gateway is temporarily unavailable; try again shortly.")
        result["Retry-After"] = "5"
    own_answer = isinstance(result, HttpResponseBase)
    status = result.status_code if own_answer else result.status
    # The gateway's own 404/405 come before the server is known to exist: no slug label for those.
    metrics.gateway_request_record(
        server=None if own_answer and status in (404, 405) else slug,
        method=request.method,
        status=status,
        seconds=time.perf_counter() - started,  # until headers: long SSE streams do not distort it
    )
    return result


async def _handle(request: HttpRequest, slug: str) -> HttpResponse | ForwardedResponse:
    if request.method not in ALLOWED_METHODS:
        response = jsonrpc_response(405, f"Method {request.method} is not allowed here.")
        response["Allow"] = ", ".join(ALLOWED_METHODS)
        return response
    server = await gateway_server_get(slug=slug)
    if server is None:
        return jsonrpc_response(404, "There is no MCP server here.")
    try:
        grant = await gateway_token_authenticate(server=server, authorization=request.headers.get("Authorization"))
    except OAuthError as exc:
        return _refused(server, exc)
    if server.url is None:
        return jsonrpc_response(503, "This MCP server has no usable internal URL configured.")
    body = b""
    if request.method == "POST":
        limit = max_request_bytes()
        body = request.read(limit + 1)
        if len(body) > limit:
            return _too_large()
    try:
        return await gateway_forward(
            server=server, grant=grant, method=request.method, headers=request.headers.items(), body=body
        )
    except OAuthError as exc:
        return _refused(server, exc)
    except GatewayError as exc:
        response = jsonrpc_response(exc.status, exc.message)
        if exc.retry_after:
            response["Retry-After"] = str(exc.retry_after)
        return response


def _too_large() -> HttpResponse:
    return jsonrpc_response(413, "The request body is too large.")


def _refused(server: GatewayServer, exc: OAuthError) -> HttpResponse:
    return oauth_error_response(exc, headers={"WWW-Authenticate": bearer_challenge(server, exc)})


def jsonrpc_response(status: int, message: str) -> HttpResponse:
    """A gateway error as MCP clients read it: a JSON-RPC error object (``id`` null: not request-bound)."""
    response = HttpResponse(
        json.dumps(jsonrpc_error(message)), status=status, content_type="application/json"
    )
    response["Cache-Control"] = "no-store"
    return response


# -- the lean ASGI entry -----------------------------------------------------------------------------

def gateway_path_slug(scope: dict) -> str | None:
    """The slug when this HTTP scope is a gateway request, else None."""
    path = scope["path"]
    root_path = scope.get("root_path") or ""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    match = GATEWAY_PATH.match(path)
    return match["slug"] if match else None


async def gateway_asgi(scope: dict, receive, send, *, slug: str) -> None:
    """Serve one gateway request over ASGI with the ``gateway`` view and no middleware."""
    try:
        body = await body_read(receive, limit=max_request_bytes())
    except BodyTooLarge:
        await django_response_send(_too_large(), send)
        return
    if body is None:  # the client went away
        return
    try:
        request = ASGIRequest(scope, io.BytesIO(body))
        result = await gateway_handle(request, slug)
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
