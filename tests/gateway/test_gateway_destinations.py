"""Issue 13, finding 2 at the gateway: a team member sets ``mcp_url`` to the proxy's own metrics page (or any
loopback, link-local or metadata address), waits for the server cache, and calls ``/mcp/<slug>`` with the
team's own token. The gateway must refuse to connect (502), checked against the address it resolves, unless
a superuser saved that destination or a platform admin allowed it explicitly."""

from __future__ import annotations

import socket

import httpx
import pytest

from oauthproxy.console.servers import server_save
from oauthproxy.models import DestinationRule, McpServer
from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, make_grant

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def production_policy(settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": False}


@pytest.fixture
def team(db):
    from django.contrib.auth.models import Group

    return Group.objects.create(name="team-b")


def post(url: str, token: str) -> httpx.Response:
    return httpx.post(url, json=INITIALIZE, headers={**ACCEPT, "Authorization": f"Bearer {token}"}, timeout=10)


def test_mcp_url_at_the_proxys_own_metrics_is_refused(proxy, gateway_url, team):
    server = make_server(slug="bobs", team=team, mcp_url=f"{proxy.base_url}/metrics")  # stored, never checked
    grant = make_grant(server)
    response = post(gateway_url("bobs"), grant.token)
    assert response.status_code == 502
    assert b"proxy_" not in response.content and b"# HELP" not in response.content


def test_a_name_resolving_to_loopback_is_refused_at_connect_time(proxy, gateway_url, team, monkeypatch):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "tools.bob.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = proxy.base_url.rsplit(":", 1)[1]
    server = make_server(slug="bobs", team=team, mcp_url=f"http://tools.bob.example:{port}/metrics")
    response = post(gateway_url("bobs"), make_grant(server).token)
    assert response.status_code == 502
    assert b"# HELP" not in response.content


def test_a_superuser_saved_destination_is_used(proxy, gateway_url, internal, team):
    server = McpServer(slug="crm", name="CRM", team=team, mcp_url=internal.url,
                       authorization_endpoint="https://idp.example.com/authorize",
                       token_endpoint="https://idp.example.com/token", client_id="c", client_secret="s")
    server_save(server=server, actor=None)  # a management command: trusted like a superuser
    response = post(gateway_url("crm"), make_grant(server).token)
    assert response.status_code == 200, response.content


def test_an_explicit_allowance_is_used(proxy, gateway_url, internal, team):
    DestinationRule.objects.create(team=team, pattern="127.0.0.0/8")
    server = make_server(slug="crm", team=team, mcp_url=internal.url)
    response = post(gateway_url("crm"), make_grant(server).token)
    assert response.status_code == 200, response.content
