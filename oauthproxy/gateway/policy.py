"""The access and tool policies at the gateway (DESIGN §4 "Gateway", "Access"; the rules: grants/access.py).

Decided from cached data only, no query per request: the server snapshot carries the policies (so a
policy change reaches existing sessions within the server cache lifetime), the validated token carries
the user's claims (kept on the upstream session, re-read at each upstream refresh).

Tool policy: only for servers that have one, and then only messages that can be ``tools/list`` or
``tools/call`` are parsed (a request body without ``"tools/`` is forwarded untouched).

- ``tools/call`` of a tool the user may not use is answered by the gateway with a JSON-RPC error naming
  the tool and the reason; the internal server never sees it (a batch goes on without it, and the
  answers are merged).
- ``tools/list`` results are filtered, in JSON and SSE answers, page by page (``nextCursor`` kept).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from django.http import HttpResponse

from oauthproxy.core import metrics
from oauthproxy.core.audit import audit_record
from oauthproxy.core.exceptions import InvalidToken
from oauthproxy.core.threads import run_in_db_thread
from oauthproxy.gateway.auth import TokenGrant
from oauthproxy.gateway.forwarding import ForwardedResponse, GatewayError
from oauthproxy.gateway.servers import GatewayServer
from oauthproxy.grants.access import UserClaims, access_decide, tool_decide
from oauthproxy.models import AuditEvent, Client, McpServer

logger = logging.getLogger(__name__)

TOOL_REFUSED_CODE = -32001  # JSON-RPC "server error" range: refused by the gateway's tool policy
MAX_FILTERED_BODY = 16 * 1024 * 1024  # a non-SSE answer to a tools/list is read whole up to this size
_SSE_SEPARATORS = (b"\r\n\r\n", b"\n\n")


def _user(grant: TokenGrant) -> UserClaims:
    return grant.user if grant.user is not None else UserClaims(subject=grant.subject)


def gateway_access_check(*, server: GatewayServer, grant: TokenGrant) -> None:
    """Refuse (``invalid_token``: the client signs in again, and is then told why) a user the server's
    access policy no longer admits."""
    if server.access is None:
        return
    if not access_decide(access=server.access, user=_user(grant)).allowed:
        raise InvalidToken("Your account is no longer allowed to use this MCP server.")


# -- requests ------------------------------------------------------------------------------------------


@dataclass
class ToolPlan:
    """What the tool policy does with one POST: the body to forward (``None``: nothing left to forward),
    the gateway's own answers to refused calls, and the ids of ``tools/list`` requests to filter."""

    body: bytes | None
    refusals: list[dict] = field(default_factory=list)
    list_ids: set = field(default_factory=set)
    batch: bool = False
    refused_tools: list[tuple[str, str]] = field(default_factory=list)  # (tool, reason), for the audit log

    @property
    def changes_response(self) -> bool:
        return bool(self.refusals or self.list_ids)


def tool_plan(*, server: GatewayServer, grant: TokenGrant, body: bytes) -> ToolPlan | None:
    """The plan for a POST body to a server with a tool policy; ``None``: nothing to do."""
    if b'"tools/' not in body:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None  # the internal server answers the parse error
    batch = isinstance(parsed, list)
    messages = parsed if batch else [parsed]
    user = _user(grant)
    plan = ToolPlan(body=body, batch=batch)
    kept = []
    for message in messages:
        if not isinstance(message, dict):
            kept.append(message)
            continue
        method = message.get("method")
        if method == "tools/list" and "id" in message:
            plan.list_ids.add(_id_key(message["id"]))
        elif method == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            decision = tool_decide(tool_policy=server.tool_policy, tool=name if isinstance(name, str) else "",
                                   user=user)
            if not decision.allowed:
                metrics.gateway_tool_refused(server=server.slug)
                if "id" in message:
                    plan.refusals.append(_refusal(message["id"], str(name), decision.reason))
                plan.refused_tools.append((str(name), decision.reason))
                continue
        kept.append(message)
    if len(kept) == len(messages):
        return plan if plan.list_ids else None
    if not kept:
        plan.body = None
    else:
        plan.body = json.dumps(kept if batch else kept[0], separators=(",", ":")).encode()
    return plan


def _refusal(request_id, tool: str, reason: str) -> dict:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": TOOL_REFUSED_CODE,
            "message": f"The tool {tool} is not available to you: {reason}",
            "data": {"tool": tool, "reason": reason},
        },
    }


def _id_key(value):
    return json.dumps(value)  # ids are strings or numbers; 1 and "1" stay apart


def tool_plan_answer(plan: ToolPlan) -> HttpResponse:
    """The gateway's answer when every message was refused (202 when none of them expects an answer)."""
    if not plan.refusals:
        return HttpResponse(status=202)
    payload = plan.refusals if plan.batch else plan.refusals[0]
    response = HttpResponse(json.dumps(payload), content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


async def tool_refusals_audit(*, server: GatewayServer, grant: TokenGrant, plan: ToolPlan) -> None:
    """Refused tool calls in the audit log (refusals are rare: a query each is fine)."""
    refused = plan.refused_tools
    if not refused:
        return

    def write() -> None:
        db_server = McpServer.objects.filter(pk=server.id).first()
        client = Client.objects.filter(client_id=grant.client_id).first()
        for tool, reason in refused:
            audit_record(kind=AuditEvent.Kind.ACCESS_DENIED, server=db_server, client=client,
                         subject=grant.subject, message=f"tools/call {tool} refused: {reason}"[:2000],
                         detail={"step": "tools/call", "tool": tool[:200]})

    try:
        await run_in_db_thread(write)
    except Exception:  # noqa: BLE001 (the refusal stands even when it cannot be recorded)
        logger.exception("gateway %s: could not record a refused tool call", server.slug)


# -- responses -----------------------------------------------------------------------------------------


async def tool_plan_apply(*, server: GatewayServer, grant: TokenGrant, plan: ToolPlan,
                          response: ForwardedResponse) -> ForwardedResponse:
    """The internal server's answer with ``tools/list`` results filtered and refusals merged in."""
    if not plan.changes_response:
        return response
    sse = response.headers.get("content-type", "").startswith("text/event-stream")
    if sse and response.body is not None:
        response.body = _sse_filtered(response, response.body, server=server, grant=grant, plan=plan)
        return response
    content = response.content
    if content is None and response.body is not None:
        chunks, size = [], 0
        async for chunk in response.body:
            size += len(chunk)
            if size > MAX_FILTERED_BODY:
                await response.aclose()
                raise _too_large(server)
            chunks.append(chunk)
        await response.aclose()
        content = b"".join(chunks)
    if not content:
        if plan.refusals:
            merged = json.dumps(plan.refusals if plan.batch else plan.refusals[0]).encode()
            headers = {**response.headers, "content-type": "application/json"}
            return ForwardedResponse(200 if response.status == 202 else response.status, headers, merged, None,
                                     response.internal)
        return response
    content = _json_filtered(content, server=server, grant=grant, plan=plan)
    return ForwardedResponse(response.status, response.headers, content, None, response.internal)


def _too_large(server: GatewayServer) -> GatewayError:
    logger.warning("gateway %s: a tools/list answer too large to filter", server.slug)
    return GatewayError("The MCP server's answer is too large to filter.", status=502)


def _filtered_message(message, *, server: GatewayServer, user: UserClaims, plan: ToolPlan):
    """A response message with its tools/list result filtered (others unchanged); (message, changed)."""
    if not isinstance(message, dict) or "id" not in message or _id_key(message["id"]) not in plan.list_ids:
        return message, False
    result = message.get("result")
    tools = result.get("tools") if isinstance(result, dict) else None
    if not isinstance(tools, list):
        return message, False
    visible = [
        tool for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("name"), str)
        and tool_decide(tool_policy=server.tool_policy, tool=tool["name"], user=user).allowed
    ]
    return {**message, "result": {**result, "tools": visible}}, True


def _json_filtered(content: bytes, *, server: GatewayServer, grant: TokenGrant, plan: ToolPlan) -> bytes:
    try:
        parsed = json.loads(content)
    except ValueError:
        return content
    user = _user(grant)
    if isinstance(parsed, list):
        messages = [_filtered_message(m, server=server, user=user, plan=plan)[0] for m in parsed]
        return json.dumps([*messages, *plan.refusals]).encode()
    message, changed = _filtered_message(parsed, server=server, user=user, plan=plan)
    if plan.refusals:  # a batch of which one message went on: answer as a batch
        return json.dumps([message, *plan.refusals]).encode()
    return json.dumps(message).encode() if changed else content


def _sse_event(message: dict) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


def _sse_filtered_event(event: bytes, *, server: GatewayServer, user: UserClaims, plan: ToolPlan) -> bytes:
    """One SSE event (with its separator) with a tools/list result in its data filtered."""
    if b'"tools"' not in event:
        return event
    lines = event.splitlines()
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    try:
        message = json.loads(data)
    except ValueError:
        return event
    message, changed = _filtered_message(message, server=server, user=user, plan=plan)
    if not changed:
        return event
    others = [line for line in lines if line and not line.startswith(b"data:")]
    payload = json.dumps(message, separators=(",", ":")).encode()
    return b"\n".join([*others, b"data: " + payload]) + b"\n\n"


async def _sse_filtered(
    response: ForwardedResponse,
    body: AsyncGenerator[bytes, None],
    *,
    server: GatewayServer,
    grant: TokenGrant,
    plan: ToolPlan,
) -> AsyncGenerator[bytes, None]:
    """The SSE stream, event by event where an event may answer a tools/list; refusals first. Whatever
    is left when the internal server's body ends goes out with its last chunk (the ASGI sender ends the
    response on the chunk read when the internal body completes)."""
    user = _user(grant)
    pending = b"".join(_sse_event(refusal) for refusal in plan.refusals)
    buffer = b""
    try:
        async for chunk in body:
            buffer += chunk
            out = [pending]
            pending = b""
            while True:
                cut = _event_end(buffer)
                if cut is None:
                    break
                event, buffer = buffer[:cut], buffer[cut:]
                out.append(_sse_filtered_event(event, server=server, user=user, plan=plan))
            if response.complete:
                out.append(buffer)
                buffer = b""
            yield b"".join(out)
        if pending or buffer:
            yield pending + buffer
    finally:
        await body.aclose()


def _event_end(buffer: bytes) -> int | None:
    ends = [(buffer.find(sep), len(sep)) for sep in _SSE_SEPARATORS]
    found = [(at, size) for at, size in ends if at >= 0]
    if not found:
        return None
    at, size = min(found)
    return at + size
