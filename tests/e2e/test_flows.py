"""Acceptance: the official MCP client, through the proxy (a real uvicorn process on PostgreSQL), against a
company IdP (oidc-provider) and a real internal MCP server whose `whoami` asks the IdP who the bearer is.

Each test starts its own stack (conftest.make_stack) on ports chosen at run time. The user's browser is
an httpx client with a cookie jar that follows the proxy's and the IdP's redirects and presses the
buttons of their pages (harness.authorize_in_browser); test_browser.py does the same in Chromium.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from harness import AuthorizationFailed, bearer_of, find_exception, sleep_until, tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.harness import AuthorizationFailed, bearer_of, find_exception, sleep_until, tool_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]

PROXY_TOKEN_LIFETIME = 5  # seconds; the proxy's own access tokens in the refresh scenario
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def gateway_status(url: str, token: str | None) -> httpx.Response:
    """A bare MCP initialize at the gateway with this bearer token (or none)."""
    headers = dict(MCP_ACCEPT)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(url, json=INITIALIZE, headers=headers, timeout=30)


def upstream_authorization_request(outcome: harness.BrowserOutcome, idp: harness.Upstream) -> dict[str, str]:
    """The query of the authorization request the proxy sent the browser to at the IdP."""
    idp_origin = urlsplit(idp.authorization_endpoint)[:2]
    for _method, url, _status in outcome.trail:
        if urlsplit(url)[:2] == idp_origin and urlsplit(url).path == urlsplit(idp.authorization_endpoint).path:
            return harness.parse_redirect(url)
    raise AssertionError(f"the browser never reached the IdP's authorization endpoint: {outcome.trail}")


def audit_events(stack, kind: str) -> list[str]:
    """What the proxy recorded for the operator (AuditEvent rows of this kind), as text."""
    rows = stack.proxy.sql(
        "SELECT message, detail::text FROM oauthproxy_auditevent WHERE kind = %s ORDER BY created", (kind,)
    )
    return [f"{message} {detail}" for message, detail in rows]


# ------------------------------------------------------------------------------------------------
# the whole flow, both upstream auth methods: first run, stored tokens, refresh after expiry


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_sdk_flow_stored_tokens_and_refresh(make_stack, auth_method):
    stack = make_stack(auth_method=auth_method, server={"access_token_lifetime": PROXY_TOKEN_LIFETIME})
    idp = stack.idp
    client = stack.client(client_name="E2E MCP client")
    assert stack.idp.server_config(stack.upstream_client_id)["token_endpoint_auth_methods_supported"] == [auth_method]

    async def scenario():
        # --- run 1: nothing stored. The SDK discovers everything from the gateway's 401.
        app = client.new_provider()  # this client app keeps running (run 3); runs 2 and 4 are fresh starts
        assert tool_text(await client.call_tool("whoami", provider=app)) == "alice"
        return app

    app = anyio.run(scenario)

    first = client.http[0]
    assert (first.method, first.path, first.status) == ("POST", f"/mcp/{stack.slug}", 401)
    steps = [(e.method, e.path, e.status) for e in client.http]
    prm_path = f"/.well-known/oauth-protected-resource/mcp/{stack.slug}"
    assert ("GET", prm_path, 200) in steps
    assert ("GET", f"/.well-known/oauth-authorization-server/oauth/{stack.slug}", 200) in steps
    assert ("POST", f"/oauth/{stack.slug}/register", 201) in steps  # DCR
    [token_call] = client.requests(path_suffix=f"/oauth/{stack.slug}/token")
    assert token_call.status == 200
    assert token_call.form["grant_type"] == "authorization_code"
    assert token_call.form["code_verifier"] and token_call.form["resource"] == stack.gateway_url
    assert steps.index(("POST", f"/oauth/{stack.slug}/register", 201)) < steps.index(
        ("POST", f"/oauth/{stack.slug}/token", 200)
    )

    # the 401 pointed at the protected resource metadata, which names the proxy's issuer
    challenge = gateway_status(stack.gateway_url, None)
    assert challenge.status_code == 401
    assert f'resource_metadata="{stack.base_url}{prm_path}"' in challenge.headers["www-authenticate"]
    prm = httpx.get(stack.base_url + prm_path).json()
    assert prm["resource"] == stack.gateway_url and prm["authorization_servers"] == [stack.issuer]

    # one authorization: code + PKCE S256 + resource; the answer carries the proxy's issuer (RFC 9207)
    [authorization] = client.authorizations
    request = authorization.params
    assert request["code_challenge_method"] == "S256" and request["code_challenge"]
    assert request["resource"] == stack.gateway_url
    assert authorization.outcome.params["state"] == request["state"]
    assert authorization.outcome.params["iss"] == stack.issuer

    # the consent page named the client, the MCP server, where it sends the user back, the upstream scopes
    [consent_page] = authorization.outcome.consent_pages
    for text in ("E2E MCP client", stack.server_name, "127.0.0.1", "offline_access", "Unverified"):
        assert text in consent_page, text

    # upstream leg: the single static client, its callback, PKCE, offline_access with prompt=consent
    # (the IdP issues refresh tokens only then), and never the MCP client's `resource`
    upstream_request = upstream_authorization_request(authorization.outcome, idp)
    assert upstream_request["client_id"] == stack.upstream_client_id
    assert upstream_request["redirect_uri"] == f"{stack.issuer}/callback"
    assert upstream_request["code_challenge_method"] == "S256"
    assert "offline_access" in upstream_request["scope"].split() and upstream_request.get("prompt") == "consent"
    assert "resource" not in upstream_request
    assert upstream_request["state"] != request["state"]
    assert idp.stats()["token"]["by_client"] == {stack.upstream_client_id: {"authorization_code": 1}}

    # --- run 2: a fresh start of the client app with the stored tokens: no registration, no login.
    # The internal server gets the upstream token, never the proxy's; the client never sees the upstream's.
    mark = len(client.http)

    async def second_run():
        async with client.connect() as session:
            who = tool_text(await session.call_tool("whoami", {}))
            return who, bearer_of(await session.call_tool("echo_auth", {}))

    who, upstream = anyio.run(second_run)
    assert who == "alice"
    assert len(client.authorizations) == 1
    assert not client.requests(path_suffix="/register", since=mark)
    assert not client.requests(path_suffix="/token", since=mark)
    assert all(e.status < 400 for e in client.http[mark:]), client.http[mark:]
    proxy_token = client.storage.tokens.access_token
    assert upstream != proxy_token
    introspected = idp.introspect(upstream, stack.upstream_client_id)
    assert introspected["active"] and introspected["sub"] == "alice"
    assert "offline_access" in introspected["scope"].split()
    assert idp.userinfo_status(proxy_token) == 401  # the proxy's token means nothing upstream

    # --- run 3: the proxy access token expired; the running app refreshes it (rotated) and goes on
    old = client.storage.tokens
    assert old.expires_in == PROXY_TOKEN_LIFETIME and old.refresh_token
    mark = len(client.http)

    async def after_expiry():
        await sleep_until(app.context.token_expiry_time + 0.5)
        return tool_text(await client.call_tool("whoami", provider=app))

    assert anyio.run(after_expiry) == "alice"
    [refresh] = client.requests(path_suffix="/token", since=mark)
    assert refresh.status == 200 and refresh.form["grant_type"] == "refresh_token"
    assert len(client.authorizations) == 1
    new = client.storage.tokens
    assert new.access_token != old.access_token
    assert new.refresh_token and new.refresh_token != old.refresh_token  # rotated
    assert gateway_status(stack.gateway_url, old.access_token).status_code == 401  # really expired
    assert gateway_status(stack.gateway_url, new.access_token).status_code == 200

    # --- run 4: a fresh start after the refresh uses the refreshed tokens
    mark = len(client.http)
    assert anyio.run(second_run)[0] == "alice"
    assert not client.requests(path_suffix="/token", since=mark)
    assert len(client.authorizations) == 1

    # the upstream saw one login and one code exchange; refreshing the proxy token did not call it
    stats = idp.stats()
    assert stats["logins"] == 1 and stats["consents"] == 1
    assert stats["token"]["by_client"] == {stack.upstream_client_id: {"authorization_code": 1}}
    assert stats["token"]["errors"] == {}
    assert stack.mcp.stats()["unauthorized"] == 0


# ------------------------------------------------------------------------------------------------
# upstream tokens expire under a running session


def test_upstream_token_expires_during_session(make_stack):
    """The upstream access token expires while an MCP session is open: the gateway refreshes it upstream
    (no rotation at this IdP: the same refresh token stays valid) and the client never notices."""
    stack = make_stack(idp_config={"access_token_ttl": 5, "rotate_refresh_tokens": False})
    client = stack.client()

    async def scenario():
        async with client.connect() as session:
            assert tool_text(await session.call_tool("whoami", {})) == "alice"
            first = bearer_of(await session.call_tool("echo_auth", {}))
            proxy_token = client.storage.tokens.access_token
            mark = len(client.http)
            expiry = stack.idp.introspect(first, stack.upstream_client_id)["exp"]
            for round_ in range(2):  # two expiries: the kept refresh token works again
                await sleep_until(expiry + 0.5)
                assert stack.idp.userinfo_status(first) == 401  # really expired upstream
                assert tool_text(await session.call_tool("whoami", {})) == "alice"
                current = bearer_of(await session.call_tool("echo_auth", {}))
                assert current != first, f"round {round_}: the gateway forwarded the expired upstream token"
                assert stack.idp.userinfo_status(current) == 200
                first, expiry = current, stack.idp.introspect(current, stack.upstream_client_id)["exp"]
            # the client noticed nothing: same token, no token or authorization requests, no errors
            assert client.storage.tokens.access_token == proxy_token
            assert not client.requests(path_suffix="/token", since=mark)
            assert all(e.status < 400 for e in client.http[mark:]), client.http[mark:]

    anyio.run(scenario)
    assert len(client.authorizations) == 1
    stats = stack.idp.stats()
    assert stats["token"]["by_client"] == {stack.upstream_client_id: {"authorization_code": 1, "refresh_token": 2}}
    assert stats["token"]["errors"] == {}
    assert stack.mcp.stats()["unauthorized"] == 0  # never forwarded an expired token


def test_upstream_refresh_token_rotation(make_stack):
    """The upstream rotates refresh tokens and treats a reused one as theft (it revokes the grant): the
    proxy must store each rotated refresh token and use the newest."""
    ttl = 5
    stack = make_stack(idp_config={"access_token_ttl": ttl, "rotate_refresh_tokens": True})
    client = stack.client()

    async def scenario():
        async with client.connect() as session:
            assert tool_text(await session.call_tool("whoami", {})) == "alice"
            seen = [bearer_of(await session.call_tool("echo_auth", {}))]
            for _ in range(2):
                expiry = stack.idp.introspect(seen[-1], stack.upstream_client_id)["exp"]
                # due for refresh (within UPSTREAM_REFRESH_MARGIN=2s of expiry) but not expired yet
                await sleep_until(expiry - 0.5)
                assert tool_text(await session.call_tool("whoami", {})) == "alice"
                seen.append(bearer_of(await session.call_tool("echo_auth", {})))
            return seen

    seen = anyio.run(scenario)
    assert len(set(seen)) == 3, "each refresh gives a new upstream access token"
    assert stack.idp.userinfo_status(seen[-1]) == 200
    stats = stack.idp.stats()
    assert stats["token"]["success_by_grant_type"] == {"authorization_code": 1, "refresh_token": 2}
    assert stats["token"]["errors"] == {}, "a rotated-away refresh token was presented again"


# ------------------------------------------------------------------------------------------------
# denials and failures come back to the client as OAuth error redirects with its state


def _failed_authorization(client) -> AuthorizationFailed:
    async def scenario():
        await client.call_tool("whoami")

    with pytest.raises(Exception) as info:  # the SDK wraps what the callback handler raised (groups)
        anyio.run(scenario)
    failed = find_exception(info.value, AuthorizationFailed)
    assert failed is not None, f"expected an OAuth error redirect, got {info.value!r}"
    return failed


def test_user_denies_consent(make_stack):
    stack = make_stack()
    client = stack.client(consent="deny")
    failed = _failed_authorization(client)

    [authorization] = client.authorizations
    assert failed.params["error"] == "access_denied"
    assert failed.params["state"] == authorization.params["state"]
    assert failed.params["iss"] == stack.issuer
    assert failed.outcome.location.startswith(client.redirect_uri + "?")
    assert len(failed.outcome.consent_pages) == 1
    # consent before any upstream redirect: the IdP never saw this user
    stats = stack.idp.stats()
    assert stats["authorization"] == 0 and stats["token"]["total"] == 0
    assert client.storage.tokens is None
    assert audit_events(stack, "consent.denied")


def test_upstream_denies(make_stack):
    """The user cancels at the IdP: its access_denied comes back to the client with the client's state."""
    stack = make_stack()
    client = stack.client(upstream_abort=True)
    failed = _failed_authorization(client)

    [authorization] = client.authorizations
    assert failed.params["error"] == "access_denied"
    assert failed.params["state"] == authorization.params["state"]
    assert failed.params["iss"] == stack.issuer
    stats = stack.idp.stats()
    assert stats["aborts"] == 1 and stats["token"]["total"] == 0
    assert client.storage.tokens is None
    # recorded for the operator with the upstream's reason
    failures = audit_events(stack, "upstream.failure")
    assert any("access_denied" in text for text in failures), failures


def test_upstream_down_during_callback(make_stack):
    """The IdP redirects back with a code and then goes down: the code exchange at the callback cannot
    connect. The client gets an OAuth error redirect with its state (no 500, no hang), the proxy keeps
    serving, and the operator sees why."""
    stack = make_stack()
    client = stack.client(before_callback=lambda _url: stack.idp.stop())
    started = time.monotonic()
    failed = _failed_authorization(client)
    assert time.monotonic() - started < 20

    [authorization] = client.authorizations
    assert failed.params["error"] in ("temporarily_unavailable", "server_error"), failed.params
    assert failed.params["state"] == authorization.params["state"]
    assert failed.params["iss"] == stack.issuer
    method, url, status = failed.outcome.trail[-1]
    assert urlsplit(url).path == f"/oauth/{stack.slug}/callback" and status in (302, 303), failed.outcome.trail
    assert not stack.idp.is_running()
    assert httpx.get(stack.proxy.url("/readyz")).status_code == 200
    assert stack.proxy.is_running()
    assert client.storage.tokens is None
    assert audit_events(stack, "upstream.failure")


# ------------------------------------------------------------------------------------------------
# a client identified by a Client ID Metadata Document instead of DCR


def test_cimd_client(make_stack):
    stack = make_stack()
    path = "/clients/e2e-mcp-client.json"
    documents: dict[str, dict] = {}
    with harness.start_document_server(documents) as host:
        client_id = host.url + path
        client = stack.client(client_metadata_url=client_id, client_name="name the SDK would register", mode="auto")
        documents[path] = {
            "client_id": client_id,
            "client_name": "E2E CIMD client",
            "client_uri": host.url + "/",
            "redirect_uris": [client.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }

        async def scenario():
            return tool_text(await client.call_tool("whoami"))

        assert anyio.run(scenario) == "alice"
        assert ("GET", path) in host.requests  # the proxy fetched the document

    assert not client.requests(path_suffix="/register")  # no DCR
    metadata = httpx.get(f"{stack.base_url}/.well-known/oauth-authorization-server/oauth/{stack.slug}").json()
    assert metadata["client_id_metadata_document_supported"] is True
    [authorization] = client.authorizations
    assert authorization.params["client_id"] == client_id
    [token_call] = client.requests(path_suffix="/token")
    assert token_call.status == 200 and token_call.form["client_id"] == client_id
    # the consent page shows the document's name and its host as the verified domain
    [consent_page] = authorization.outcome.consent_pages
    assert "E2E CIMD client" in consent_page and "name the SDK would register" not in consent_page
    assert "Verified" in consent_page and "127.0.0.1" in consent_page
    assert "Unverified" not in consent_page
