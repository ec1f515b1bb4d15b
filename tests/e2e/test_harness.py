"""Proves the real-parts harness: the oidc-provider IdP acts as a strict company IdP towards an RP
driven by plain HTTP, and the internal MCP server answers the official MCP client with the upstream
token it received. No Django, no database.

Run: .venv/bin/python -m pytest tests/e2e/test_harness.py -q
 or, without Django at all (tests/conftest.py imports Django models, so keep it out):
     .venv/bin/python -m pytest tests/e2e/test_harness.py -p no:django --confcutdir tests/e2e -q
Needs tests/e2e/install.sh to have run (the tests skip otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from urllib.parse import urlencode

import anyio
import httpx
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
except ImportError:  # pragma: no cover
    from tests.e2e import harness

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: upstream_login returns the redirect
BASIC = {
    "client_id": "rp-basic",
    "client_secret": "basic-secret",
    "redirect_uris": [REDIRECT_URI],
    "token_endpoint_auth_method": "client_secret_basic",
}
POST = {
    "client_id": "rp-post",
    "client_secret": "post secret/with+odd=chars",
    "redirect_uris": [REDIRECT_URI],
    "token_endpoint_auth_method": "client_secret_post",
}


# ------------------------------------------------------------------------------------------------
# helpers: a minimal RP


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class Authz:
    """One authorization request: its URL plus what the RP keeps (state, PKCE verifier)."""

    def __init__(self, idp: harness.Upstream, client_id: str, scope: str, **extra: str) -> None:
        self.state = secrets.token_urlsafe(16)
        self.verifier, challenge = pkce_pair()
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": self.state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        self.url = f"{idp.authorization_endpoint}?{urlencode(params)}"


def login_for_code(idp: harness.Upstream, client_id: str, scope: str, user: str = "alice", **extra: str):
    """Run the browser part of the flow; returns (code, Authz)."""
    authz = Authz(idp, client_id, scope, **extra)
    with httpx.Client() as browser:
        location = harness.upstream_login(browser, authz.url, user)
    assert location.startswith(REDIRECT_URI + "?"), location
    params = harness.parse_redirect(location)
    assert params.get("state") == authz.state
    assert params.get("iss") == idp.issuer  # RFC 9207
    assert "code" in params, params
    return params["code"], authz


def token_request(idp: harness.Upstream, client: dict, data: dict, method: str | None = None) -> httpx.Response:
    """POST the token endpoint authenticating like the client is registered to (or as `method`)."""
    method = method or client["token_endpoint_auth_method"]
    data = dict(data)
    auth = None
    if method == "client_secret_basic":
        auth = httpx.BasicAuth(client["client_id"], client["client_secret"])
    else:
        data.update(client_id=client["client_id"], client_secret=client["client_secret"])
    return httpx.post(idp.token_endpoint, data=data, auth=auth, timeout=10)


def exchange_code(idp, client, code, authz) -> dict:
    response = token_request(
        idp,
        client,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": authz.verifier,
        },
    )
    assert response.status_code == 200, response.text
    return response.json()


def refresh(idp, client, refresh_token) -> httpx.Response:
    return token_request(idp, client, {"grant_type": "refresh_token", "refresh_token": refresh_token})


def userinfo(idp, access_token) -> httpx.Response:
    return httpx.get(idp.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)


@pytest.fixture
def idp():
    with harness.start_upstream({"clients": [BASIC, POST], "access_token_ttl": 30}) as upstream:
        yield upstream


# ------------------------------------------------------------------------------------------------
# the IdP


def test_discovery(idp):
    meta = idp.metadata
    assert meta["issuer"] == idp.issuer
    assert idp.issuer.startswith("http://127.0.0.1:")
    assert meta["code_challenge_methods_supported"] == ["S256"]
    for key in (
        "authorization_endpoint",
        "token_endpoint",
        "userinfo_endpoint",
        "revocation_endpoint",
        "introspection_endpoint",
        "jwks_uri",
    ):
        assert meta[key].startswith(idp.issuer + "/"), key
    assert {"client_secret_basic", "client_secret_post"} <= set(meta["token_endpoint_auth_methods_supported"])
    assert meta["authorization_response_iss_parameter_supported"] is True


def test_full_flow_basic_refresh_rotation_revocation(idp):
    code, authz = login_for_code(idp, "rp-basic", "openid profile offline_access", prompt="consent")
    tokens = exchange_code(idp, BASIC, code, authz)
    assert tokens["token_type"].lower() == "bearer"
    assert 25 <= tokens["expires_in"] <= 30
    assert tokens["refresh_token"] and tokens["id_token"]
    assert "offline_access" in tokens["scope"].split()

    info = userinfo(idp, tokens["access_token"])
    assert info.status_code == 200 and info.json()["sub"] == "alice"

    # introspection (RFC 7662) by the client the token was issued to
    introspected = httpx.post(
        idp.introspection_endpoint,
        data={"token": tokens["access_token"]},
        auth=(BASIC["client_id"], BASIC["client_secret"]),
        timeout=10,
    ).json()
    assert introspected["active"] is True and introspected["sub"] == "alice"
    assert introspected["client_id"] == "rp-basic"

    # refresh rotates the refresh token
    first = refresh(idp, BASIC, tokens["refresh_token"])
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert rotated["access_token"] != tokens["access_token"]
    assert userinfo(idp, rotated["access_token"]).json()["sub"] == "alice"

    # revocation (RFC 7009) of the current refresh token: the next refresh fails
    revoke = httpx.post(
        idp.revocation_endpoint,
        data={"token": rotated["refresh_token"], "token_type_hint": "refresh_token"},
        auth=(BASIC["client_id"], BASIC["client_secret"]),
        timeout=10,
    )
    assert revoke.status_code == 200, revoke.text
    after = refresh(idp, BASIC, rotated["refresh_token"])
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant"

    stats = idp.stats()
    assert stats["token"]["by_client"]["rp-basic"] == {"authorization_code": 1, "refresh_token": 2}
    assert stats["token"]["by_grant_type"] == {"authorization_code": 1, "refresh_token": 2}
    assert stats["token"]["success_by_grant_type"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["token"]["errors"] == {"refresh_token": {"invalid_grant": 1}}
    assert idp.token_calls("refresh_token", "rp-basic") == 2
    assert stats["logins"] == 1 and stats["authorization"] == 1
    assert stats["userinfo"] == {"total": 2, "ok": 2, "failed": 0}
    assert stats["revocation"]["by_client"] == {"rp-basic": 1}


def test_code_reuse_is_invalid_grant_and_revokes_its_tokens(idp):
    code, authz = login_for_code(idp, "rp-basic", "openid offline_access", prompt="consent")
    tokens = exchange_code(idp, BASIC, code, authz)
    again = token_request(
        idp,
        BASIC,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": authz.verifier,
        },
    )
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # RFC 6749 4.1.2: the tokens issued for the code are revoked too
    assert userinfo(idp, tokens["access_token"]).status_code == 401
    assert refresh(idp, BASIC, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_reusing_a_rotated_refresh_token_revokes_the_grant(idp):
    code, authz = login_for_code(idp, "rp-basic", "openid offline_access", prompt="consent")
    tokens = exchange_code(idp, BASIC, code, authz)
    new = refresh(idp, BASIC, tokens["refresh_token"]).json()
    reuse = refresh(idp, BASIC, tokens["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    # oidc-provider treats reuse as theft: the whole grant is gone, the new token too
    assert refresh(idp, BASIC, new["refresh_token"]).json()["error"] == "invalid_grant"
    assert userinfo(idp, new["access_token"]).status_code == 401


def test_client_secret_post_second_client(idp):
    code, authz = login_for_code(idp, "rp-post", "openid email", user="bob")
    # the IdP insists on the registered method: Basic is refused for a client_secret_post client
    wrong = token_request(
        idp,
        POST,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": authz.verifier,
        },
        method="client_secret_basic",
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    code, authz = login_for_code(idp, "rp-post", "openid email", user="bob")
    tokens = exchange_code(idp, POST, code, authz)
    # refresh_token_policy "always" (default): a refresh token without offline_access
    assert tokens["refresh_token"]
    info = userinfo(idp, tokens["access_token"]).json()
    assert info["sub"] == "bob" and info["email"] == "bob@example.test"
    assert refresh(idp, POST, tokens["refresh_token"]).status_code == 200
    assert idp.stats()["token"]["by_client"]["rp-post"] == {"authorization_code": 2, "refresh_token": 1}


def test_offline_access_policy_needs_prompt_consent():
    """refresh_token_policy=offline_access reproduces the OpenID rule: no prompt=consent, no refresh."""
    with harness.start_upstream({"clients": [BASIC], "refresh_token_policy": "offline_access"}) as idp:
        code, authz = login_for_code(idp, "rp-basic", "openid offline_access")
        tokens = exchange_code(idp, BASIC, code, authz)
        assert "refresh_token" not in tokens
        assert "offline_access" not in tokens["scope"].split()

        code, authz = login_for_code(idp, "rp-basic", "openid offline_access", prompt="consent")
        tokens = exchange_code(idp, BASIC, code, authz)
        assert tokens["refresh_token"]


def test_pkce_is_required_and_checked(idp):
    # no code_challenge: the IdP redirects back with invalid_request
    params = {
        "response_type": "code",
        "client_id": "rp-basic",
        "redirect_uri": REDIRECT_URI,
        "scope": "openid",
        "state": "s1",
    }
    with httpx.Client() as browser:
        response = browser.get(f"{idp.authorization_endpoint}?{urlencode(params)}")
    assert response.status_code in (302, 303)
    error = harness.parse_redirect(response.headers["location"])
    assert error["error"] == "invalid_request" and error["state"] == "s1"
    assert "PKCE" in error["error_description"]

    # a wrong verifier is invalid_grant
    code, authz = login_for_code(idp, "rp-basic", "openid")
    wrong = token_request(
        idp,
        BASIC,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": pkce_pair()[0],
        },
    )
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"


def test_upstream_login_with_a_requests_session(idp):
    authz = Authz(idp, "rp-basic", "openid")
    with requests.Session() as browser:
        location = harness.upstream_login(browser, authz.url, "erin")
    params = harness.parse_redirect(location)
    assert params["state"] == authz.state
    tokens = exchange_code(idp, BASIC, params["code"], authz)
    assert userinfo(idp, tokens["access_token"]).json()["sub"] == "erin"


def test_abort_returns_access_denied(idp):
    authz = Authz(idp, "rp-basic", "openid")
    with httpx.Client() as browser:
        location = harness.upstream_login(browser, authz.url, "alice", abort=True)
    params = harness.parse_redirect(location)
    assert params["error"] == "access_denied" and params["state"] == authz.state
    assert idp.stats()["aborts"] == 1


def test_unknown_resource_is_invalid_target(idp):
    authz = Authz(idp, "rp-basic", "openid", resource="http://127.0.0.1:1/mcp/demo")
    with httpx.Client() as browser:
        response = browser.get(authz.url)
    params = harness.parse_redirect(response.headers["location"])
    assert params["error"] == "invalid_target" and params["state"] == authz.state


def test_separate_consent_step_and_existing_session():
    with harness.start_upstream({"clients": [BASIC], "auto_consent": False}) as idp:
        authz = Authz(idp, "rp-basic", "openid profile")
        with httpx.Client() as browser:
            first = harness.upstream_login(browser, authz.url, "carol")
            assert "code" in harness.parse_redirect(first)
            # same browser, same scopes: the IdP session and grant are reused, no page at all
            second = Authz(idp, "rp-basic", "openid profile")
            location = harness.upstream_login(browser, second.url, "ignored")
            assert harness.parse_redirect(location)["state"] == second.state
        stats = idp.stats()
        assert stats["logins"] == 1 and stats["consents"] == 1


def test_runtime_admin_knobs(idp):
    idp.set_config(access_token_ttl=5)
    code, authz = login_for_code(idp, "rp-basic", "openid")
    tokens = exchange_code(idp, BASIC, code, authz)
    assert tokens["expires_in"] <= 5

    # injected token-endpoint failure, then normal service again
    idp.set_config(token_failures={"count": 1, "status": 503, "error": "temporarily_unavailable"})
    failed = refresh(idp, BASIC, tokens["refresh_token"])
    assert failed.status_code == 503 and failed.json()["error"] == "temporarily_unavailable"
    ok = refresh(idp, BASIC, tokens["refresh_token"])
    assert ok.status_code == 200

    # revoke the user's grants at the IdP: refresh is invalid_grant, userinfo 401
    assert idp.revoke_grants(account_id="alice") == 1
    assert refresh(idp, BASIC, ok.json()["refresh_token"]).json()["error"] == "invalid_grant"
    assert userinfo(idp, ok.json()["access_token"]).status_code == 401

    # strict_client_id: client_id both in Basic and in the body is refused
    idp.set_config(strict_client_id=True)
    code, authz = login_for_code(idp, "rp-basic", "openid")
    dup = httpx.post(
        idp.token_endpoint,
        auth=(BASIC["client_id"], BASIC["client_secret"]),
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": "rp-basic",
            "redirect_uri": REDIRECT_URI,
            "code_verifier": authz.verifier,
        },
    )
    assert dup.status_code == 400 and dup.json()["error"] == "invalid_request"

    # a client added while the IdP runs (e.g. once the proxy's callback URL is known)
    late = {**BASIC, "client_id": "late-client", "client_secret": "late-secret"}
    idp.add_client(late)
    code, authz = login_for_code(idp, "late-client", "openid")
    assert exchange_code(idp, late, code, authz)["access_token"]
    assert idp.server_config("late-client", slug="demo")["client_secret"] == "late-secret"

    with pytest.raises(httpx.HTTPStatusError):
        idp.set_config(issuer="http://elsewhere")  # not a runtime setting


def test_issuer_with_path():
    with harness.start_upstream({"clients": [BASIC], "issuer_path": "/realms/test"}) as idp:
        assert idp.issuer.endswith("/realms/test")
        assert idp.token_endpoint == idp.issuer + "/token"
        code, authz = login_for_code(idp, "rp-basic", "openid")
        assert userinfo(idp, exchange_code(idp, BASIC, code, authz)["access_token"]).json()["sub"] == "alice"


def test_bad_config_fails_fast_with_the_log():
    bad = {"clients": [{"client_id": "x", "client_secret": "y", "redirect_uris": ["not a uri"]}]}
    with pytest.raises(harness.HarnessError, match="redirect_uris"):
        harness.start_upstream(bad)


def test_stop_is_idempotent_and_frees_the_port():
    idp = harness.start_upstream({"clients": [BASIC]})
    url = idp.discovery_url
    assert httpx.get(url).status_code == 200
    idp.stop()
    idp.stop()
    assert not idp.is_running()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


# ------------------------------------------------------------------------------------------------
# the internal MCP server, through the official MCP client


def _mcp_client(url: str, token: str | None, mode: str) -> tuple[Client, httpx2.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http_client = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60))
    return Client(streamable_http_client(url, http_client=http_client), mode=mode), http_client


@pytest.fixture
def tokens(idp):
    code, authz = login_for_code(idp, "rp-basic", "openid offline_access", user="dave", prompt="consent")
    return exchange_code(idp, BASIC, code, authz)


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # initialize handshake / 2026-07-28 single exchange
def test_mcp_whoami_echo_and_auth_header(idp, tokens, mode):
    access_token = tokens["access_token"]
    with harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/mcp")

        async def scenario():
            client, http_client = _mcp_client(server.url, access_token, mode)
            async with http_client, client:
                names = {tool.name for tool in (await client.list_tools()).tools}
                assert {"whoami", "echo", "echo_auth", "echo_headers", "stream_progress", "slow"} <= names
                who = await client.call_tool("whoami", {})
                assert not who.is_error, who
                assert who.content[0].text == "dave"
                echoed = await client.call_tool("echo", {"text": "hello"})
                assert echoed.content[0].text == "hello"
                auth = await client.call_tool("echo_auth", {})
                assert auth.content[0].text == f"Bearer {access_token}"
                headers = (await client.call_tool("echo_headers", {})).structured_content
                assert headers["authorization"] == f"Bearer {access_token}"

        anyio.run(scenario)
        assert idp.stats()["userinfo"]["ok"] == 1
        assert server.stats()["requests"]["POST"] >= 4


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_mcp_progress_notifications_stream_one_by_one(mode):
    count, delay = 5, 0.3
    with harness.start_mcp_server() as server:

        async def scenario():
            arrivals: list[tuple[float, float]] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                arrivals.append((time.monotonic(), progress))

            client, http_client = _mcp_client(server.url, None, mode)
            async with http_client, client:
                start = time.monotonic()
                result = await client.call_tool(
                    "stream_progress", {"count": count, "delay": delay}, progress_callback=on_progress
                )
                done = time.monotonic()
            return start, done, result, arrivals

        start, done, result, arrivals = anyio.run(scenario)
        assert result.content[0].text == "done"
        assert [p for _, p in arrivals] == [float(i) for i in range(1, count + 1)]
        # each notification arrived when it was sent, not buffered until the result
        assert all(t <= done for t, _ in arrivals)
        assert arrivals[0][0] - start < delay * 2
        assert done - arrivals[0][0] >= (count - 1) * delay * 0.8
        gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
        assert min(gaps) >= delay * 0.5, gaps


def test_mcp_require_bearer(idp, tokens):
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
    accept = {"Accept": "application/json, text/event-stream"}
    with harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "1"}) as server:
        missing = httpx.post(server.url, json=body, headers=accept)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        ok = httpx.post(server.url, json=body, headers={**accept, "Authorization": "Bearer anything"})
        assert ok.status_code == 200
        assert server.stats()["unauthorized"] == 1

    with harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "userinfo"}) as server:
        bogus = httpx.post(server.url, json=body, headers={**accept, "Authorization": "Bearer bogus"})
        assert bogus.status_code == 401
        good = httpx.post(
            server.url, json=body, headers={**accept, "Authorization": f"Bearer {tokens['access_token']}"}
        )
        assert good.status_code == 200


def test_mcp_slow_tool():
    with harness.start_mcp_server() as server:

        async def scenario():
            client, http_client = _mcp_client(server.url, None, "legacy")
            async with http_client, client:
                start = time.monotonic()
                result = await client.call_tool("slow", {"seconds": 0.5})
                return result, time.monotonic() - start

        result, elapsed = anyio.run(scenario)
        assert result.content[0].text == "slept 0.5" and elapsed >= 0.5
