import pytest
from django.contrib.auth.models import Group, Permission, User

from oauthproxy.models import McpServer

SECRET = "upstream-secret-value-123"


def form_data(**overrides) -> dict:
    data = {
        "slug": "wiki",
        "name": "Wiki",
        "team": "",
        "enabled": "on",
        "mcp_url": "http://wiki.internal/mcp",
        "issuer": "",
        "authorization_endpoint": "https://idp.example.com/authorize",
        "token_endpoint": "https://idp.example.com/token",
        "client_id": "proxy-client",
        "client_secret": "brand-new-secret",
        "token_endpoint_auth_methods_supported": "client_secret_post client_secret_basic",
        "scopes": "openid email offline_access",
        "use_pkce": "on",
        "extra_authorize_params": "{}",
        "userinfo_endpoint": "",
        "revocation_endpoint": "",
        "access_token_lifetime": "",
        "refresh_token_lifetime": "",
        "client_admission": "any",
    }
    data.update(overrides)
    return data


@pytest.fixture
def admin_client(client, db):
    user = User.objects.create_superuser("root", password="pw")
    client.force_login(user)
    return client


@pytest.mark.django_db
class TestServerAdmin:
    def test_add_server_stores_encrypted_secret_and_shows_callback(self, admin_client):
        response = admin_client.post("/admin/oauthproxy/mcpserver/add/", form_data())
        assert response.status_code == 302, response.content.decode()[:2000]
        server = McpServer.objects.get(slug="wiki")
        assert server.client_secret == "brand-new-secret"
        assert server.scopes == ["openid", "email", "offline_access"]
        assert server.token_endpoint_auth_methods_supported == ["client_secret_post", "client_secret_basic"]

        listing = admin_client.get("/admin/oauthproxy/mcpserver/").content.decode()
        assert "https://proxy.example.test/oauth/wiki/callback" in listing

        page = admin_client.get(f"/admin/oauthproxy/mcpserver/{server.pk}/change/").content.decode()
        assert "https://proxy.example.test/oauth/wiki/callback" in page
        assert "Copy" in page
        assert "brand-new-secret" not in page
        assert "ONE shared OAuth client" in page

    def test_secret_is_write_only_and_blank_keeps_it(self, admin_client, server):
        page = admin_client.get(f"/admin/oauthproxy/mcpserver/{server.pk}/change/").content.decode()
        assert SECRET not in page
        assert "Leave blank to keep it" in page
        response = admin_client.post(
            f"/admin/oauthproxy/mcpserver/{server.pk}/change/",
            form_data(slug="crm", client_secret="", name="CRM renamed"),
        )
        assert response.status_code == 302
        server.refresh_from_db()
        assert server.name == "CRM renamed"
        assert server.client_secret == SECRET

    def test_secret_can_be_replaced(self, admin_client, server):
        admin_client.post(
            f"/admin/oauthproxy/mcpserver/{server.pk}/change/", form_data(slug="crm", client_secret="rotated")
        )
        server.refresh_from_db()
        assert server.client_secret == "rotated"

    def test_invalid_form_shows_clear_errors_and_saves_nothing(self, admin_client):
        response = admin_client.post(
            "/admin/oauthproxy/mcpserver/add/",
            form_data(slug="Bad Slug", token_endpoint="http://idp.example.com/token",
                      token_endpoint_auth_methods_supported="magic"),
        )
        assert response.status_code == 200
        body = response.content.decode()
        assert "Use lowercase letters" in body
        assert "Use an https:// URL" in body
        assert "magic" in body
        assert "brand-new-secret" not in body
        assert not McpServer.objects.exists()


@pytest.mark.django_db
def test_team_member_sees_only_own_team_servers(client, server_factory):
    team_a, team_b = Group.objects.create(name="team-a"), Group.objects.create(name="team-b")
    team_a.permissions.set(Permission.objects.filter(codename__endswith="_mcpserver"))
    mine = server_factory(slug="mine", team=team_a)
    theirs = server_factory(slug="theirs", team=team_b)
    user = User.objects.create_user("alice", password="pw", is_staff=True)
    user.groups.add(team_a)
    client.force_login(user)

    listing = client.get("/admin/oauthproxy/mcpserver/").content.decode()
    assert "mine" in listing and "theirs" not in listing
    assert client.get(f"/admin/oauthproxy/mcpserver/{mine.pk}/change/").status_code == 200
    # Another team's server is answered exactly like a missing one: 404 (DESIGN §5.11).
    assert client.get(f"/admin/oauthproxy/mcpserver/{theirs.pk}/change/").status_code == 404
    response = client.post(f"/admin/oauthproxy/mcpserver/{theirs.pk}/change/", form_data(slug="theirs"))
    assert McpServer.objects.get(pk=theirs.pk).client_id == "proxy-client"
    assert response.status_code == 404
