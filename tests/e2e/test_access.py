"""Acceptance: who may use a server and each tool (DESIGN §3 access/tool_policy, §4 "Access"), with the real
upstream (groups released in its ID token and userinfo), the official MCP client and a real internal server
that records its admin_reset calls."""

from __future__ import annotations

import anyio
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from harness import AuthorizationFailed, find_exception, tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.harness import AuthorizationFailed, find_exception, tool_text

pytestmark = [
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.e2e,
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]

GROUPS = {"alice": ["crm-users"], "bob": ["crm-users", "crm-admins"], "mallory": ["guests"]}
SERVER = {
    "scopes": ["openid", "profile", "email", "offline_access", "groups"],
    "access": {"groups": ["crm-users"]},
    "tool_policy": [{"tools": ["admin_*"], "groups": ["crm-admins"]}],
}


def session_of(client):
    async def scenario():
        async with client.connect() as mcp:
            names = {tool.name for tool in (await mcp.list_tools()).tools}
            who = tool_text(await mcp.call_tool("whoami", {}))
            try:
                reset = tool_text(await mcp.call_tool("admin_reset", {}))
            except Exception as exc:  # the JSON-RPC error of a refused tool, as the SDK raises it
                reset = f"refused: {exc}"
            return names, who, reset

    return anyio.run(scenario)


def test_access_and_tool_policies(make_stack):
    stack = make_stack(idp_config={"account_groups": GROUPS}, server=SERVER)

    # Allowed the server, not the admin_* tools: a filtered list, and an error the internal server never sees.
    names, who, reset = session_of(stack.client(username="alice"))
    assert who == "alice"
    assert "whoami" in names and "admin_reset" not in names
    assert reset.startswith("refused:") and "admin_reset" in reset
    assert stack.mcp.stats()["tool_calls"] == []

    # An admin sees and calls it.
    names, who, reset = session_of(stack.client(username="bob"))
    assert "admin_reset" in names and reset == "reset"
    assert stack.mcp.stats()["tool_calls"] == ["admin_reset"]

    # Refused the server: a readable page, and access_denied with the client's state.
    mallory = stack.client(username="mallory")
    with pytest.raises(Exception) as info:
        anyio.run(lambda: mallory.call_tool("whoami"))
    failed = find_exception(info.value, AuthorizationFailed)
    assert failed is not None, repr(info.value)
    [authorization] = mallory.authorizations
    assert failed.params["error"] == "access_denied"
    assert failed.params["state"] == authorization.params["state"]
    [page] = failed.outcome.denied_pages
    assert "mallory@example.test" in page and stack.server_name in page
    assert mallory.storage.tokens is None
    rows = stack.proxy.sql("SELECT count(*) FROM oauthproxy_auditevent WHERE kind = 'access.denied'")
    assert rows[0][0] >= 2  # the refused login and the refused tool call
