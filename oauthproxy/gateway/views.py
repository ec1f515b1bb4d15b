"""``/mcp/<slug>``: the gateway's view. Parses, authenticates, calls ``gateway_forward``.

``gateway`` is an ordinary async Django view (routed in ``oauthproxy.urls``), so the URL works under any
Django ASGI setup and in Django's test client; ``gateway.asgi.gateway_asgi`` serves the same answers
(``gateway_handle``) straight from ASGI.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from oauthproxy.core import metrics
from oauthproxy.core.asgi import BodyTooLarge
from oauthproxy.core.exceptions import OAuthError, oauth_error_response
from oauthproxy.core.invalidation import invalidation_listen_ensure
from oauthproxy.db.errors import database_unreachable
from oauthproxy.gateway.auth import bearer_challenge, gateway_token_authenticate
from oauthproxy.gateway.forwarding import (
    ForwardedResponse,
    GatewayError,
    gateway_forward,
    jsonrpc_error,
    max_request_bytes,
)
from oauthproxy.gateway.policy import (
    gateway_access_check,
    tool_plan,
    tool_plan_answer,
    tool_refusals_audit,
    tool_response_filter,
)
from oauthproxy.gateway.servers import GatewayServer, gateway_server_get

logger = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "POST", "DELETE")


BodyReader = Callable[[int], Awaitable[bytes]]


class ClientGone(Exception):
    """The client disconnected before its request body arrived: there is no one to answer."""


async def _django_body(request: HttpRequest, limit: int) -> bytes:
    return request.read(limit + 1)  # Django's handler has the body already (spooled to disk when large)


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


async def gateway_handle(
    request: HttpRequest, slug: str, *, read_body: BodyReader | None = None
) -> HttpResponse | ForwardedResponse:
    """The gateway's answer: an error response of its own, or the internal server's (body unread).

    ``read_body(limit)`` reads the request body (``request.read`` by default); it is called only once
    the slug, the method, the token and the declared ``Content-Length`` passed, so a refused request
    costs no body memory (issue 13, finding 5). It returns at most ``limit + 1`` bytes or raises
    ``BodyTooLarge``/``ClientGone``.
    """
    started = time.perf_counter()
    invalidation_listen_ensure()  # revocations from other processes (a flag check once started)
    try:
        result = await _handle(request, slug, read_body or (lambda limit: _django_body(request, limit)))
    except DatabaseError as exc:
        if not database_unreachable(exc):
            raise  # a bug, not an outage: a 500 with its traceback
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


async def _handle(request: HttpRequest, slug: str, read_body: BodyReader) -> HttpResponse | ForwardedResponse:
    if request.method not in ALLOWED_METHODS:
        response = jsonrpc_response(405, f"Method {request.method} is not allowed here.")
        response["Allow"] = ", ".join(ALLOWED_METHODS)
        return response
    server = await gateway_server_get(slug=slug)
    if server is None:
        return jsonrpc_response(404, "There is no MCP server here.")
    try:
        grant = await gateway_token_authenticate(server=server, authorization=request.headers.get("Authorization"))
        gateway_access_check(server=server, grant=grant)
    except OAuthError as exc:
        return _refused(server, exc)
    if server.url is None:
        return jsonrpc_response(503, "This MCP server has no usable internal URL configured.")
    body = b""
    if request.method == "POST":
        limit = max_request_bytes()
        try:
            if _declared_length(request) > limit:  # refused before a byte of it is read
                return too_large_response()
            body = await read_body(limit)
        except BodyTooLarge:
            return too_large_response()
        except ValueError:
            return jsonrpc_response(400, "The Content-Length header is not a number.")
        if len(body) > limit:
            return too_large_response()
    plan = None
    if server.tool_policy and body:
        routing = (request.headers.get("Mcp-Method"), request.headers.get("Mcp-Name"))
        plan = tool_plan(server=server, grant=grant, body=body, routing=routing)
    if plan is not None:
        await tool_refusals_audit(server=server, grant=grant, plan=plan)
        if plan.body is None:
            return tool_plan_answer(plan)
        body = plan.body
    try:
        result = await gateway_forward(
            server=server, grant=grant, method=request.method, headers=request.headers.items(), body=body
        )
        if server.tool_policy:  # every answer, GET streams too: they may replay a tools/list result
            result = await tool_response_filter(server=server, grant=grant, plan=plan, response=result)
        return result
    except OAuthError as exc:
        return _refused(server, exc)
    except GatewayError as exc:
        response = jsonrpc_response(exc.status, exc.message)
        if exc.retry_after:
            response["Retry-After"] = str(exc.retry_after)
        return response


def _declared_length(request: HttpRequest) -> int:
    """The request's ``Content-Length`` (0 when absent); ValueError when it is not a number."""
    value = request.headers.get("Content-Length", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(value)
    return int(value)


def too_large_response() -> HttpResponse:
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
