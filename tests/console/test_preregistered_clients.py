"""Pre-registering a client in the admin and the management API: the secret shown once, hashed at rest,
team-scoped, shown as "pre-registered"; the admission policy and strict scopes in the server document."""

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command

from oauthproxy.models import AuditEvent, Client
from tests.conftest import make_server
from tests.console.test_api import API, api_as

REDIRECT = "https://claude.ai/api/mcp/auth_callback"


@pytest.fixture
def member(db):
    call_command("team_create", "team-a", verbosity=0)
    call_command("team_create", "team-b", verbosity=0)
    user = User.objects.create_user("alice", password="pw", is_staff=True)
    user.groups.add(*User.groups.field.related_model.objects.filter(name="team-a"))
    return user


@pytest.fixture
def servers(member):
    from django.contrib.auth.models import Group

    return (make_server(slug="mine", team=Group.objects.get(name="team-a")),
            make_server(slug="theirs", team=Group.objects.get(name="team-b")))


@pytest.mark.django_db
class TestApi:
    def test_team_member_preregisters_a_confidential_client(self, member, servers):
        response = api_as(member).post(f"{API}/clients/", {"server": "mine", "name": "Claude (team)",
                                                           "redirect_uris": [REDIRECT]}, format="json")
        assert response.status_code == 201, response.content
        assert response["Cache-Control"] == "no-store"
        body = response.json()
        assert body["registration_source"] == "manual" and body["client_secret"]
        row = Client.objects.get(client_id=body["client_id"])
        assert body["client_secret"] not in row.client_secret  # hashed at rest
        again = api_as(member).get(f"{API}/clients/{row.pk}/").json()
        assert "client_secret" not in again
        assert again["known_client"] == "Claude (claude.ai, Claude Desktop) (by redirect URI)"
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CLIENT_REGISTERED, actor=member).exists()

    def test_public_client_has_no_secret(self, member, servers):
        response = api_as(member).post(f"{API}/clients/", {
            "server": "mine", "name": "Gemini CLI", "redirect_uris": ["http://localhost:7777/oauth/callback"],
            "confidential": False}, format="json")
        assert response.status_code == 201 and response.json()["client_secret"] is None

    def test_another_teams_server_is_not_found(self, member, servers):
        response = api_as(member).post(f"{API}/clients/", {"server": "theirs", "name": "x",
                                                           "redirect_uris": [REDIRECT]}, format="json")
        assert response.status_code == 400 and not Client.objects.exists()

    def test_bad_redirect_uri_is_a_400(self, member, servers):
        response = api_as(member).post(f"{API}/clients/", {"server": "mine", "name": "x",
                                                           "redirect_uris": ["javascript:x"]}, format="json")
        assert response.status_code == 400 and "redirect_uris" in response.json()

    def test_server_document_carries_the_policy_fields(self, member, servers):
        api = api_as(member)
        response = api.patch(f"{API}/servers/mine/", {"client_admission": "known", "strict_scopes": True},
                             format="json")
        assert response.status_code == 200, response.content
        assert response.json()["client_admission"] == "known" and response.json()["strict_scopes"] is True
        assert api.patch(f"{API}/servers/mine/", {"client_admission": "nobody"}, format="json").status_code == 400


@pytest.mark.django_db
class TestAdmin:
    def test_add_page_shows_the_secret_once(self, client, member, servers):
        client.force_login(member)
        page = client.get("/admin/oauthproxy/client/add/")
        assert page.status_code == 200 and b"Pre-register" in page.content
        assert b"theirs" not in page.content  # other teams' servers are not offered
        response = client.post("/admin/oauthproxy/client/add/", {
            "server": str(servers[0].pk), "name": "Cursor",
            "redirect_uris": "cursor://anysphere.cursor-mcp/oauth/callback",
            "confidential": "on"})
        assert response.status_code == 200 and "no-store" in response["Cache-Control"]
        row = Client.objects.get(name="Cursor")
        assert row.client_id.encode() in response.content
        assert row.registration_source == Client.RegistrationSource.MANUAL
        change = client.get(f"/admin/oauthproxy/client/{row.pk}/change/")
        assert b"pre-registered" in change.content
        assert b"Client secret" not in change.content
