"""The self-service boundary (issue 13, findings 1 and 2), tried as an attacker would: bob, a staff member
of team-b with an API token, owns one server and a listener ("bob's host") on loopback.

1. Changing where a credential goes requires the credential.
2. The outbound destination policy: loopback, link-local and metadata addresses are refused for everyone but
   superusers unless a superuser allows them; per-team rules; checked on save and at connect time; discovery
   and the connection check answer a refused destination the same whether or not something listens there.
"""

import re
import socket

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command

from oauthproxy.console.forms import McpServerForm
from oauthproxy.console.servers import server_save
from oauthproxy.core.exceptions import UpstreamError
from oauthproxy.models import AuditEvent, DestinationRule, McpServer
from oauthproxy.upstream.client import UpstreamClient
from tests.conftest import UPSTREAM, make_server
from tests.console.test_api import API, SECRET, api_as
from tests.listener import BobsHost, closed_port


@pytest.fixture
def production_policy(settings):
    """The policy as deployed: the test settings' allowance of loopback destinations off."""
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": False}


@pytest.fixture
def team_b(db):
    call_command("team_create", "team-b", verbosity=0)
    return Group.objects.get(name="team-b")


@pytest.fixture
def bob(team_b):
    user = User.objects.create_user("bob", password="pw", is_staff=True)
    user.groups.add(team_b)
    return user


@pytest.fixture
def bobs_server(team_b):
    return make_server(slug="bobs", team=team_b)


@pytest.fixture
def bobs_host():
    host = BobsHost()
    yield host
    host.stop()


def fake_dns(monkeypatch, answers: dict[str, str]) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.django_db
class TestTheSecretFollowsOnlyWithTheSecret:
    """Finding 1: PATCH token_endpoint to bob's host, then Check connection: bob received the stored secret."""

    @pytest.mark.parametrize("field", ["token_endpoint", "revocation_endpoint", "userinfo_endpoint", "issuer"])
    def test_moving_a_credential_endpoint_without_the_secret_is_refused(self, bob, bobs_server, bobs_host, field):
        api = api_as(bob)
        response = api.patch(f"{API}/servers/bobs/", {field: bobs_host.url + "/steal"}, format="json")
        assert response.status_code == 400
        assert "enter the client secret again" in response.json()[field][0]
        api.post(f"{API}/servers/bobs/check/")
        assert not any(SECRET.encode() in r or b"Authorization: Basic" in r for r in bobs_host.received)
        assert getattr(McpServer.objects.get(slug="bobs"), field) != bobs_host.url + "/steal"

    def test_with_the_secret_in_the_same_change_it_is_saved_and_audited(self, bob, bobs_server, bobs_host):
        response = api_as(bob).patch(
            f"{API}/servers/bobs/", {"token_endpoint": bobs_host.url + "/token", "client_secret": "bobs-own"},
            format="json",
        )
        assert response.status_code == 200, response.content
        event = AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE, server=bobs_server).latest("created")
        change = event.detail["changes"]["token_endpoint"]
        assert change == {"from": f"{UPSTREAM}/token", "to": bobs_host.url + "/token"}
        assert event.detail["changes"]["client_secret"] == "changed"
        assert SECRET not in str(event.detail) and "bobs-own" not in str(event.detail)

    def test_a_new_path_on_the_same_host_needs_no_secret(self, bob, bobs_server):
        response = api_as(bob).patch(
            f"{API}/servers/bobs/", {"token_endpoint": f"{UPSTREAM}/v2/token", "userinfo_endpoint": f"{UPSTREAM}/me"},
            format="json",
        )
        assert response.status_code == 200, response.content

    def test_the_admin_form_has_the_same_rule(self, bob, bobs_server, bobs_host):
        data = {name: getattr(bobs_server, name) for name in ("slug", "name", "mcp_url", "authorization_endpoint",
                                                               "client_id", "revocation_endpoint", "issuer")}
        data.update(team=bobs_server.team_id, token_endpoint=bobs_host.url + "/token", scopes="openid",
                    token_endpoint_auth_methods_supported="client_secret_basic", extra_authorize_params="{}",
                    use_pkce="on", enabled="on", client_admission="any")
        form_class = type("Form", (McpServerForm,), {"actor": bob})
        form = form_class(data=data, instance=McpServer.objects.get(slug="bobs"))
        assert not form.is_valid()
        assert "enter the client secret again" in str(form.errors["token_endpoint"])
        form = form_class(data={**data, "client_secret": "typed-again"}, instance=McpServer.objects.get(slug="bobs"))
        assert form.is_valid(), form.errors

    def test_import_has_the_same_rule(self, bobs_server, bobs_host, bob):
        from oauthproxy.console.servers import ServerDocumentError, servers_import

        with pytest.raises(ServerDocumentError) as refused:
            servers_import(documents=[{"slug": "bobs", "token_endpoint": bobs_host.url + "/t"}], actor=bob)
        assert any(field == "token_endpoint" for _i, field, _m in refused.value.errors)


@pytest.mark.django_db
@pytest.mark.usefixtures("production_policy")
class TestDestinationPolicy:
    """Finding 2: mcp_url, the upstream endpoints, discovery and Check connection as a request forgery."""

    @pytest.mark.parametrize("url", ["http://127.0.0.1:8000/metrics", "http://localhost:8000/metrics",
                                     "http://169.254.169.254/latest/meta-data/", "http://[::1]:5432/",
                                     "http://[::ffff:127.0.0.1]:6379/"])
    def test_a_team_member_cannot_save_a_special_destination(self, bob, bobs_server, url):
        response = api_as(bob).patch(f"{API}/servers/bobs/", {"mcp_url": url}, format="json")
        assert response.status_code == 400
        assert "not allowed for the team" in response.json()["mcp_url"][0]

    def test_a_superuser_may_and_the_destination_stays_trusted(self, bob, bobs_server, bobs_host):
        root = User.objects.create_superuser("root", password="pw")
        response = api_as(root).patch(f"{API}/servers/bobs/", {"mcp_url": bobs_host.url + "/mcp"}, format="json")
        assert response.status_code == 200
        assert McpServer.objects.get(slug="bobs").trusted_origins
        # bob may still edit other fields of the server
        assert api_as(bob).patch(f"{API}/servers/bobs/", {"name": "Bob's"}, format="json").status_code == 200
        assert bobs_host.url in McpServer.objects.get(slug="bobs").trusted_origins

    def test_an_explicit_allowance_by_a_platform_admin(self, bob, bobs_server, team_b):
        DestinationRule.objects.create(team=team_b, pattern="127.0.0.1")
        response = api_as(bob).patch(f"{API}/servers/bobs/", {"mcp_url": "http://127.0.0.1:9/mcp"}, format="json")
        assert response.status_code == 200, response.content

    def test_team_rules_restrict_the_team(self, bob, bobs_server, team_b):
        DestinationRule.objects.create(team=team_b, pattern="*.b.example")
        api = api_as(bob)
        assert api.patch(f"{API}/servers/bobs/", {"mcp_url": "https://tools.b.example/mcp"},
                         format="json").status_code == 200
        response = api.patch(f"{API}/servers/bobs/", {"mcp_url": "https://tools.a.example/mcp"}, format="json")
        assert response.status_code == 400

    def test_discovery_is_no_port_scanner(self, bob, bobs_host):
        api = api_as(bob)
        listening = api.post(f"{API}/discovery/", {"issuer": bobs_host.url}, format="json")
        closed = api.post(f"{API}/discovery/", {"issuer": f"http://127.0.0.1:{closed_port()}"}, format="json")
        assert listening.status_code == closed.status_code == 400
        assert bobs_host.connections == 0

        def without_ports(response):
            return re.sub(r":\d+", ":PORT", response.content.decode())

        assert without_ports(listening) == without_ports(closed)
        assert "not allowed" in listening.content.decode()

    def test_connection_check_is_no_port_scanner(self, bob, bobs_server, bobs_host):
        port = closed_port()
        results = {}
        for key, base in (("listening", bobs_host.url), ("closed", f"http://127.0.0.1:{port}")):
            McpServer.objects.filter(slug="bobs").update(  # stored before the policy existed
                mcp_url=base + "/mcp", token_endpoint=base + "/token", authorization_endpoint=base + "/authorize",
                issuer="", revocation_endpoint="", userinfo_endpoint="",
            )
            body = api_as(bob).post(f"{API}/servers/bobs/check/").json()
            results[key] = [(r["name"], r["status"], re.sub(r":\d+", ":PORT", r["detail"])) for r in body["results"]]
        assert results["listening"] == results["closed"]
        assert bobs_host.connections == 0

    def test_a_name_resolving_to_loopback_is_refused_at_connect_time(self, bob, bobs_server, bobs_host, monkeypatch):
        fake_dns(monkeypatch, {"idp.bob.example": "127.0.0.1"})
        api = api_as(bob)
        url = f"http://idp.bob.example:{bobs_host.port}"
        McpServer.objects.filter(slug="bobs").update(token_endpoint=url + "/token", issuer="")
        body = api.post(f"{API}/servers/bobs/check/").json()
        token = next(r for r in body["results"] if r["name"] == "Client credential at the token endpoint")
        assert token["status"] == "error" and "not allowed" in token["detail"]
        assert bobs_host.connections == 0

    def test_calls_made_while_serving_read_the_rules_once_and_a_saved_rule_at_once(
        self, bobs_server, team_b, bobs_host, django_assert_num_queries
    ):
        """The upstream calls of a login or refresh take the team's rules from the process's cache (no query
        per call); a rule a platform admin saves applies to the next call."""
        McpServer.objects.filter(slug="bobs").update(token_endpoint=bobs_host.url + "/token")  # stored before
        client = UpstreamClient(McpServer.objects.get(slug="bobs"))
        with pytest.raises(UpstreamError) as refused:
            client.refresh(refresh_token="rt")
        assert "not allowed" in refused.value.reason
        with django_assert_num_queries(0), pytest.raises(UpstreamError):
            client.refresh(refresh_token="rt")
        assert bobs_host.connections == 0

        DestinationRule.objects.create(team=team_b, pattern="127.0.0.1")
        with pytest.raises(UpstreamError) as answered:  # bob's host answers {}: no access_token in it
            client.refresh(refresh_token="rt")
        assert "not allowed" not in answered.value.reason
        assert bobs_host.connections == 1

    def test_rules_are_for_platform_admins(self, bob, team_b):
        api = api_as(bob)
        assert api.get(f"{API}/destination-rules/").status_code == 403
        root = User.objects.create_superuser("root", password="pw")
        api = api_as(root)
        created = api.post(f"{API}/destination-rules/", {"team": "team-b", "pattern": "10.0.0.0/8"}, format="json")
        assert created.status_code == 201, created.content
        assert api.post(f"{API}/destination-rules/", {"pattern": "not a pattern"}, format="json").status_code == 400
        assert [r["pattern"] for r in api.get(f"{API}/destination-rules/").json()["results"]] == ["10.0.0.0/8"]


@pytest.mark.django_db
def test_a_management_command_is_trusted_like_a_superuser(team_b):
    server = McpServer(slug="cli", name="CLI", team=team_b, mcp_url="http://127.0.0.1:9/mcp",
                       authorization_endpoint=f"{UPSTREAM}/authorize", token_endpoint=f"{UPSTREAM}/token",
                       client_id="c", client_secret="s")
    server_save(server=server, actor=None)
    assert "http://127.0.0.1:9" in server.trusted_origins


@pytest.mark.django_db
@pytest.mark.parametrize("with_team", [False, True], ids=["every-team", "one-team"])
def test_a_duplicate_destination_rule_is_a_400_not_a_500(with_team):
    """One rule per (team, pattern), a rule for every team included, on PostgreSQL and SQLite alike."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(User.objects.create_superuser("platform", password="pw"))
    body = {"pattern": "*.corp.example", "team": Group.objects.create(name="team-dup").name if with_team else None}
    assert api.post("/api/v1/destination-rules/", body, format="json").status_code == 201
    second = api.post("/api/v1/destination-rules/", body, format="json")
    assert second.status_code == 400
    assert "already allowed" in second.json()["pattern"][0]
    assert DestinationRule.objects.count() == 1
