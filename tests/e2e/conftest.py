"""Fixtures for the end-to-end suite: a company IdP, an internal MCP server and the proxy, all real.

`make_stack(...)` starts, for one test, on loopback ports chosen at run time:
- the upstream: oidc-provider configured like a company IdP: one static confidential client (`mcp-proxy`)
  whose only redirect URI is the proxy's `/oauth/<slug>/callback`, PKCE required, refresh tokens only for
  `offline_access` requested with `prompt=consent`, short access tokens, a userinfo endpoint, its own
  login and consent pages (driven over HTTP by harness.upstream_login, clicked in test_browser.py);
- the internal MCP server (MCP Python SDK) whose `whoami` tool asks the upstream userinfo endpoint who the
  bearer token it received belongs to; it refuses requests whose token the upstream does not accept;
- the proxy: a fresh PostgreSQL database, `manage.py import_servers`, one uvicorn process.
Everything is stopped (and the database dropped) when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    import proxy as proxy_helpers
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e import proxy as proxy_helpers

UPSTREAM_CLIENT_ID = "mcp-proxy"
# Characters that must be form-encoded in HTTP Basic credentials (RFC 6749 §2.3.1) and in a form body.
UPSTREAM_CLIENT_SECRET = "upstream secret/with+odd=chars&more%"
SLUG = "tools"
SERVER_NAME = "Company Tools"
USER = "alice"

# The company IdP (see upstream/idp.mjs for each key).
COMPANY_IDP: dict[str, Any] = {
    "access_token_ttl": 30,
    "refresh_token_policy": "offline_access",  # the OpenID rule: offline_access + prompt=consent
    "rotate_refresh_tokens": True,
    "pkce_required": True,
    "auto_consent": False,  # the IdP shows its own consent page after the login page
    "resource_indicators": True,  # a forwarded `resource` would be invalid_target
    "clock_tolerance": 0,  # an expired access token is refused at once (at userinfo, by the MCP server)
}

# Proxy settings for every e2e deployment (environment variables, as an operator sets them).
PROXY_ENV = {
    # Refresh upstream tokens this many seconds before they expire (production default 60 is longer
    # than the short upstream tokens of these tests).
    "UPSTREAM_REFRESH_MARGIN": "2",
}


class _ProxyUrls:
    """URLs of one MCP server at a proxy, and the MCP client apps a test opened against it (``base_url``,
    ``slug`` and ``_clients`` come from the dataclass)."""

    @property
    def gateway_url(self) -> str:
        return f"{self.base_url}/mcp/{self.slug}"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/oauth/{self.slug}"

    def client(self, **kwargs: Any) -> harness.McpOAuthClient:
        """An MCP client app (official SDK) for this stack's gateway; closed when the test ends."""
        client = harness.McpOAuthClient(kwargs.pop("server_url", self.gateway_url), **kwargs)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()


@dataclass
class Stack(_ProxyUrls):
    idp: harness.Upstream
    mcp: harness.McpServerProc
    proxy: proxy_helpers.Proxy
    slug: str
    auth_method: str
    server_name: str = SERVER_NAME
    upstream_client_id: str = UPSTREAM_CLIENT_ID
    _clients: list[harness.McpOAuthClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.proxy.base_url



def upstream_client(auth_method: str, callback_urls: list[str]) -> dict[str, Any]:
    return {
        "client_id": UPSTREAM_CLIENT_ID,
        "client_secret": UPSTREAM_CLIENT_SECRET,
        "redirect_uris": callback_urls,
        "token_endpoint_auth_method": auth_method,
        "grant_types": ["authorization_code", "refresh_token"],
    }


def server_document(idp: harness.Upstream, mcp: harness.McpServerProc, **overrides: Any) -> dict[str, Any]:
    """The configuration document (DESIGN §3) an operator writes for the stack's MCP server."""
    values = {"slug": SLUG, "name": SERVER_NAME, "mcp_url": mcp.url, **overrides}
    return idp.server_config(UPSTREAM_CLIENT_ID, **values)


@pytest.fixture(scope="session")
def static_files() -> None:
    """Production settings serve the admin's CSS/JS from STATIC_ROOT: collect them before a proxy whose admin
    pages a browser opens starts."""
    proxy_helpers.collectstatic()


@pytest.fixture
def make_stack() -> Iterator[Any]:
    with contextlib.ExitStack() as cleanup:
        stacks: list[Stack] = []
        cleanup.callback(lambda: [s.close_clients() for s in stacks])

        def factory(
            *,
            auth_method: str = "client_secret_basic",
            idp_config: Mapping[str, Any] | None = None,
            server: Mapping[str, Any] | None = None,
            proxy_env: Mapping[str, str] | None = None,
            mcp_env: Mapping[str, str] | None = None,
            slug: str = SLUG,
            verify_identity: bool = False,
        ) -> Stack:
            listener = proxy_helpers.listen_loopback()  # the proxy's port, known before the IdP starts
            base_url = proxy_helpers.socket_url(listener)
            if verify_identity:  # the internal server checks X-Identity-Assertion against the proxy's keys
                mcp_env = {"IDENTITY_JWKS_URL": f"{base_url}/oauth/{slug}/jwks.json",
                           "IDENTITY_ISSUER": f"{base_url}/oauth/{slug}", **(mcp_env or {})}
            try:
                idp = cleanup.enter_context(
                    harness.start_upstream(
                        {
                            **COMPANY_IDP,
                            **(idp_config or {}),
                            "clients": [upstream_client(auth_method, [f"{base_url}/oauth/{slug}/callback"])],
                        }
                    )
                )
                mcp = cleanup.enter_context(
                    harness.start_mcp_server(
                        userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "userinfo", **(mcp_env or {})}
                    )
                )
                document = server_document(idp, mcp, slug=slug, **(server or {}))
                proxy = cleanup.enter_context(
                    proxy_helpers.start_proxy([document], listener=listener, env={**PROXY_ENV, **(proxy_env or {})})
                )
            finally:
                listener.close()  # start_proxy hands it over; closing our reference is always right
            stack = Stack(idp=idp, mcp=mcp, proxy=proxy, slug=slug, auth_method=auth_method)
            stacks.append(stack)
            return stack

        yield factory


@dataclass
class Cluster(_ProxyUrls):
    """Several proxy processes of one deployment (one database, one public URL) behind a load balancer."""

    idp: harness.Upstream
    mcp: harness.McpServerProc
    deployment: proxy_helpers.ProxyDeployment
    processes: list[proxy_helpers.ProxyProcess]
    lb: proxy_helpers.LoadBalancer
    slug: str = SLUG
    server_name: str = SERVER_NAME
    upstream_client_id: str = UPSTREAM_CLIENT_ID
    _clients: list[harness.McpOAuthClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.deployment.public_base_url



@pytest.fixture
def make_cluster() -> Iterator[Any]:
    """`make_cluster(processes=2, ...)`: like make_stack, with N uvicorn processes on one PostgreSQL
    database behind `proxy.LoadBalancer`, whose URL is the deployment's PUBLIC_BASE_URL."""
    with contextlib.ExitStack() as cleanup:
        clusters: list[Cluster] = []
        cleanup.callback(lambda: [cluster.close_clients() for cluster in clusters])

        def factory(
            *,
            processes: int = 2,
            auth_method: str = "client_secret_basic",
            idp_config: Mapping[str, Any] | None = None,
            server: Mapping[str, Any] | None = None,
            proxy_env: Mapping[str, str] | None = None,
        ) -> Cluster:
            lb_listener = proxy_helpers.listen_loopback()
            public_url = proxy_helpers.socket_url(lb_listener)
            try:
                idp = cleanup.enter_context(
                    harness.start_upstream(
                        {
                            **COMPANY_IDP,
                            **(idp_config or {}),
                            "clients": [upstream_client(auth_method, [f"{public_url}/oauth/{SLUG}/callback"])],
                        }
                    )
                )
                mcp = cleanup.enter_context(
                    harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "userinfo"})
                )
                deployment = proxy_helpers.ProxyDeployment(
                    public_base_url=public_url, env={**PROXY_ENV, **(proxy_env or {})}
                )
                cleanup.callback(deployment.stop)
                deployment.import_servers([server_document(idp, mcp, **(server or {}))])
                procs = [deployment.start_process(name=f"proxy-{chr(ord('a') + i)}") for i in range(processes)]
                lb = cleanup.enter_context(
                    proxy_helpers.LoadBalancer([p.direct_url for p in procs], listener=lb_listener)
                )
            except BaseException:
                lb_listener.close()
                raise
            cluster = Cluster(idp=idp, mcp=mcp, deployment=deployment, processes=procs, lb=lb)
            clusters.append(cluster)
            return cluster

        yield factory
