"""The operator's console in the admin: team isolation (404), discovery, connection check, clients,
sessions, revocation, quotas, the audit log and the team_create command."""

import json

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.core.cache import cache
from django.core.management import CommandError, call_command

from oauthproxy.core.audit import audit_record
from oauthproxy.grants.quotas import quota_consume
from oauthproxy.models import AuditEvent, Client, McpServer, UpstreamSession
from tests.conftest import UPSTREAM, make_server
from tests.console.test_admin import form_data
from tests.factories import make_client, make_upstream_session

SECRET = "upstream-secret-value-123"
ADMIN = "/admin/oauthproxy"


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()


@pytest.fixture
def teams(db):
    call_command("team_create", "team-a", verbosity=0)
    call_command("team_create", "team-b", verbosity=0)
    return Group.objects.get(name="team-a"), Group.objects.get(name="team-b")


@pytest.fixture
def world(teams):
    out = {}
    for key, team in (("mine", teams[0]), ("theirs", teams[1])):
        server = make_server(slug=key, name=f"{key.title()} server", team=team)
        client = make_client(server, name=f"{key} client")
        session = make_upstream_session(server, client, subject=f"user-of-{key}")
        event = audit_record(kind=AuditEvent.Kind.CONSENT_GIVEN, server=server, client=client,
                             subject=f"user-of-{key}", message=f"{key} consent")
        out[key] = {"server": server, "client": client, "session": session, "event": event}
    return out


@pytest.fixture
def member(client, teams):
    user = User.objects.create_user("alice", password="pw", is_staff=True)
    user.groups.add(teams[0])
    client.force_login(user)
    client.user = user
    return client


@pytest.fixture
def root(client, db):
    user = User.objects.create_superuser("root", password="pw")
    client.force_login(user)
    client.user = user
    return client


def page(response) -> str:
    return response.content.decode()


# -- team isolation ------------------------------------------------------------------------------

@pytest.mark.django_db
class TestTeamIsolation:
    def test_lists_and_their_filters_show_only_the_team(self, member, world):
        for path in ("mcpserver", "client", "upstreamsession", "auditevent"):
            body = page(member.get(f"{ADMIN}/{path}/"))
            assert "Theirs server" not in body and "theirs client" not in body and "user-of-theirs" not in body, path
        assert "mine client" in page(member.get(f"{ADMIN}/client/"))
        assert "user-of-mine" in page(member.get(f"{ADMIN}/upstreamsession/"))
        assert "mine consent" in page(member.get(f"{ADMIN}/auditevent/"))

    @pytest.mark.parametrize("path", [
        "mcpserver/{server}/change/",
        "mcpserver/{server}/delete/",
        "mcpserver/{server}/history/",
        "mcpserver/{server}/check/",
        "mcpserver/{server}/discover/",
        "mcpserver/{server}/revoke-sessions/",
        "client/{client}/change/",
        "client/{client}/delete/",
        "client/{client}/revoke-sessions/",
        "upstreamsession/{session}/change/",
        "upstreamsession/{session}/revoke/",
        "upstreamsession/{session}/revoke-subject/",
        "auditevent/{event}/change/",
    ])
    def test_another_teams_objects_are_404_for_get_and_post(self, member, world, upstream, path):
        theirs = world["theirs"]
        url = f"{ADMIN}/" + path.format(server=theirs["server"].pk, client=theirs["client"].pk,
                                        session=theirs["session"].pk, event=theirs["event"].pk)
        assert member.get(url).status_code == 404
        # The audit log is read-only for everyone: a POST is refused before any lookup, as for a missing event.
        expected = 403 if path.startswith("auditevent") else 404
        response = member.post(url, {"confirm": "yes", "post": "yes", "issuer": UPSTREAM, "name": "x"})
        assert response.status_code == expected
        assert McpServer.objects.filter(pk=theirs["server"].pk).exists()
        assert Client.objects.filter(pk=theirs["client"].pk, name="theirs client").exists()
        assert UpstreamSession.objects.get(pk=theirs["session"].pk).revoked_at is None
        assert len(upstream.calls) == 0

    def test_changelist_actions_ignore_other_teams_ids(self, member, world, upstream):
        theirs = world["theirs"]["session"]
        response = member.post(f"{ADMIN}/upstreamsession/", {
            "action": "revoke_sessions", "_selected_action": [str(theirs.pk)], "confirm": "yes",
        })
        assert response.status_code in (200, 302)
        assert UpstreamSession.objects.get(pk=theirs.pk).revoked_at is None

    @pytest.mark.parametrize("field,value", [
        ("extra_authorize_params", '{"a\\u0000": "x"}'),
        ("extra_authorize_params", '{"a": "x\\u0000"}'),
        ("scopes", '["open\\u0000id"]'),
    ])
    def test_values_postgres_cannot_store_are_form_errors_not_500s(self, member, world, field, value):
        server = world["mine"]["server"]
        data = form_data(slug="mine", team=str(server.team_id), **{field: value})
        response = member.post(f"{ADMIN}/mcpserver/{server.pk}/change/", data)
        assert response.status_code == 200 and "Remove the NUL" in page(response)

    def test_a_member_can_only_pick_their_own_team(self, member, world):
        body = page(member.get(f"{ADMIN}/mcpserver/add/"))
        assert "team-a" in body and "team-b" not in body
        data = form_data(slug="new", team=str(Group.objects.get(name="team-b").pk))
        response = member.post(f"{ADMIN}/mcpserver/add/", data)
        assert response.status_code == 200 and not McpServer.objects.filter(slug="new").exists()


# -- audited changes -----------------------------------------------------------------------------

@pytest.mark.django_db
class TestAuditedChanges:
    def test_server_changes_are_audited_with_fields_but_never_the_secret(self, member, world):
        server = world["mine"]["server"]
        data = form_data(slug="mine", name="Renamed", team=str(server.team_id), client_secret="rotated-secret-xyz")
        response = member.post(f"{ADMIN}/mcpserver/{server.pk}/change/", data)
        assert response.status_code == 302, page(response)[:3000]
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE, server=server)
        assert event.actor == member.user
        assert "client_secret changed" in event.message and "name" in event.detail["fields"]
        assert event.detail["changes"]["name"] == {"from": "Mine server", "to": "Renamed"}
        assert event.detail["changes"]["client_secret"] == "changed"
        detail_page = page(member.get(f"{ADMIN}/auditevent/{event.pk}/change/"))
        assert "Renamed" in detail_page
        for text in (json.dumps(event.detail), event.message, detail_page):
            assert "rotated-secret-xyz" not in text and SECRET not in text

    def test_server_added_in_the_admin_is_audited(self, member, world):
        response = member.post(f"{ADMIN}/mcpserver/add/", form_data(slug="new", team=str(world["mine"]["server"]
                                                                                        .team_id)))
        assert response.status_code == 302
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE, server__slug="new")
        assert event.detail["action"] == "created" and event.actor == member.user

    def test_server_deleted_in_the_admin_revokes_its_sessions(self, member, world, upstream):
        server = world["mine"]["server"]
        response = member.post(f"{ADMIN}/mcpserver/{server.pk}/delete/", {"post": "yes"})
        assert response.status_code == 302
        assert not McpServer.objects.filter(pk=server.pk).exists()
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED, actor=member.user).count() == 1
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE, detail__action="deleted").exists()

    def test_client_disabled_in_its_form_is_audited(self, member, world):
        client = world["mine"]["client"]
        response = member.post(f"{ADMIN}/client/{client.pk}/change/", {"name": client.name, "disabled": "on"})
        assert response.status_code == 302, page(response)[:3000]
        assert Client.objects.get(pk=client.pk).disabled
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE)
        assert event.message == "client disabled" and event.actor == member.user

    def test_client_deleted_in_the_admin_revokes_and_is_audited(self, member, world, upstream):
        client = world["mine"]["client"]
        response = member.post(f"{ADMIN}/client/{client.pk}/delete/", {"post": "yes"})
        assert response.status_code == 302
        assert not Client.objects.filter(pk=client.pk).exists()
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CLIENT_DELETED)
        assert event.detail["client_id"] == client.client_id and event.detail["sessions_revoked"] == 1

    def test_audit_events_are_read_only_and_filterable(self, member, world):
        event = world["mine"]["event"]
        body = page(member.get(f"{ADMIN}/auditevent/{event.pk}/change/"))
        assert "mine consent" in body and 'name="_save"' not in body
        assert member.get(f"{ADMIN}/auditevent/add/").status_code == 403
        audit_record(kind=AuditEvent.Kind.TOKEN_ISSUED, server=world["mine"]["server"], message="issued one")
        body = page(member.get(f"{ADMIN}/auditevent/?kind__exact=token.issued"))
        assert "issued one" in body and "mine consent" not in body


# -- clients, sessions, quotas -------------------------------------------------------------------

@pytest.mark.django_db
class TestClientsAndSessions:
    def test_client_page_shows_registration_redirects_sessions_and_quota(self, member, world):
        client = world["mine"]["client"]
        quota_consume(client=client, operation="authorize")
        quota_consume(client=client, operation="refresh")
        listing = page(member.get(f"{ADMIN}/client/"))
        assert "2/120 this minute" in listing and "2/20000 this day" in listing
        body = page(member.get(f"{ADMIN}/client/{client.pk}/change/"))
        assert "Dynamic Client Registration" in body
        assert "http://127.0.0.1:33418/callback" in body
        assert "1 active" in body
        assert "authorize 1, refresh 1" in body
        assert "Revoke all sessions" in body

    def test_disable_and_enable_actions(self, member, world):
        client = world["mine"]["client"]
        member.post(f"{ADMIN}/client/", {"action": "disable_clients", "_selected_action": [client.pk]})
        assert Client.objects.get(pk=client.pk).disabled
        member.post(f"{ADMIN}/client/", {"action": "enable_clients", "_selected_action": [client.pk]})
        assert not Client.objects.get(pk=client.pk).disabled
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE).count() == 2

    def test_revoke_one_session_after_confirmation(self, member, world, upstream):
        session = world["mine"]["session"]
        confirm = member.get(f"{ADMIN}/upstreamsession/{session.pk}/revoke/")
        assert "This revokes 1 active session" in page(confirm)
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is None
        response = member.post(f"{ADMIN}/upstreamsession/{session.pk}/revoke/",
                               {"confirm": "yes", "reason": "lost laptop"})
        assert response.status_code == 302
        session.refresh_from_db()
        assert session.revoked_at is not None and session.revoked_reason == "lost laptop"
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.SESSION_REVOKED)
        assert event.actor == member.user

    def test_revoke_all_of_a_user_a_client_and_a_server(self, member, world, upstream):
        server, client = world["mine"]["server"], world["mine"]["client"]
        second = make_upstream_session(server, make_client(server, name="other"), subject="user-of-mine")
        third = make_upstream_session(server, client, subject="carol")
        session = world["mine"]["session"]
        member.post(f"{ADMIN}/upstreamsession/{session.pk}/revoke-subject/", {"confirm": "yes"})
        assert UpstreamSession.objects.get(pk=second.pk).revoked_at is not None
        assert UpstreamSession.objects.get(pk=third.pk).revoked_at is None
        member.post(f"{ADMIN}/client/{client.pk}/revoke-sessions/", {"confirm": "yes"})
        assert UpstreamSession.objects.get(pk=third.pk).revoked_at is not None
        fourth = make_upstream_session(server, client, subject="dave")
        assert "This revokes 1 active session" in page(member.get(f"{ADMIN}/mcpserver/{server.pk}/revoke-sessions/"))
        member.post(f"{ADMIN}/mcpserver/{server.pk}/revoke-sessions/", {"confirm": "yes"})
        assert UpstreamSession.objects.get(pk=fourth.pk).revoked_at is not None
        assert UpstreamSession.objects.get(pk=world["theirs"]["session"].pk).revoked_at is None

    def test_revoke_action_asks_then_revokes(self, member, world, upstream):
        session = world["mine"]["session"]
        first = member.post(f"{ADMIN}/upstreamsession/", {
            "action": "revoke_sessions", "_selected_action": [str(session.pk)], "index": "0"})
        assert first.status_code == 200 and "Yes, revoke" in page(first)
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is None
        second = member.post(f"{ADMIN}/upstreamsession/", {
            "action": "revoke_sessions", "_selected_action": [str(session.pk)], "confirm": "yes"})
        assert second.status_code == 302
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is not None
        assert "Active" in page(member.get(f"{ADMIN}/upstreamsession/?active=no"))

    def test_members_without_the_session_permission_cannot_revoke(self, client, db):
        viewers = Group.objects.create(name="viewers")
        viewers.permissions.set(Permission.objects.filter(codename__in=["view_upstreamsession"]))
        server = make_server(slug="watched", team=viewers)
        session = make_upstream_session(server, make_client(server))
        user = User.objects.create_user("viewer", password="pw", is_staff=True)
        user.groups.add(viewers)
        client.force_login(user)
        assert client.get(f"{ADMIN}/upstreamsession/{session.pk}/change/").status_code == 200
        assert client.post(f"{ADMIN}/upstreamsession/{session.pk}/revoke/", {"confirm": "yes"}).status_code == 403


# -- discovery and connection check --------------------------------------------------------------

def metadata(**overrides) -> dict:
    return {
        "issuer": UPSTREAM,
        "authorization_endpoint": f"{UPSTREAM}/authorize",
        "token_endpoint": f"{UPSTREAM}/v1/token",
        "revocation_endpoint": f"{UPSTREAM}/v1/revoke",
        "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "email", "profile"],
        **overrides,
    }


@pytest.mark.django_db
class TestDiscoveryAndCheck:
    def test_discover_shows_what_was_found_and_applies_the_chosen_values(self, member, world, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=metadata())
        server = world["mine"]["server"]
        url = f"{ADMIN}/mcpserver/{server.pk}/discover/"
        assert "Discover from issuer" in page(member.get(f"{ADMIN}/mcpserver/{server.pk}/change/"))
        shown = page(member.post(url, {"issuer": UPSTREAM}))
        assert f"{UPSTREAM}/.well-known/oauth-authorization-server" in shown
        assert f"{UPSTREAM}/v1/token" in shown and f"{UPSTREAM}/token" in shown  # found and current
        assert "Apply the selected values" in shown
        assert McpServer.objects.get(pk=server.pk).token_endpoint == f"{UPSTREAM}/token"  # nothing saved yet
        response = member.post(url, {"issuer": UPSTREAM, "apply": "1",
                                     "fields": ["token_endpoint", "revocation_endpoint"]})
        assert response.status_code == 302
        server.refresh_from_db()
        assert server.token_endpoint == f"{UPSTREAM}/v1/token"
        assert server.revocation_endpoint == f"{UPSTREAM}/v1/revoke"
        assert server.issuer == ""  # not chosen
        assert AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE).message.startswith("discovery applied")

    def test_discover_failure_is_shown_on_the_form(self, member, world, upstream):
        server = world["mine"]["server"]
        body = page(member.post(f"{ADMIN}/mcpserver/{server.pk}/discover/", {"issuer": UPSTREAM}))
        assert "No metadata found" in body

    def test_discover_for_a_new_server_prefills_the_add_form(self, member, world, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=metadata())
        assert "Discover from issuer" in page(member.get(f"{ADMIN}/mcpserver/add/"))
        fields = ["issuer", "authorization_endpoint", "token_endpoint", "scopes", "use_pkce",
                  "token_endpoint_auth_methods_supported"]
        response = member.post(f"{ADMIN}/mcpserver/discover/", {"issuer": UPSTREAM, "apply": "1", "fields": fields})
        assert response.status_code == 302 and response["Location"].startswith(f"{ADMIN}/mcpserver/add/?")
        add_page = page(member.get(response["Location"]))
        assert f'value="{UPSTREAM}/v1/token"' in add_page
        assert 'value="openid email profile"' in add_page
        assert 'value="client_secret_basic"' in add_page

    def test_check_connection_shows_results_plainly(self, member, world, upstream):
        upstream.get(f"{UPSTREAM}/authorize", status=302, headers={"Location": f"{UPSTREAM}/login"})
        upstream.post(f"{UPSTREAM}/token", status=400, json={"error": "invalid_grant"})
        server = world["mine"]["server"]
        url = f"{ADMIN}/mcpserver/{server.pk}/check/"
        assert "Run the check" in page(member.get(url))
        assert len(upstream.calls) == 0  # GET runs nothing
        body = page(member.post(url))
        assert "accepted the client credential" in body
        assert "https://proxy.example.test/oauth/mine/callback" in body
        assert "Skipped" in body  # no issuer: no metadata comparison
        assert SECRET not in body

    def test_check_connection_action_for_selected_servers(self, root, world, upstream):
        upstream.post(f"{UPSTREAM}/token", status=401, json={"error": "invalid_client"})
        servers = [str(world["mine"]["server"].pk), str(world["theirs"]["server"].pk)]
        body = page(root.post(f"{ADMIN}/mcpserver/", {"action": "check_connection", "_selected_action": servers,
                                                      "index": "0"}))
        assert body.count("rejected the client credential") == 2
        assert "Mine server" in body and "Theirs server" in body


# -- team_create ---------------------------------------------------------------------------------

@pytest.mark.django_db
class TestTeamCreate:
    def test_creates_the_group_with_a_members_permissions_and_adds_members(self, capsys):
        user = User.objects.create_user("bob", password="pw")
        call_command("team_create", "data-team", "--member", "bob")
        group = Group.objects.get(name="data-team")
        codenames = set(group.permissions.values_list("codename", flat=True))
        assert {"view_mcpserver", "add_mcpserver", "change_mcpserver", "delete_mcpserver", "view_client",
                "add_client", "change_client", "delete_client", "view_upstreamsession", "change_upstreamsession",
                "view_auditevent"} <= codenames  # add_client: members pre-register clients
        assert "change_auditevent" not in codenames
        user.refresh_from_db()
        assert user.is_staff and group in user.groups.all()
        assert "Created team 'data-team'" in capsys.readouterr().out

    def test_running_it_again_is_harmless(self):
        call_command("team_create", "data-team", verbosity=0)
        call_command("team_create", "data-team", verbosity=0)
        assert Group.objects.filter(name="data-team").count() == 1

    def test_unknown_members_are_refused_and_nothing_is_created(self):
        with pytest.raises(CommandError, match="No user 'ghost'"):
            call_command("team_create", "x-team", "--member", "ghost")
        assert not Group.objects.filter(name="x-team").exists()

    def test_a_member_made_by_the_command_can_work_in_the_admin(self, client):
        User.objects.create_user("carol", password="pw")
        call_command("team_create", "ops", "--member", "carol", verbosity=0)
        client.force_login(User.objects.get(username="carol"))
        assert client.get(f"{ADMIN}/mcpserver/").status_code == 200
        response = client.post(f"{ADMIN}/mcpserver/add/", form_data(slug="opsy", team=str(
            Group.objects.get(name="ops").pk)))
        assert response.status_code == 302
        assert McpServer.objects.get(slug="opsy").team.name == "ops"
