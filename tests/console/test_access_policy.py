"""Access and tool policies for operators: the configuration document (API, import/export, admin form),
validated with RFC-shaped 400s, team-scoped like the rest of a server, and the admin's "Who can use this?"."""

import pytest
from django.contrib.auth.models import User

from oauthproxy.console.servers import servers_export, servers_import
from oauthproxy.models import McpServer
from tests.conftest import make_server
from tests.console.test_admin import form_data
from tests.console.test_api import API, alice, api_as, document, teams, world  # noqa: F401 (fixtures)
from tests.gateway.internal_server import InternalMcpServer

ACCESS = {"groups": ["sales"], "email_domains": ["example.com"]}
RULES = [{"tools": ["admin_*"], "groups": ["admins"]}]

pytestmark = pytest.mark.django_db


def test_policies_round_trip_through_the_api(alice, world):  # noqa: F811
    api = api_as(alice)
    created = api.post(f"{API}/servers/", document(access=ACCESS, groups_claim="realm_access.roles",
                                                   tool_policy=RULES), format="json")
    assert created.status_code == 201, created.content
    body = api.get(f"{API}/servers/wiki/").json()
    assert body["access"] == ACCESS and body["tool_policy"] == RULES and body["groups_claim"] == "realm_access.roles"
    changed = api.patch(f"{API}/servers/wiki/", {"tool_policy": []}, format="json")
    assert changed.status_code == 200 and McpServer.objects.get(slug="wiki").tool_policy == []


@pytest.mark.parametrize("field, value", [
    ("access", {"groups": "sales"}),
    ("access", {"roles": ["x"]}),
    ("access", ["sales"]),
    ("tool_policy", [{"tools": "admin_*", "groups": ["admins"]}]),
    ("tool_policy", {"admin_*": ["admins"]}),
    ("groups_claim", "has spaces"),
])
def test_bad_policies_get_a_400_naming_the_field(alice, world, field, value):  # noqa: F811
    response = api_as(alice).post(f"{API}/servers/", document(**{field: value}), format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not McpServer.objects.filter(slug="wiki").exists()


def test_another_teams_policy_is_out_of_reach(alice, world):  # noqa: F811
    response = api_as(alice).patch(f"{API}/servers/theirs/", {"access": {"groups": ["x"]}}, format="json")
    assert response.status_code == 404


def test_import_and_export_carry_the_policies():
    report = servers_import(documents=[document(access=ACCESS, tool_policy=RULES)])
    assert report
    exported = next(d for d in servers_export() if d["slug"] == "wiki")
    assert exported["access"] == ACCESS and exported["tool_policy"] == RULES


def test_the_admin_form_saves_policies(client):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    data = form_data(access='{"groups": ["sales"]}', tool_policy='[{"tools": ["admin_*"], "groups": ["admins"]}]',
                     groups_claim="")
    response = client.post("/admin/oauthproxy/mcpserver/add/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    server = McpServer.objects.get(slug="wiki")
    assert server.access == {"groups": ["sales"]} and server.tool_policy == RULES
    bad = client.post("/admin/oauthproxy/mcpserver/add/", form_data(slug="wiki2", access='{"groups": "x"}'))
    assert bad.status_code == 200 and not McpServer.objects.filter(slug="wiki2").exists()


@pytest.fixture(scope="module")
def internal_mcp():
    server = InternalMcpServer()
    yield server
    server.stop()


def test_who_can_use_this_shows_the_server_and_each_tool(client, internal_mcp):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    server = make_server(mcp_url=internal_mcp.url, access={"groups": ["sales"]}, tool_policy=RULES)
    url = f"/admin/oauthproxy/mcpserver/{server.pk}/who-can-use/"

    page = client.get(url, {"email": "ann@example.com", "groups": "sales"}).content.decode()
    assert 'id="server-decision"' in page and "Allowed" in page
    row = page.split("<code>admin_reset</code>")[1].split("</tr>")[0]
    assert "Refused" in row and "admins" in row
    assert "<code>echo</code>" in page

    refused = client.get(url, {"email": "bob@example.com", "groups": "engineering"}).content.decode()
    assert "Refused" in refused.split('id="server-decision"')[1].split("</h2>")[0]


def test_who_can_use_this_says_when_tools_cannot_be_listed(client):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    server = make_server(mcp_url="http://127.0.0.1:9/mcp", tool_policy=RULES)
    page = client.get(f"/admin/oauthproxy/mcpserver/{server.pk}/who-can-use/", {"groups": "admins"})
    assert page.status_code == 200
    assert 'id="tools-note"' in page.content.decode()
