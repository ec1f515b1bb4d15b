"""The access and tool policies at the gateway (DESIGN §4 "Gateway", "Access"; the rules: grants/access.py).

Decided from cached data only, no query per request: the server snapshot carries the policies (so a
policy change reaches existing sessions within the server cache lifetime), the validated token carries
the user's claims (kept on the upstream session, re-read at each upstream refresh).

Tool policy: only for servers that have one (others are not looked at), and then:

- requests: a POST body that may name a ``tools/`` method (``_MAY_NAME_TOOLS``: the text itself, or a
  JSON escape or encoding that could spell it) is parsed. ``tools/call`` of a tool the user may not use is
  answered by the gateway with a JSON-RPC error naming the tool and the reason; the internal server never
  sees it (a batch goes on without it, and the answers are merged). A body the gateway cannot read is
  refused (400) rather than forwarded: the internal server must never act on what the policy did not see.
  The SEP-2243 routing headers (``Mcp-Method``, ``Mcp-Name``), which an internal server may route on
  instead of the body, must mirror the body's one message when sent (else 400).
- responses: every answer the gateway relays, POST or GET (the standalone SSE stream, a stream resumed
  with ``Last-Event-ID`` that replays earlier answers), has its ``tools/list`` results filtered, page by
  page (``nextCursor`` kept). A ``tools/list`` result is recognized by its shape, not by the id of a
  request the gateway saw: any JSON-RPC response whose ``result`` holds a ``tools`` list. Ids are the
  client's to choose (``1`` and ``1.0``, an id reused across requests), and a replayed answer has no
  request at all. Only JSON bodies and SSE events containing ``"tools"`` are parsed; an event or body
  containing it that cannot be read is dropped (SSE) or refused (JSON), never passed on unfiltered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.core.cache import cache
from django.http import HttpResponse

from oauthproxy.core import metrics
from oauthproxy.core.audit import audit_record
from oauthproxy.core.exceptions import InvalidToken
from oauthproxy.core.ratelimit import counter_get, counters_add
from oauthproxy.core.threads import run_in_db_thread
from oauthproxy.gateway.auth import TokenGrant
from oauthproxy.gateway.forwarding import ForwardedResponse, GatewayError
from oauthproxy.gateway.servers import GatewayServer
from oauthproxy.grants.access import UserClaims, access_decide, tool_decide
from oauthproxy.models import AuditEvent, Client, McpServer

logger = logging.getLogger(__name__)

TOOL_REFUSED_CODE = -32001  # JSON-RPC "server error" range: refused by the gateway's tool policy
PARSE_ERROR_CODE = -32700
INVALID_REQUEST_CODE = -32600
MAX_FILTERED_BODY = 16 * 1024 * 1024  # the most of one answer (JSON body, SSE event) held back to filter it
REFUSAL_AUDIT_WINDOW = 60  # seconds: one audit row per (server, user, client, tool) and window
REFUSAL_AUDIT_TOOLS = 10  # tools with a row of their own per (server, user, client) and window

# What a body naming a tools/ method must contain: the text itself, or a JSON escape that can spell it
# without it ("tools\/call", "\u0074ools/call"), or a NUL (JSON in UTF-16 or UTF-32, which json.loads
# reads). Bodies without any of these cannot name a tools/ method and are forwarded unparsed.
_MAY_NAME_TOOLS = re.compile(rb'"tools/|\\[u/]|\x00')
_TOOLS_KEY = b'"tools"'
# The end of an SSE event: a line ending followed by an empty line, lines ending in CRLF, LF or CR
# (atomic groups: a CRLF is one line ending, never a line and an empty line).
_SSE_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")


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
    """What the tool policy does with one POST: the body to forward (``None``: nothing left to forward,
    or nothing that may be forwarded) and the gateway's own answers to refused calls."""

    body: bytes | None
    refusals: list[dict] = field(default_factory=list)
    batch: bool = False
    refused_tools: list[tuple[str, str]] = field(default_factory=list)  # (tool, reason), for the audit log
    unreadable: bool = False  # the body may name a tools/ method but is not JSON the gateway can read
    routing_mismatch: bool = False  # Mcp-Method / Mcp-Name headers that do not mirror the body


def tool_plan(*, server: GatewayServer, grant: TokenGrant, body: bytes,
              routing: tuple[str | None, str | None] = (None, None)) -> ToolPlan | None:
    """The plan for a POST body to a server with a tool policy; ``None``: forward it as it is.

    *routing* is the request's ``Mcp-Method`` and ``Mcp-Name`` headers (SEP-2243), which an internal server
    or an intermediary may route on instead of the body: when either is sent, it must mirror the body's one
    message, or nothing is forwarded (a 400), so no tool is reached by a name the policy did not check."""
    routed = routing != (None, None)
    if not routed and not _MAY_NAME_TOOLS.search(body):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        # What the gateway cannot read, it cannot check: refused, not left to a more lenient parser.
        return ToolPlan(body=None, unreadable=True)
    batch = isinstance(parsed, list)
    messages = parsed if batch else [parsed]
    if routed and (batch or not _routing_mirrors(parsed, *routing)):
        return ToolPlan(body=None, routing_mismatch=True)
    user = _user(grant)
    plan = ToolPlan(body=body, batch=batch)
    kept = []
    for message in messages:
        if isinstance(message, dict) and message.get("method") == "tools/call":
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
        return None
    if not kept:
        plan.body = None
    else:
        plan.body = json.dumps(kept if batch else kept[0], separators=(",", ":")).encode()
    return plan


def _routing_mirrors(message, method: str | None, name: str | None) -> bool:
    """Whether the ``Mcp-Method`` / ``Mcp-Name`` headers sent say what the message says."""
    if not isinstance(message, dict):
        return False
    params = message.get("params")
    params = params if isinstance(params, dict) else {}
    body_name = params.get("name", params.get("uri"))
    if method is not None and method != message.get("method"):
        return False
    return name is None or name == body_name


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


def tool_plan_answer(plan: ToolPlan) -> HttpResponse:
    """The gateway's answer when nothing is forwarded: a parse error for an unreadable body, else the
    refusals (202 when none of them expects an answer)."""
    if plan.unreadable:
        payload = {"jsonrpc": "2.0", "id": None,
                   "error": {"code": PARSE_ERROR_CODE, "message": "Parse error: the request is not valid JSON."}}
        response = HttpResponse(json.dumps(payload), status=400, content_type="application/json")
    elif plan.routing_mismatch:
        payload = {"jsonrpc": "2.0", "id": None,
                   "error": {"code": INVALID_REQUEST_CODE,
                             "message": "The Mcp-Method and Mcp-Name headers do not match the request body."}}
        response = HttpResponse(json.dumps(payload), status=400, content_type="application/json")
    elif not plan.refusals:
        return HttpResponse(status=202)
    else:
        payload = plan.refusals if plan.batch else plan.refusals[0]
        response = HttpResponse(json.dumps(payload), content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


async def tool_refusals_audit(*, server: GatewayServer, grant: TokenGrant, plan: ToolPlan) -> None:
    """Refused tool calls in the audit log, bounded (``tool_refusals_record``); the refusal stands even
    when it cannot be recorded."""
    if not plan.refused_tools:
        return
    try:
        await run_in_db_thread(lambda: tool_refusals_record(
            server_id=server.id, subject=grant.subject, client_id=grant.client_id, refused=plan.refused_tools,
            now=time.time()))
    except Exception:  # noqa: BLE001 (the refusal stands even when it cannot be recorded)
        logger.exception("gateway %s: could not record a refused tool call", server.slug)


def tool_refusals_record(*, server_id, subject: str, client_id: str, refused: list[tuple[str, str]],
                         now: float) -> None:
    """Record refused tool calls without letting a looping agent or a hostile user fill the audit table.

    One row per (server, user, client, tool) and window of ``REFUSAL_AUDIT_WINDOW`` seconds, with the
    number of refusals in ``detail["count"]``; at most ``REFUSAL_AUDIT_TOOLS`` tools a window have a row
    of their own per (server, user, client) (tool names are the client's to invent: ``admin_1``,
    ``admin_2``...), then one row says the rest goes unrecorded. The counts live in the shared cache
    (``core.ratelimit`` counters: one atomic increment per refusal, right across processes); the row is
    written by the refusal that counts 1, its count is raised when the counter reaches 2, 4, 8, ... (a
    handful of updates a window, never more than twice off), and set to the window's final count when
    the next window's first refusal of that tool writes its row. The Prometheus counter counts each one.
    """
    bucket = int(now) // REFUSAL_AUDIT_WINDOW
    caller = f"{server_id}\x00{subject}\x00{client_id}"
    for tool, reason in refused:
        key = f"{caller}\x00{tool}"
        count = counters_add([(_refusal_key("count", key, bucket), 2 * REFUSAL_AUDIT_WINDOW + 1)])[0]
        if count & (count - 1):  # not a power of two: counted in the cache only
            continue
        if count > 1:
            _refusal_count_raise(key=key, bucket=bucket, count=count, tool=tool, reason=reason)
            continue
        rows = counters_add([(_refusal_key("rows", caller, bucket), REFUSAL_AUDIT_WINDOW + 1)])[0]
        if rows > REFUSAL_AUDIT_TOOLS + 1:
            continue
        db_server = McpServer.objects.filter(pk=server_id).first()
        client = Client.objects.filter(client_id=client_id).first()
        window = {"window_seconds": REFUSAL_AUDIT_WINDOW,
                  "window_start": datetime.fromtimestamp(bucket * REFUSAL_AUDIT_WINDOW, tz=UTC).isoformat()}
        if rows > REFUSAL_AUDIT_TOOLS:
            audit_record(kind=AuditEvent.Kind.ACCESS_DENIED, server=db_server, client=client, subject=subject,
                         message=f"tools/call of more than {REFUSAL_AUDIT_TOOLS} different tools refused in "
                                 f"{REFUSAL_AUDIT_WINDOW} s: further ones are not recorded one by one",
                         detail={"step": "tools/call", **window})
            continue
        event = audit_record(kind=AuditEvent.Kind.ACCESS_DENIED, server=db_server, client=client, subject=subject,
                             message=_refusal_message(tool, reason, 1),
                             detail={"step": "tools/call", "tool": tool[:200], "count": 1, **window})
        cache.set(_refusal_key("row", key, bucket), event.pk, timeout=2 * REFUSAL_AUDIT_WINDOW + 1)
        previous = counter_get(_refusal_key("count", key, bucket - 1))
        if previous > 1:
            _refusal_count_raise(key=key, bucket=bucket - 1, count=previous, tool=tool, reason=reason)


def _refusal_key(kind: str, key: str, bucket: int) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]  # client-chosen text
    return f"toolrefusal:{kind}:{digest}:{bucket}"


def _refusal_message(tool: str, reason: str, count: int) -> str:
    times = f" {count} times in {REFUSAL_AUDIT_WINDOW} s" if count > 1 else ""
    return f"tools/call {tool} refused{times}: {reason}"[:2000]


def _refusal_count_raise(*, key: str, bucket: int, count: int, tool: str, reason: str) -> None:
    """Raise the count of the window's row (never lower it: processes may update out of order)."""
    row = cache.get(_refusal_key("row", key, bucket))
    if row is None:  # not written yet (its writer is a moment behind) or beyond the per-caller cap
        return
    event = AuditEvent.objects.filter(pk=row).only("detail").first()
    if event is None:
        return
    AuditEvent.objects.filter(pk=row, detail__count__lt=count).update(
        detail={**event.detail, "count": count}, message=_refusal_message(tool, reason, count))


# -- responses -----------------------------------------------------------------------------------------


async def tool_response_filter(*, server: GatewayServer, grant: TokenGrant, plan: ToolPlan | None,
                               response: ForwardedResponse) -> ForwardedResponse:
    """Any answer of the internal server to a client of a server with a tool policy (POST, GET, DELETE)
    with its ``tools/list`` results filtered and the plan's refusals merged in."""
    refusals = plan.refusals if plan is not None else []
    batch = plan.batch if plan is not None else False
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # not asked for (the gateway sends Accept-Encoding: identity)
        await response.aclose()
        raise _unfilterable(server, f"an answer in content-encoding {encoding}")
    user = _user(grant)
    sse = response.headers.get("content-type", "").lower().startswith("text/event-stream")
    if response.content is None and response.body is not None:
        if sse:
            response.body = _sse_filtered(response, response.body, server=server, user=user, refusals=refusals)
            return response
        content, rest = await _read_up_to(response, MAX_FILTERED_BODY)
        if rest is not None:  # larger than any answer held back to filter it
            if refusals or _TOOLS_KEY in content:
                await response.aclose()
                raise _unfilterable(server, "a tools/list answer too large to filter")
            response.body = _json_stream_guarded(content, rest, server=server)
            return response
    else:
        content = response.content
    if sse:
        head = b"".join(_sse_event(refusal) for refusal in refusals)
        content = content or b""
        out, at = _sse_filtered_events(content, server=server, user=user)
        content = head + out + _sse_filtered_event(content[at:], server=server, user=user)
    elif not content:
        if refusals:
            merged = json.dumps(refusals if batch else refusals[0]).encode()
            headers = {**response.headers, "content-type": "application/json"}
            return ForwardedResponse(200 if response.status == 202 else response.status, headers, merged, None,
                                     response.internal)
    else:
        content = _json_filtered(content, server=server, user=user, refusals=refusals)
    if content is response.content:
        return response
    return ForwardedResponse(response.status, response.headers, content, None, response.internal)


def _unfilterable(server: GatewayServer, what: str) -> GatewayError:
    logger.warning("gateway %s: %s from the internal server, refused (the tool policy cannot filter it)",
                   server.slug, what)
    return GatewayError("The MCP server's answer cannot be filtered by the tool policy.", status=502)


async def _read_up_to(response: ForwardedResponse, limit: int) -> tuple[bytes, AsyncGenerator | None]:
    """The body when it ends within ``limit`` bytes: (content, None), the internal response closed.
    Otherwise (what was read, the rest of the body still to stream)."""
    chunks, size = [], 0
    async for chunk in response.body:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit and not response.complete:
            return b"".join(chunks), response.body
    await response.aclose()
    return b"".join(chunks), None


async def _json_stream_guarded(head: bytes, rest: AsyncGenerator[bytes, None], *,
                               server: GatewayServer) -> AsyncGenerator[bytes, None]:
    """A non-SSE answer too large to hold, in which no tools list was seen so far: streamed on, and cut
    short where one would begin (the client gets a broken answer rather than an unfiltered list)."""
    try:
        yield head
        carry = head[-len(_TOOLS_KEY):]
        async for chunk in rest:
            if _TOOLS_KEY in carry + chunk:
                logger.warning("gateway %s: a tools list deep in a large answer; answer cut short", server.slug)
                return
            carry = chunk[-len(_TOOLS_KEY):]
            yield chunk
    finally:
        await rest.aclose()


def _filtered_message(message, *, server: GatewayServer, user: UserClaims):
    """A message (or a batch of them) with any tools/list result filtered; (message, changed)."""
    if isinstance(message, list):
        pairs = [_filtered_message(m, server=server, user=user) for m in message]
        changed = any(c for _, c in pairs)
        return ([m for m, _ in pairs] if changed else message), changed
    if not isinstance(message, dict):
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
    if len(visible) == len(tools):
        return message, False
    return {**message, "result": {**result, "tools": visible}}, True


def _json_filtered(content: bytes, *, server: GatewayServer, user: UserClaims, refusals: list[dict]) -> bytes:
    if not refusals and _TOOLS_KEY not in content:
        return content
    try:
        parsed = json.loads(content)
    except (ValueError, RecursionError):
        if _TOOLS_KEY in content:
            raise _unfilterable(server, "an answer that is not JSON but names tools")
        return content
    message, changed = _filtered_message(parsed, server=server, user=user)
    if refusals:  # a batch of which part went on: answer as a batch
        messages = message if isinstance(message, list) else [message]
        return json.dumps([*messages, *refusals]).encode()
    return json.dumps(message).encode() if changed else content


def _sse_event(message: dict) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


def _sse_filtered_event(event: bytes, *, server: GatewayServer, user: UserClaims) -> bytes:
    """One SSE event (with its end) with a tools/list result in its data filtered; dropped when it names
    tools but its data cannot be read."""
    if _TOOLS_KEY not in event:
        return event
    lines = event.splitlines()
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):
        logger.warning("gateway %s: an SSE event naming tools whose data is not JSON, dropped", server.slug)
        return b""
    message, changed = _filtered_message(message, server=server, user=user)
    if not changed:
        return event
    others = [line for line in lines if line and not line.startswith(b"data:")]
    payload = json.dumps(message, separators=(",", ":")).encode()
    return b"\n".join([*others, b"data: " + payload]) + b"\n\n"


def _sse_filtered_events(buffer: bytes | bytearray, *, server: GatewayServer, user: UserClaims,
                         start: int = 0) -> tuple[bytes, int]:
    """The complete events of ``buffer`` (searched from ``start``), filtered, and where the rest begins."""
    out, at = [], 0
    for match in _SSE_EVENT_END.finditer(buffer, start):
        out.append(_sse_filtered_event(bytes(buffer[at:match.end()]), server=server, user=user))
        at = match.end()
    return b"".join(out), at


async def _sse_filtered(
    response: ForwardedResponse,
    body: AsyncGenerator[bytes, None],
    *,
    server: GatewayServer,
    user: UserClaims,
    refusals: list[dict],
) -> AsyncGenerator[bytes, None]:
    """The SSE stream, event by event as the events complete (an event may come in many chunks, and a
    chunk may end inside a line ending); refusals first. Whatever is left when the internal server's body
    ends goes out, filtered, with its last chunk (the ASGI sender ends the response on the chunk read
    when the internal body completes)."""
    pending = b"".join(_sse_event(refusal) for refusal in refusals)
    buffer = bytearray()
    try:
        async for chunk in body:
            # Search only what is new, from before a line ending the last chunk may have ended in.
            start = max(len(buffer) - 3, 0)
            buffer += chunk
            out, at = _sse_filtered_events(buffer, server=server, user=user, start=start)
            del buffer[:at]
            if response.complete:
                out += _sse_filtered_event(bytes(buffer), server=server, user=user)
                buffer.clear()
            elif len(buffer) > MAX_FILTERED_BODY:
                logger.warning("gateway %s: an SSE event too large to filter; stream ended", server.slug)
                yield pending + out
                return
            yield pending + out
            pending = b""
        if pending or buffer:
            yield pending + _sse_filtered_event(bytes(buffer), server=server, user=user)
    finally:
        await body.aclose()
