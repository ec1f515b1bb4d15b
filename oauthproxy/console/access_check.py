"""The admin's "Who can use this?" check of a server (DESIGN §3 ``access``, ``tool_policy``): for an email,
a subject and groups, the decision for the server and for each tool the internal server lists, from the
same rules every other check uses (grants/access.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import requests

from oauthproxy.grants.access import Decision, UserClaims, access_decide, tool_decide, tool_rules_matching
from oauthproxy.models import McpServer

PROTOCOL_VERSION = "2025-06-18"
TIMEOUT = (3.0, 10.0)  # connect, read: an admin page waits for this at most per call
MAX_PAGES = 20
MAX_BODY = 4 * 1024 * 1024


@dataclass
class ToolDecision:
    name: str
    decision: Decision
    rule_groups: list[str]


@dataclass
class AccessCheck:
    user: UserClaims
    server: Decision
    tools: list[ToolDecision] = field(default_factory=list)
    tools_note: str = ""  # why the tools could not be listed, when they could not


def server_access_check(*, server: McpServer, email: str, groups: list[str], subject: str = "") -> AccessCheck:
    user = UserClaims(subject=subject.strip(), email=email.strip().lower(), groups=tuple(g for g in groups if g))
    result = AccessCheck(user=user, server=access_decide(access=server.access, user=user))
    names, note = internal_tool_names(server=server)
    result.tools_note = note
    for name in names:
        rules = tool_rules_matching(server.tool_policy, name)
        groups_of_rules = list(dict.fromkeys(g for rule in rules for g in rule.get("groups") or ()))
        result.tools.append(ToolDecision(name, tool_decide(tool_policy=server.tool_policy, tool=name, user=user),
                                         groups_of_rules))
    return result


def internal_tool_names(*, server: McpServer) -> tuple[list[str], str]:
    """The tools the internal server lists, asked without credentials (initialize, then tools/list page by
    page). When it cannot answer that way: no names, and a note saying why."""
    if not server.mcp_url:
        return [], "This server has no internal MCP URL, so its tools cannot be listed."
    session = requests.Session()
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": PROTOCOL_VERSION, "User-Agent": "mcp-oauth-proxy (access check)"}
    try:
        answer, response = _call(session, server.mcp_url, headers, "initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": {"name": "mcp-oauth-proxy-access-check", "version": "1"},
        })
        if response.status_code in (401, 403):
            return [], (f"The internal server answered HTTP {response.status_code} without a token, so its tools "
                        "could not be listed here. The tool rules still apply to the names they match.")
        if answer is None or "result" not in answer:
            return [], f"The internal server did not answer initialize (HTTP {response.status_code})."
        if response.headers.get("Mcp-Session-Id"):
            headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
        session.post(server.mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                     headers=headers, timeout=TIMEOUT).close()
        names: list[str] = []
        cursor = None
        for _ in range(MAX_PAGES):
            answer, response = _call(session, server.mcp_url, headers, "tools/list", {"cursor": cursor} if cursor
                                     else {})
            result = (answer or {}).get("result")
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                return names, f"The internal server did not answer tools/list (HTTP {response.status_code})."
            names += [t["name"] for t in result["tools"] if isinstance(t, dict) and isinstance(t.get("name"), str)]
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return names, ""
    except requests.RequestException as exc:
        return [], f"The internal server could not be reached ({type(exc).__name__})."
    finally:
        session.close()


def _call(session: requests.Session, url: str, headers: dict, method: str, params: dict):
    response = session.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
                            headers=headers, timeout=TIMEOUT, stream=True, allow_redirects=False)
    try:
        body = response.raw.read(MAX_BODY, decode_content=True)
    finally:
        response.close()
    text = body.decode("utf-8", "replace")
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data:"):
                message = _json(line[5:])
                if isinstance(message, dict) and message.get("id") == 1:
                    return message, response
        return None, response
    message = _json(text)
    return (message if isinstance(message, dict) else None), response


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
