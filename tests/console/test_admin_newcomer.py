"""The admin as a newcomer meets it (issue 12): a server added by hand stores what was typed, teams and
API tokens are made in the admin, read-only pages are read-only, deleting says it revokes, and `/` is a
landing page."""

from html.parser import HTMLParser

import pytest
import responses
from django.contrib.auth.models import Group, User
from django.core.cache import cache

from oauthproxy.console.management.commands.team_create import team_permissions
from oauthproxy.models import ApiToken, McpServer, UpstreamSession
from tests.conftest import UPSTREAM, make_server
from tests.factories import make_client, make_upstream_session

ADMIN = "/admin/oauthproxy"


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()


@pytest.fixture
def root(client, db):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


class FormValues(HTMLParser):
    """The values a browser would submit from a page's form as rendered (inputs, textareas, checkboxes)."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, str] = {}
        self._textarea: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        name = attrs.get("name")
        if tag == "input" and name and attrs.get("type") not in ("submit", "button"):
            if attrs.get("type") == "checkbox":
                if "checked" in attrs:
                    self.values[name] = attrs.get("value", "on")
            else:
                self.values[name] = attrs.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.values[name] = ""
        elif tag == "option" and "selected" in attrs and self._select:
            self.values[self._select] = attrs.get("value", "")
        if tag == "select":
            self._select = name
            self.values.setdefault(name, "")

    _select = None

    def handle_data(self, data):
        if self._textarea:
            self.values[self._textarea] += data

    def handle_endtag(self, tag):
        if tag == "textarea":
            self.values[self._textarea] = self.values[self._textarea].strip("\n")
            self._textarea = None


def rendered_form(http, url: str) -> dict[str, str]:
    parser = FormValues()
    parser.feed(http.get(url).content.decode())
    return parser.values


HAND_TYPED = {
    "slug": "wiki",
    "name": "Wiki",
    "authorization_endpoint": "https://idp.example.com/authorize",
    "token_endpoint": "https://idp.example.com/token",
    "client_id": "proxy-client",
    "client_secret": "s3cret",
}


@pytest.mark.django_db
class TestServerAddedByHand:
    def test_add_form_prefills_no_json_null(self, root):
        values = rendered_form(root, f"{ADMIN}/mcpserver/add/")
        assert values["scopes"] == ""
        assert values["token_endpoint_auth_methods_supported"] == ""
        assert "null" not in values.values()

    def test_untouched_json_fields_store_no_scopes(self, root):
        data = {**rendered_form(root, f"{ADMIN}/mcpserver/add/"), **HAND_TYPED}
        response = root.post(f"{ADMIN}/mcpserver/add/", data)
        assert response.status_code == 302, response.content.decode()[:3000]
        server = McpServer.objects.get(slug="wiki")
        assert server.scopes == []
        assert server.token_endpoint_auth_methods_supported == ["client_secret_basic"]
        assert server.extra_authorize_params == {}

    def test_typed_scopes_are_stored_exactly(self, root):
        data = {**rendered_form(root, f"{ADMIN}/mcpserver/add/"), **HAND_TYPED, "scopes": "openid profile"}
        root.post(f"{ADMIN}/mcpserver/add/", data)
        assert McpServer.objects.get(slug="wiki").scopes == ["openid", "profile"]

    def test_slug_help_text_shows_the_url_shape(self, root):
        assert "/mcp/&lt;slug&gt;" in root.get(f"{ADMIN}/mcpserver/add/").content.decode()


@pytest.mark.django_db
class TestLandingPage:
    def test_root_is_a_short_landing_page_with_the_ways_in(self, client):
        response = client.get("/")
        assert response.status_code == 200
        html = response.content.decode()
        assert "MCP OAuth Proxy" in html
        for href in ('href="/admin/"', 'href="/api/docs/"', 'href="/healthz"', 'href="/readyz"'):
            assert href in html

    def test_admin_view_site_lands_there(self, root):
        html = root.get("/admin/").content.decode()
        assert 'href="/"' in html  # Django's "View site"
        assert root.get("/").status_code == 200


@pytest.mark.django_db
class TestClientsAndSessions:
    def test_client_page_has_no_broken_view_on_site(self, root, server):
        mcp_client = make_client(server)
        response = root.get(f"{ADMIN}/client/{mcp_client.pk}/change/")
        assert response.status_code == 200
        assert "View on site" not in response.content.decode()

    def test_session_title_is_human(self, server):
        session = make_upstream_session(server, make_client(server, name="Claude Desktop"), subject="alice")
        title = str(UpstreamSession.objects.get(pk=session.pk))
        assert title.startswith("alice with Claude Desktop on CRM tools, since ")
        assert str(server.pk) not in title

    def test_session_page_is_read_only_without_save_buttons(self, root, server):
        session = make_upstream_session(server, make_client(server))
        html = root.get(f"{ADMIN}/upstreamsession/{session.pk}/change/").content.decode()
        assert 'name="_save"' not in html and 'name="_continue"' not in html
        assert "Revoke this session" in html

    def test_delete_pages_say_deleting_revokes_upstream_too(self, root, server):
        mcp_client = make_client(server)
        session = make_upstream_session(server, mcp_client)
        for url in (f"{ADMIN}/client/{mcp_client.pk}/delete/", f"{ADMIN}/upstreamsession/{session.pk}/delete/"):
            html = root.get(url).content.decode()
            assert "revokes" in html and "upstream" in html
        listing = root.get(f"{ADMIN}/client/").content.decode()
        assert "Delete the selected clients (revokes them, upstream too)" in listing
        confirm = root.post(f"{ADMIN}/client/", {"action": "delete_selected", "_selected_action": [mcp_client.pk]})
        assert "first revokes all its sessions" in confirm.content.decode()

    def test_deleting_a_session_revokes_it_upstream_first(self, root, upstream):
        server = make_server(revocation_endpoint=f"{UPSTREAM}/revoke")
        upstream.add(responses.POST, f"{UPSTREAM}/revoke", status=200)
        session = make_upstream_session(server, make_client(server), refresh_token="upstream-rt-1")
        root.post(f"{ADMIN}/upstreamsession/{session.pk}/delete/", {"post": "yes"})
        assert not UpstreamSession.objects.filter(pk=session.pk).exists()
        revoked = [call.request.body for call in upstream.calls if call.request.url == f"{UPSTREAM}/revoke"]
        assert any("upstream-rt-1" in body for body in revoked)


@pytest.mark.django_db
class TestTeams:
    def test_superuser_creates_a_team_with_members_and_team_permissions(self, root):
        bob = User.objects.create_user("bob", password="pw")
        response = root.post(f"{ADMIN}/team/add/", {"name": "payments", "members": [bob.pk]})
        assert response.status_code == 302, response.content.decode()[:3000]
        team = Group.objects.get(name="payments")
        assert set(team.permissions.all()) == set(team_permissions())
        bob.refresh_from_db()
        assert bob.is_staff and list(bob.groups.all()) == [team]
        listing = root.get(f"{ADMIN}/team/").content.decode()
        assert "payments" in listing and "bob" in listing

    def test_a_member_sees_only_the_team_servers(self, root, client):
        bob = User.objects.create_user("bob", password="pw")
        root.post(f"{ADMIN}/team/add/", {"name": "payments", "members": [bob.pk]})
        make_server(slug="pay", name="Payments", team=Group.objects.get(name="payments"))
        make_server(slug="other", name="Other")
        client.force_login(bob)
        html = client.get(f"{ADMIN}/mcpserver/").content.decode()
        assert "Payments" in html and "Other" not in html

    def test_removing_a_member_in_the_admin_takes_them_out(self, root):
        bob = User.objects.create_user("bob", password="pw", is_staff=True)
        root.post(f"{ADMIN}/team/add/", {"name": "payments", "members": [bob.pk]})
        team = Group.objects.get(name="payments")
        root.post(f"{ADMIN}/team/{team.pk}/change/", {"name": "payments", "members": []})
        assert not bob.groups.exists()

    def test_team_staff_cannot_manage_teams(self, client):
        bob = User.objects.create_user("bob", password="pw", is_staff=True)
        client.force_login(bob)
        assert client.get(f"{ADMIN}/team/add/").status_code == 403


@pytest.mark.django_db
class TestApiTokens:
    def make(self, http) -> str:
        response = http.post(f"{ADMIN}/apitoken/add/", {"expires_in_days": "30"})
        assert response.status_code == 200
        assert "no-store" in response["Cache-Control"]
        html = response.content.decode()
        start = html.index('id="api-token"')
        return html[html.index(">", start) + 1:html.index("</code>", start)]

    def test_staff_user_creates_a_token_shown_once_that_works(self, client):
        bob = User.objects.create_user("bob", password="pw", is_staff=True)
        client.force_login(bob)
        assert client.get(f"{ADMIN}/apitoken/add/").status_code == 200
        token = self.make(client)
        assert len(token) >= 40
        listing = client.get(f"{ADMIN}/apitoken/").content.decode()
        assert token not in listing and "bob" in listing
        client.logout()
        api = client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=f"Token {token}")  # acts as bob
        assert api.status_code == 200

    def test_deleting_revokes_and_others_cannot_see_it(self, client):
        bob = User.objects.create_user("bob", password="pw", is_staff=True)
        eve = User.objects.create_user("eve", password="pw", is_staff=True)
        client.force_login(bob)
        token = self.make(client)
        digest = ApiToken.objects.get(user=bob).digest
        client.force_login(eve)
        assert client.get(f"{ADMIN}/apitoken/{digest}/delete/").status_code in (302, 404)
        assert "bob" not in client.get(f"{ADMIN}/apitoken/").content.decode()
        client.force_login(bob)
        client.post(f"{ADMIN}/apitoken/{digest}/delete/", {"post": "yes"})
        client.logout()
        assert client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=f"Token {token}").status_code == 401
