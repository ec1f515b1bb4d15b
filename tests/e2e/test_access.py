"""Acceptance: who may use a server and each tool (DESIGN §3 access/tool_policy, §4 "Access"), with the real
upstream (groups released in its ID token and userinfo), the official MCP client and a real internal server
that records its admin_reset calls."""

from __future__ import annotations

import json
import os
import time

import anyio
import httpx
import pytest
from mcp.shared.exceptions import MCPError

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from harness import AuthorizationFailed, bearer_of, find_exception, sleep_until, tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.harness import AuthorizationFailed, bearer_of, find_exception, sleep_until, tool_text

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the e2e extra is not installed
    async_playwright = None

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


# ------------------------------------------------------------------------------------------------
# a group removed at the upstream: the session ends at the next upstream refresh


# Upstream tokens are due for refresh UPSTREAM_REFRESH_MARGIN (2 s) before they expire; carol's first calls must
# come before hers is due, with room for a loaded machine.
UPSTREAM_TOKEN_TTL = 10  # seconds
PROXY_TOKEN_LIFETIME = 20  # the proxy's own access tokens: longer, so the gateway meets a due upstream token first


def refused_authorization(exc: BaseException) -> AuthorizationFailed:
    """The OAuth error redirect that ended a client's new authorization (the SDK wraps what its callback
    handler raised)."""
    failed = find_exception(exc, AuthorizationFailed)
    assert failed is not None, repr(exc)
    return failed


def session_rows(stack) -> dict[str, tuple]:
    """Each user's upstream session at the proxy: (ended, why, upstream refreshes, live proxy access
    tokens, unrevoked proxy refresh tokens), newest session per subject."""
    rows = stack.proxy.sql(
        "SELECT s.subject, s.revoked_at IS NOT NULL, s.revoked_reason, s.refresh_count,"
        " (SELECT count(*) FROM oauthproxy_accesstoken a WHERE a.upstream_session_id = s.id),"
        " (SELECT count(*) FROM oauthproxy_refreshtoken r WHERE r.upstream_session_id = s.id AND r.revoked IS NULL)"
        " FROM oauthproxy_upstreamsession s ORDER BY s.created"
    )
    return {subject: tuple(rest) for subject, *rest in rows}


def test_group_removed_at_the_upstream_ends_the_session_at_the_next_refresh(make_stack):
    """alice and carol lose crm-users at the IdP; bob keeps his groups. carol's next request after her
    upstream token became due makes the gateway refresh it, alice's client refreshes its expired proxy
    token (the proxy refreshes the upstream token in that grant): both sessions end there, both clients
    must sign in again and are refused. bob goes through both kinds of refresh and keeps working."""
    groups = {**GROUPS, "carol": ["crm-users"]}
    stack = make_stack(
        idp_config={"account_groups": groups, "access_token_ttl": UPSTREAM_TOKEN_TTL, "rotate_refresh_tokens": True},
        server={**SERVER, "access_token_lifetime": PROXY_TOKEN_LIFETIME},
    )
    alice, bob, carol = (stack.client(username=name) for name in ("alice", "bob", "carol"))
    gateway_path, token_path = f"/mcp/{stack.slug}", f"/oauth/{stack.slug}/token"
    seen: dict[str, object] = {}

    async def scenario():
        alice_app, bob_app = alice.new_provider(), bob.new_provider()  # running client apps
        assert tool_text(await alice.call_tool("whoami", provider=alice_app)) == "alice"
        async with bob.connect(bob_app) as bob_mcp:
            assert tool_text(await bob_mcp.call_tool("whoami", {})) == "bob"
            bob_upstream = [bearer_of(await bob_mcp.call_tool("echo_auth", {}))]
            # A refused re-authorization ends the SDK's session with the error (its task group raises it).
            with pytest.raises(Exception) as info:
                async with carol.connect() as carol_mcp:
                    assert tool_text(await carol_mcp.call_tool("whoami", {})) == "carol"
                    carol_upstream = bearer_of(await carol_mcp.call_tool("echo_auth", {}))

                    stack.idp.set_config(account_groups={**groups, "alice": ["sales"], "carol": []})
                    # the proxy learns it at the next upstream refresh, not before
                    assert tool_text(await carol_mcp.call_tool("whoami", {})) == "carol"

                    # carol's upstream token is due (not yet expired), her proxy token valid: her next
                    # request makes the gateway refresh it, and the claims come back without crm-users
                    await sleep_until(stack.idp.introspect(carol_upstream, stack.upstream_client_id)["exp"] - 1)
                    seen["carol_mark"] = len(carol.http)
                    await carol_mcp.call_tool("whoami", {})
            seen["carol"] = refused_authorization(info.value)
            # bob's is due as well: refreshed by the gateway too, and he goes on
            assert tool_text(await bob_mcp.call_tool("whoami", {})) == "bob"
            bob_upstream.append(bearer_of(await bob_mcp.call_tool("echo_auth", {})))

            # the proxy access tokens expire: the running apps refresh them at the proxy, which refreshes
            # the (due again) upstream tokens in that grant
            bob_due = stack.idp.introspect(bob_upstream[-1], stack.upstream_client_id)["exp"] - 1
            expired = max(alice_app.context.token_expiry_time, bob_app.context.token_expiry_time)
            await sleep_until(max(expired, bob_due) + 0.5)
            seen["alice_mark"], seen["bob_mark"] = len(alice.http), len(bob.http)
            assert tool_text(await bob_mcp.call_tool("whoami", {})) == "bob"
            assert tool_text(await bob_mcp.call_tool("admin_reset", {})) == "reset"
            bob_upstream.append(bearer_of(await bob_mcp.call_tool("echo_auth", {})))
        with pytest.raises(Exception) as info:
            await alice.call_tool("whoami", provider=alice_app)
        seen["alice"] = refused_authorization(info.value)
        seen["bob_upstream"] = bob_upstream

    anyio.run(scenario)

    # carol: the gateway refused her token once it had refreshed the upstream token; signing in again is refused
    refused = carol.http[seen["carol_mark"]]
    assert (refused.method, refused.path, refused.status, refused.error) == ("POST", gateway_path, 401, "invalid_token")
    # alice: her client's refresh of the proxy token is refused; signing in again is refused
    refresh = alice.http[seen["alice_mark"]]
    assert (refresh.path, refresh.status, refresh.error) == (token_path, 400, "invalid_grant")
    assert refresh.form["grant_type"] == "refresh_token"
    for client, failed in ((carol, seen["carol"]), (alice, seen["alice"])):
        assert failed.params["error"] == "access_denied"
        assert failed.params["state"] == client.authorizations[-1].params["state"]
        [page] = failed.outcome.denied_pages
        assert f"{client.username}@example.test" in page and stack.server_name in page
        assert len(client.authorizations) == 2  # the first sign-in, and the refused one

    # bob: his proxy token refreshed, no error; three upstream tokens (login, gateway refresh, grant refresh)
    [bob_refresh] = bob.requests(path_suffix=token_path, since=seen["bob_mark"])
    assert bob_refresh.status == 200 and bob_refresh.form["grant_type"] == "refresh_token"
    assert all(event.status < 400 for event in bob.http[seen["bob_mark"]:]), bob.http[seen["bob_mark"]:]
    assert len(set(seen["bob_upstream"])) == 3 and len(bob.authorizations) == 1
    assert stack.mcp.stats()["tool_calls"] == ["admin_reset"]

    # the operator's view: both sessions ended with the reason, none of their proxy tokens left; bob's lives on
    sessions = session_rows(stack)
    for name in ("alice", "carol"):
        ended, reason, refreshes, access_tokens, refresh_tokens = sessions[name]
        assert ended and reason.startswith("no longer admitted by the access policy"), sessions[name]
        assert (refreshes, access_tokens, refresh_tokens) == (0, 0, 0), sessions[name]
    assert sessions["bob"] == (False, "", 2, 1, 1)
    denied = stack.proxy.sql(
        "SELECT subject, detail->>'step' FROM oauthproxy_auditevent WHERE kind = 'access.denied' ORDER BY created"
    )
    assert sorted(denied) == [("alice", "login"), ("alice", "refresh"), ("carol", "login"), ("carol", "refresh")]
    assert "@example.test" not in stack.proxy.log_text()  # the users' claims stay out of the logs


# ------------------------------------------------------------------------------------------------
# an operator edits the policies in the admin: live sessions follow within the server cache lifetime


TIMEOUT_MS = 20_000
SERVER_CACHE_SECONDS = 5  # the deployment's default (proxy_settings.SERVER_CACHE_SECONDS)
SLACK = 1.5  # seconds: the save's own round trip, one poll interval, a loaded machine
TOOL_REFUSED_CODE = -32001  # the gateway's JSON-RPC error for a tool the user may not use
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
needs_browser = pytest.mark.skipif(
    async_playwright is None or not os.path.exists(harness.CHROMIUM),
    reason="the operator's browser: pip install -e '.[e2e]' (playwright) and apt-get install chromium",
)


async def admin_edit(page, change_url: str, field: str, value) -> tuple[float, float]:
    """Change one JSON field of the server's admin change form and save, as an operator does; returns when
    Save was pressed and when the admin confirmed it (time.time() values)."""
    await page.goto(change_url)
    await page.locator(f"#id_{field}").fill(json.dumps(value))
    pressed = time.time()
    await page.locator("input[name=_continue]").click()
    await expect(page.locator("ul.messagelist")).to_contain_text("was changed successfully")
    return pressed, time.time()


async def poll(condition, *, since: float, within: float) -> float:
    """Await `condition()` every 0.1 s until it is true; the delay from `since` (fails after `within` s)."""
    while True:
        if await condition():
            return time.time() - since
        if time.time() - since > within:
            raise AssertionError(f"not within {within:.1f} s")
        await anyio.sleep(0.1)


def gateway_status(stack, token: str) -> httpx.Response:
    """A bare MCP initialize at the gateway with this proxy access token."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    return httpx.post(stack.gateway_url, json=INITIALIZE, headers=headers, timeout=30)


@needs_browser
def test_policy_edited_in_the_admin_reaches_live_sessions_within_the_cache_lifetime(static_files, make_stack):
    """bob (crm-admins) uses admin_reset and alice (crm-users) whoami, in live sessions. The operator edits
    the server in the admin (Chromium): admin_* only for crm-owners; bob's tools/list drops admin_reset and
    a call of it is refused by the gateway, the internal server sees nothing. Then the server only for
    crm-admins: alice's token is refused with 401 invalid_token, signing in again is refused, bob goes on.
    Both within the server cache lifetime, with no upstream refresh involved."""
    stack = make_stack(idp_config={"account_groups": GROUPS, "access_token_ttl": 600}, server=SERVER)
    username, password = stack.proxy.deployment.create_admin()
    [(server_id,)] = stack.proxy.sql("SELECT id FROM oauthproxy_mcpserver WHERE slug = %s", (stack.slug,))
    change_url = stack.proxy.url(f"/admin/oauthproxy/mcpserver/{server_id}/change/")
    alice, bob = stack.client(username="alice"), stack.client(username="bob")
    within = SERVER_CACHE_SECONDS + SLACK
    measured: dict[str, float] = {}
    seen: dict[str, object] = {}

    async def tool_names(mcp) -> set[str]:
        return {tool.name for tool in (await mcp.list_tools()).tools}

    async def scenario():
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=harness.CHROMIUM, args=harness.CHROMIUM_ARGS,
                                              timeout=TIMEOUT_MS)
            try:
                page = await browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                await page.goto(stack.proxy.url("/admin/"))
                await page.locator("#id_username").fill(username)
                await page.locator("#id_password").fill(password)
                await page.locator("input[type=submit]").click()
                await expect(page.locator("#site-name")).to_contain_text("MCP OAuth Proxy")

                async with bob.connect() as bob_mcp:
                    assert "admin_reset" in await tool_names(bob_mcp)
                    assert tool_text(await bob_mcp.call_tool("admin_reset", {})) == "reset"
                    # A refused re-authorization ends the SDK's session with the error (its task group raises it).
                    with pytest.raises(Exception) as info:
                        async with alice.connect() as alice_mcp:
                            assert tool_text(await alice_mcp.call_tool("whoami", {})) == "alice"

                            # admin_* tools: now only for crm-owners, which bob is not in
                            saved, confirmed = await admin_edit(page, change_url, "tool_policy",
                                                                [{"tools": ["admin_*"], "groups": ["crm-owners"]}])
                            measured["tool_policy save"] = confirmed - saved

                            async def tool_gone():
                                return "admin_reset" not in await tool_names(bob_mcp)

                            measured["tool_policy"] = await poll(tool_gone, since=saved, within=within)
                            with pytest.raises(MCPError) as refused:
                                await bob_mcp.call_tool("admin_reset", {})
                            seen["tool_error"] = refused.value.error
                            assert tool_text(await bob_mcp.call_tool("whoami", {})) == "bob"

                            # the server: now only for crm-admins, which alice is not in
                            token = alice.storage.tokens.access_token
                            saved, confirmed = await admin_edit(page, change_url, "access", {"groups": ["crm-admins"]})
                            measured["access save"] = confirmed - saved

                            async def alice_refused():
                                status = await anyio.to_thread.run_sync(gateway_status, stack, token)
                                return status.status_code == 401

                            measured["access"] = await poll(alice_refused, since=saved, within=within)
                            seen["challenge"] = gateway_status(stack, token).headers["www-authenticate"]
                            seen["alice_mark"] = len(alice.http)
                            await alice_mcp.call_tool("whoami", {})
                    seen["alice"] = refused_authorization(info.value)
                    assert tool_text(await bob_mcp.call_tool("whoami", {})) == "bob"
            finally:
                await browser.close()

    anyio.run(scenario)
    print(f"\nseconds from pressing Save in the admin (the save itself; until live sessions see it): {measured}")
    assert measured["tool_policy"] <= within and measured["access"] <= within, measured

    # bob: the gateway answered the refused call itself, naming the tool and its groups
    error = seen["tool_error"]
    assert error.code == TOOL_REFUSED_CODE and "admin_reset" in error.message and "crm-owners" in error.message
    assert stack.mcp.stats()["tool_calls"] == ["admin_reset"]  # only the call before the edit reached it
    # alice: 401 invalid_token at the gateway, then her client's new sign-in is refused
    assert 'error="invalid_token"' in seen["challenge"]
    refused = alice.http[seen["alice_mark"]]
    assert (refused.path, refused.status, refused.error) == (f"/mcp/{stack.slug}", 401, "invalid_token")
    assert seen["alice"].params["error"] == "access_denied"
    # what the operator sees: the admin's two changes, then the refusals, each with its step
    events = stack.proxy.sql(
        "SELECT kind, subject, detail->>'step' FROM oauthproxy_auditevent"
        " WHERE kind = 'access.denied' OR (kind = 'admin.change' AND actor_id IS NOT NULL) ORDER BY created"
    )
    assert events == [("admin.change", "", None), ("access.denied", "bob", "tools/call"),
                      ("admin.change", "", None), ("access.denied", "alice", "login")], events
    # all of it without an upstream refresh: the sessions kept their first upstream tokens
    assert stack.idp.token_calls("refresh_token") == 0
