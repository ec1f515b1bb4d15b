"""The management API: team isolation (404 for other teams' objects), servers, discovery, connection check,
clients, sessions, audit events, tokens. The OpenAPI document itself is tested in test_openapi.py."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient

from oauthproxy.core.audit import audit_record
from oauthproxy.models import AuditEvent, Client, McpServer, UpstreamSession
from tests.conftest import UPSTREAM, make_server
from tests.factories import make_client, make_upstream_session

SECRET = "upstream-secret-value-123"
API = "/api/v1"


def api_as(user: User) -> APIClient:
    """An API client authenticating with a knox token, as automation does."""
    _instance, token = AuthToken.objects.create(user=user, expiry=timedelta(days=1))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return api


@pytest.fixture
def teams(db):
    call_command("team_create", "team-a", verbosity=0)
    call_command("team_create", "team-b", verbosity=0)
    return Group.objects.get(name="team-a"), Group.objects.get(name="team-b")


@pytest.fixture
def alice(teams):
    user = User.objects.create_user("alice", password="pw", is_staff=True)
    user.groups.add(teams[0])
    return user


@pytest.fixture
def root(db):
    return User.objects.create_superuser("root", password="pw")


@pytest.fixture
def world(teams):
    """Team A's server 'mine' and team B's 'theirs', each with a client, a session and an audit event."""
    a, b = teams
    out = {}
    for key, team in (("mine", a), ("theirs", b)):
        server = make_server(slug=key, team=team)
        client = make_client(server, name=f"{key} client")
        session = make_upstream_session(server, client, subject=f"user-of-{key}")
        event = audit_record(kind=AuditEvent.Kind.CONSENT_GIVEN, server=server, client=client, subject="x")
        out[key] = {"server": server, "client": client, "session": session, "event": event}
    return out


def no_secret(response):
    assert SECRET not in response.content.decode()


# -- access --------------------------------------------------------------------------------------

@pytest.mark.django_db
class TestAccess:
    def test_anonymous_gets_401_with_the_token_scheme(self):
        response = APIClient().get(f"{API}/servers/")
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Token"

    def test_a_bad_token_gets_401(self):
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION="Token nope")
        assert api.get(f"{API}/servers/").status_code == 401

    def test_non_staff_users_get_403(self, teams):
        user = User.objects.create_user("eve", password="pw")
        user.groups.add(teams[0])
        assert api_as(user).get(f"{API}/servers/").status_code == 403

    def test_staff_without_the_model_permission_get_403(self, db):
        user = User.objects.create_user("bob", password="pw", is_staff=True)
        assert api_as(user).get(f"{API}/servers/").status_code == 403

    def test_tokens_are_stored_as_digests_only(self, alice):
        _instance, token = AuthToken.objects.create(user=alice)
        assert not AuthToken.objects.filter(digest=token).exists()
        assert token not in json.dumps(list(AuthToken.objects.values()), default=str)


# -- team isolation ------------------------------------------------------------------------------

@pytest.mark.django_db
class TestTeamIsolation:
    def test_lists_show_only_the_members_team(self, alice, world):
        api = api_as(alice)
        assert [s["slug"] for s in api.get(f"{API}/servers/").json()["results"]] == ["mine"]
        assert [c["name"] for c in api.get(f"{API}/clients/").json()["results"]] == ["mine client"]
        assert [s["subject"] for s in api.get(f"{API}/sessions/").json()["results"]] == ["user-of-mine"]
        events = api.get(f"{API}/audit-events/").json()["results"]
        assert {e["server"] for e in events} == {"mine"}

    @pytest.mark.parametrize("method,path", [
        ("get", "/servers/theirs/"),
        ("patch", "/servers/theirs/"),
        ("put", "/servers/theirs/"),
        ("delete", "/servers/theirs/"),
        ("post", "/servers/theirs/discover/"),
        ("post", "/servers/theirs/check/"),
        ("post", "/servers/theirs/revoke-sessions/"),
        ("get", "/clients/{client}/"),
        ("post", "/clients/{client}/disable/"),
        ("post", "/clients/{client}/revoke-sessions/"),
        ("delete", "/clients/{client}/"),
        ("get", "/sessions/{session}/"),
        ("post", "/sessions/{session}/revoke/"),
        ("get", "/audit-events/{event}/"),
    ])
    def test_another_teams_objects_are_404(self, alice, world, upstream, method, path):
        theirs = world["theirs"]
        path = path.format(client=theirs["client"].pk, session=theirs["session"].pk, event=theirs["event"].pk)
        response = getattr(api_as(alice), method)(API + path, {"name": "x", "issuer": UPSTREAM}, format="json")
        assert response.status_code == 404, response.content
        assert McpServer.objects.filter(slug="theirs", name="CRM tools").exists()
        assert not Client.objects.get(pk=theirs["client"].pk).disabled
        assert UpstreamSession.objects.get(pk=theirs["session"].pk).revoked_at is None
        assert len(upstream.calls) == 0  # nothing was sent anywhere on their behalf

    def test_a_missing_object_reads_the_same_as_another_teams(self, alice, world):
        api = api_as(alice)
        assert api.get(f"{API}/servers/nope/").json() == api.get(f"{API}/servers/theirs/").json()

    def test_bulk_revocation_stays_inside_the_team(self, alice, world, upstream):
        api = api_as(alice)
        response = api.post(f"{API}/sessions/revoke/", {"server": "theirs"}, format="json")
        assert response.status_code == 400 and response.json() == {"server": ["No such server."]}
        response = api.post(f"{API}/sessions/revoke/", {"client": world["theirs"]["client"].pk}, format="json")
        assert response.status_code == 400
        response = api.post(f"{API}/sessions/revoke/", {"subject": "user-of-theirs"}, format="json")
        assert response.json() == {"revoked": 0}
        assert UpstreamSession.objects.get(pk=world["theirs"]["session"].pk).revoked_at is None

    def test_a_member_cannot_give_a_server_to_another_team(self, alice, world):
        api = api_as(alice)
        response = api.patch(f"{API}/servers/mine/", {"team": "team-b"}, format="json")
        assert response.status_code == 400 and "team" in response.json()
        response = api.patch(f"{API}/servers/mine/", {"team": None}, format="json")
        assert response.status_code == 400
        assert McpServer.objects.get(slug="mine").team.name == "team-a"

    def test_superusers_see_everything(self, root, world):
        api = api_as(root)
        assert len(api.get(f"{API}/servers/").json()["results"]) == 2
        assert api.get(f"{API}/servers/theirs/").status_code == 200


# -- servers -------------------------------------------------------------------------------------

def document(**overrides) -> dict:
    values = {
        "slug": "wiki",
        "name": "Wiki",
        "mcp_url": "http://wiki.internal/mcp",
        "authorization_endpoint": f"{UPSTREAM}/authorize",
        "token_endpoint": f"{UPSTREAM}/token",
        "client_id": "proxy-client",
        "client_secret": SECRET,
        "scopes": ["openid", "email"],
    }
    values.update(overrides)
    return values


@pytest.mark.django_db
class TestServers:
    def test_create_defaults_to_the_members_team_and_never_returns_the_secret(self, alice, world):
        response = api_as(alice).post(f"{API}/servers/", document(), format="json")
        assert response.status_code == 201, response.content
        body = response.json()
        assert body["team"] == "team-a"
        assert body["has_client_secret"] is True
        assert "client_secret" not in body
        assert body["callback_url"] == "https://proxy.example.test/oauth/wiki/callback"
        assert body["client_upstream_rate_limit"] is None
        no_secret(response)
        server = McpServer.objects.get(slug="wiki")
        assert server.client_secret == SECRET
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE, server=server)
        assert event.actor == alice and event.detail["action"] == "created"

    def test_a_member_of_two_teams_must_choose(self, alice, teams, world):
        alice.groups.add(teams[1])
        api = api_as(alice)
        response = api.post(f"{API}/servers/", document(), format="json")
        assert response.status_code == 400 and "team" in response.json()
        assert api.post(f"{API}/servers/", document(team="team-b"), format="json").status_code == 201

    def test_invalid_documents_get_field_errors_and_nothing_is_saved(self, alice, world):
        response = api_as(alice).post(f"{API}/servers/", document(
            slug="Bad Slug", token_endpoint="http://idp.example.com/token",
            token_endpoint_auth_methods_supported=["magic"]), format="json")
        assert response.status_code == 400
        errors = response.json()
        assert {"slug", "token_endpoint", "token_endpoint_auth_methods_supported"} <= set(errors)
        no_secret(response)
        assert not McpServer.objects.filter(name="Wiki").exists()

    def test_a_taken_slug_is_a_400_not_a_500(self, alice, world):
        response = api_as(alice).post(f"{API}/servers/", document(slug="theirs"), format="json")
        assert response.status_code == 400
        assert response.json() == {"slug": ["A server with this slug already exists."]}

    @pytest.mark.parametrize("body", ["not json", "[1, 2]", "null", '{"slug": {"a": 1}}',
                                      '{"extra_authorize_params": {"a\\u0000b": "x"}}',
                                      '{"extra_authorize_params": {"a\\ud800": "x"}}', '{"name": "a\\u0000"}',
                                      '{"access_token_lifetime": 99999999999999999999}'])
    def test_garbage_bodies_are_400(self, alice, world, body):
        api = api_as(alice)
        assert api.generic("POST", f"{API}/servers/", body, content_type="application/json").status_code == 400
        patch = api.generic("PATCH", f"{API}/servers/mine/", body, content_type="application/json")
        assert patch.status_code == 400, patch.content

    def test_patch_rotates_the_secret_and_audits_without_it(self, alice, world):
        api = api_as(alice)
        response = api.patch(f"{API}/servers/mine/", {"client_secret": "rotated-secret-789", "name": "Mine"},
                             format="json")
        assert response.status_code == 200, response.content
        assert "rotated-secret-789" not in response.content.decode()
        assert McpServer.objects.get(slug="mine").client_secret == "rotated-secret-789"
        event = AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE).get()
        assert event.message == "server mine: name, client_secret changed"
        assert "rotated-secret-789" not in json.dumps(event.detail) and SECRET not in json.dumps(event.detail)

    def test_patch_without_secret_keeps_it(self, alice, world):
        api_as(alice).patch(f"{API}/servers/mine/", {"client_upstream_daily_quota": 100}, format="json")
        server = McpServer.objects.get(slug="mine")
        assert server.client_secret == SECRET and server.client_upstream_daily_quota == 100

    def test_put_replaces_the_document(self, alice, world):
        response = api_as(alice).put(f"{API}/servers/mine/", document(slug="mine", name="Replaced"), format="json")
        assert response.status_code == 200, response.content
        assert McpServer.objects.get(slug="mine").name == "Replaced"

    def test_delete_revokes_the_sessions(self, alice, world, upstream):
        response = api_as(alice).delete(f"{API}/servers/mine/")
        assert response.status_code == 204
        assert not McpServer.objects.filter(slug="mine").exists()
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED, subject="user-of-mine").exists()

    def test_filters_and_ordering(self, root, world):
        api = api_as(root)
        assert [s["slug"] for s in api.get(f"{API}/servers/?team=team-b").json()["results"]] == ["theirs"]
        assert [s["slug"] for s in api.get(f"{API}/servers/?ordering=-slug").json()["results"]] == ["theirs", "mine"]
        assert api.get(f"{API}/servers/?enabled=false").json()["count"] == 0
        assert api.get(f"{API}/servers/?ordering=client_secret").status_code == 200  # unknown: ignored


def metadata(**overrides) -> dict:
    return {
        "issuer": UPSTREAM,
        "authorization_endpoint": f"{UPSTREAM}/authorize",
        "token_endpoint": f"{UPSTREAM}/oauth2/token",
        "revocation_endpoint": f"{UPSTREAM}/oauth2/revoke",
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "email"],
        **overrides,
    }


@pytest.mark.django_db
class TestDiscoveryAndCheck:
    def test_discovery_for_a_new_server_shows_what_was_found(self, alice, world, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=metadata())
        response = api_as(alice).post(f"{API}/discovery/", {"issuer": UPSTREAM}, format="json")
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["metadata_url"] == f"{UPSTREAM}/.well-known/oauth-authorization-server"
        assert body["values"]["token_endpoint"] == f"{UPSTREAM}/oauth2/token"
        assert body["values"]["token_endpoint_auth_methods_supported"] == ["client_secret_post"]
        assert body["values"]["use_pkce"] is True
        assert body["values"]["scopes"] == ["openid", "email"]
        assert "userinfo_endpoint" not in body["values"]

    def test_discovery_failures_are_400_on_the_issuer(self, alice, world, upstream):
        response = api_as(alice).post(f"{API}/discovery/", {"issuer": UPSTREAM}, format="json")
        assert response.status_code == 400
        assert "No metadata found" in response.json()["issuer"][0]

    def test_discover_and_apply_to_a_server(self, alice, world, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=metadata())
        api = api_as(alice)
        preview = api.post(f"{API}/servers/mine/discover/", {"issuer": UPSTREAM}, format="json").json()
        assert preview["applied"] == [] and preview["server"]["token_endpoint"] == f"{UPSTREAM}/token"
        response = api.post(f"{API}/servers/mine/discover/", {"issuer": UPSTREAM, "apply": True}, format="json")
        body = response.json()
        assert response.status_code == 200, body
        assert body["server"]["token_endpoint"] == f"{UPSTREAM}/oauth2/token"
        assert set(body["applied"]) == {"issuer", "token_endpoint", "revocation_endpoint",
                                        "token_endpoint_auth_methods_supported"}
        no_secret(response)

    def test_discover_without_any_issuer_is_400(self, alice, world):
        response = api_as(alice).post(f"{API}/servers/mine/discover/", {}, format="json")
        assert response.status_code == 400 and "issuer" in response.json()

    def test_connection_check(self, alice, world, upstream):
        upstream.get(f"{UPSTREAM}/authorize", status=200, body="<html>login</html>")
        upstream.post(f"{UPSTREAM}/token", status=401, json={"error": "invalid_client"})
        response = api_as(alice).post(f"{API}/servers/mine/check/")
        assert response.status_code == 200
        body = response.json()
        assert body["ok"] is False
        assert body["callback_url"] == "https://proxy.example.test/oauth/mine/callback"
        results = {r["name"]: r for r in body["results"]}
        assert results["Client credential at the token endpoint"]["status"] == "error"
        assert results["Authorization endpoint"]["status"] == "ok"
        no_secret(response)


# -- clients and sessions ------------------------------------------------------------------------

@pytest.mark.django_db
class TestClientsAndSessions:
    def test_client_listing_shows_registration_redirects_sessions_and_quota(self, alice, world):
        body = api_as(alice).get(f"{API}/clients/").json()["results"][0]
        assert body["registration_source"] == "dcr"
        assert body["redirect_uris"] == ["http://127.0.0.1:33418/callback"]
        assert body["active_sessions"] == 1
        assert body["verified_domain"] is None
        assert [w["window"] for w in body["quota"]] == ["minute", "day"]
        assert body["quota"][0]["limit"] == 120
        assert "client_secret" not in body

    def test_disable_and_enable_are_audited(self, alice, world):
        api, client = api_as(alice), world["mine"]["client"]
        response = api.post(f"{API}/clients/{client.pk}/disable/")
        assert response.status_code == 200 and response.json()["disabled"] is True
        assert api.get(f"{API}/clients/?disabled=true").json()["count"] == 1
        api.post(f"{API}/clients/{client.pk}/enable/")
        messages = list(AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE, actor=alice)
                        .order_by("created", "pk").values_list("message", flat=True))
        assert messages == ["client disabled", "client enabled"]

    def test_delete_a_client(self, alice, world, upstream):
        client = world["mine"]["client"]
        assert api_as(alice).delete(f"{API}/clients/{client.pk}/").status_code == 204
        assert not Client.objects.filter(pk=client.pk).exists()
        assert AuditEvent.objects.get(kind=AuditEvent.Kind.CLIENT_DELETED).detail["client_id"] == client.client_id

    def test_sessions_list_filters_and_never_shows_tokens(self, alice, world):
        session = world["mine"]["session"]
        response = api_as(alice).get(f"{API}/sessions/?active=true&subject=user-of-mine")
        body = response.json()["results"][0]
        assert body["id"] == str(session.pk)
        assert body["client"]["client_id"] == session.client.client_id
        assert body["expires_at"] is not None and body["active"] is True
        text = response.content.decode()
        assert session.access_token not in text and session.refresh_token not in text
        assert api_as(alice).get(f"{API}/sessions/?active=false").json()["count"] == 0

    def test_revoke_one_session(self, alice, world, upstream):
        session = world["mine"]["session"]
        response = api_as(alice).post(f"{API}/sessions/{session.pk}/revoke/", {"reason": "lost laptop"},
                                      format="json")
        assert response.status_code == 200
        assert response.json()["active"] is False and response.json()["revoked_reason"] == "lost laptop"
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.SESSION_REVOKED)
        assert event.actor == alice and event.message == "lost laptop"

    def test_bulk_revoke_by_client_subject_and_server(self, alice, world, upstream):
        server, client = world["mine"]["server"], world["mine"]["client"]
        make_upstream_session(server, client, subject="carol")
        other = make_client(server, name="other")
        make_upstream_session(server, other, subject="carol")
        api = api_as(alice)
        assert api.post(f"{API}/sessions/revoke/", {}, format="json").status_code == 400
        assert api.post(f"{API}/sessions/revoke/", {"subject": "carol", "client": other.pk},
                        format="json").json() == {"revoked": 1}
        assert api.post(f"{API}/clients/{client.pk}/revoke-sessions/", {}, format="json").json() == {"revoked": 2}
        make_upstream_session(server, other, subject="dave")
        assert api.post(f"{API}/servers/mine/revoke-sessions/", {}, format="json").json() == {"revoked": 1}
        assert not UpstreamSession.objects.filter(server=server, revoked_at__isnull=True).exists()


# -- audit ---------------------------------------------------------------------------------------

@pytest.mark.django_db
class TestAuditEvents:
    def test_filter_by_kind_and_time(self, alice, world):
        api = api_as(alice)
        audit_record(kind=AuditEvent.Kind.TOKEN_ISSUED, server=world["mine"]["server"], subject="s")
        kinds = [e["kind"] for e in api.get(f"{API}/audit-events/?kind=token.issued").json()["results"]]
        assert kinds == ["token.issued"]
        both = api.get(f"{API}/audit-events/?kind=token.issued&kind=consent.given").json()["count"]
        assert both == 2
        future = (timezone.now() + timedelta(hours=1)).isoformat()
        assert api.get(f"{API}/audit-events/", {"created_after": future}).json()["count"] == 0
        assert api.get(f"{API}/audit-events/?kind=nonsense").status_code == 400
        assert api.get(f"{API}/audit-events/?created_after=yesterday").status_code == 400

    def test_event_detail_names_the_client_and_actor(self, alice, world):
        api = api_as(alice)
        api.post(f"{API}/clients/{world['mine']['client'].pk}/disable/")
        event = api.get(f"{API}/audit-events/?kind=admin.change").json()["results"][0]
        assert event["actor"] == "alice" and event["client_id"] == world["mine"]["client"].client_id


# -- tokens and pagination -----------------------------------------------------------------------

@pytest.mark.django_db
class TestTokensAndPagination:
    def test_a_logged_in_user_creates_a_token_shown_once(self, alice):
        session = APIClient()
        session.force_login(alice)
        response = session.post(f"{API}/tokens/", {"expires_in_days": 30}, format="json")
        assert response.status_code == 201
        token = response.json()["token"]
        assert response["Cache-Control"] == "no-store"
        listed = session.get(f"{API}/tokens/").json()["results"]
        assert len(listed) == 1 and "token" not in listed[0] and token.startswith(listed[0]["prefix"])
        automation = APIClient()
        automation.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        assert automation.get(f"{API}/tokens/").status_code == 200
        # a token cannot mint tokens
        assert automation.post(f"{API}/tokens/", {}, format="json").status_code == 403
        assert session.delete(f"{API}/tokens/{listed[0]['id']}/").status_code == 204
        assert automation.get(f"{API}/tokens/").status_code == 401

    def test_expiry_is_bounded(self, alice):
        session = APIClient()
        session.force_login(alice)
        assert session.post(f"{API}/tokens/", {"expires_in_days": 10000}, format="json").status_code == 400

    def test_pagination_and_absurd_offsets(self, root, world):
        api = api_as(root)
        page = api.get(f"{API}/servers/?limit=1").json()
        assert page["count"] == 2 and len(page["results"]) == 1 and page["next"]
        assert api.get(f"{API}/servers/?offset=99999999999999999999999").status_code == 200
        assert api.get(f"{API}/servers/?limit=-1&offset=-5").status_code == 200


@pytest.mark.django_db
def test_schema_and_docs_are_served(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = json.loads(schema.content)["paths"]
    assert "/api/v1/servers/" in paths and all(p.startswith("/api/v1/") for p in paths)
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert "swagger-ui" in docs.content.decode() and "cdn" not in docs.content.decode().lower()


@pytest.mark.django_db
def test_an_out_of_range_client_filter_is_a_400_on_every_database(alice):
    response = api_as(alice).get(f"{API}/sessions/", {"client": str(2**70)})
    assert response.status_code == 400
