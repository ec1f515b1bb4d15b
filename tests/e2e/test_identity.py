"""Acceptance: identity assertions with the real parts. The internal MCP server verifies
`X-Identity-Assertion` against the proxy's JWKS (`mcp_server.verify_identity_assertion`, the README's lines)
and answers `whoami` from it, with and without the upstream token forwarded; a key rotation keeps every
request verifiable during the overlap."""

from __future__ import annotations

import json

import anyio
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from harness import tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.harness import tool_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]


def identity_of(client) -> dict:
    result = anyio.run(client.call_tool, "identity")
    assert not result.is_error, result
    return result.structured_content or json.loads(result.content[0].text)


def test_whoami_from_the_assertion_without_the_upstream_token(make_stack):
    # The internal server accepts no bearer check at all: the assertion is all it has.
    stack = make_stack(
        server={"identity_assertion": True, "forward_upstream_token": False},
        mcp_env={"REQUIRE_BEARER": ""},
        verify_identity=True,
    )
    client = stack.client(client_name="Assertion client")
    result = anyio.run(client.call_tool, "whoami")
    assert not result.is_error, stack.mcp.log_text() + stack.proxy.log_text()
    assert tool_text(result) == "alice"
    assert tool_text(anyio.run(client.call_tool, "echo_auth")) == ""  # no upstream token reached it
    claims = identity_of(client)
    assert claims["iss"] == stack.issuer and claims["aud"] == stack.mcp.url
    assert claims["sub"] == "alice" and claims["email"] == "alice@example.test"
    assert claims["name"] == "Test User alice" and isinstance(claims["groups"], list)
    assert claims["exp"] - claims["iat"] <= 60
    assert claims["client_id"]


def test_whoami_from_the_assertion_with_the_upstream_token_and_across_a_rotation(make_stack):
    stack = make_stack(server={"identity_assertion": True}, verify_identity=True)  # bearer checked at userinfo too
    client = stack.client(client_name="Assertion client")
    assert tool_text(anyio.run(client.call_tool, "whoami")) == "alice"
    assert tool_text(anyio.run(client.call_tool, "echo_auth")).startswith("Bearer ")
    before = {kid for (kid,) in stack.proxy.sql("SELECT kid FROM oauthproxy_identitykey")}
    stack.proxy.deployment.manage("rotate_identity_key", stack.slug, "--overlap", "3600")
    # The running process keeps signing with the old key for a while; the old key stays published, so
    # every request verifies, before and after the process picks the new key up.
    for _ in range(3):
        assert tool_text(anyio.run(client.call_tool, "whoami")) == "alice"
    kids = {kid for (kid,) in stack.proxy.sql("SELECT kid FROM oauthproxy_identitykey")}
    assert len(kids) == 2 and before < kids
