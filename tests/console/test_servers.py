"""Saving and deleting servers as the admin, the API and imports do (``console/servers.py``): audited with old
and new values, never with the secret; a deletion revokes the server's sessions first."""

import json

import pytest
from django.contrib.auth.models import Group

from oauthproxy.console.servers import server_delete, server_save
from oauthproxy.models import AuditEvent, McpServer, UpstreamSession
from tests.conftest import UPSTREAM
from tests.factories import make_client, make_upstream_session

SECRET = "upstream-secret-value-123"  # the conftest server's client secret


@pytest.mark.django_db
class TestServerSave:
    def test_secret_changes_are_audited_without_the_secret(self, server, operator):
        server.client_secret = "a-brand-new-secret-456"
        server.name = "CRM 2"
        assert server_save(server=server, actor=operator) == ["name", "client_secret"]
        event = AuditEvent.objects.get()
        assert event.message == "server crm: name, client_secret changed"
        assert event.detail["changes"]["client_secret"] == "changed"
        text = json.dumps(event.detail) + event.message
        assert "a-brand-new-secret-456" not in text and SECRET not in text

    def test_team_changes_name_the_team_and_no_change_records_nothing(self, server, operator):
        server.team = Group.objects.create(name="team-a")
        server_save(server=server, actor=operator)
        assert AuditEvent.objects.get().detail["changes"]["team"] == {"from": None, "to": "team-a"}
        assert server_save(server=server, actor=operator) == []
        assert AuditEvent.objects.count() == 1

    def test_creation_is_audited(self, operator, db):
        server = McpServer(slug="new", name="New", authorization_endpoint=f"{UPSTREAM}/a",
                           token_endpoint=f"{UPSTREAM}/t", client_id="c", client_secret="s3cr3t-value")
        server.full_clean()
        server_save(server=server, actor=operator)
        event = AuditEvent.objects.get()
        assert (event.kind, event.message, event.detail["action"]) == ("admin.change", "server new created",
                                                                      "created")
        assert "s3cr3t-value" not in json.dumps(event.detail)

    def test_delete_revokes_sessions_first(self, server, operator, upstream):
        session = make_upstream_session(server, make_client(server))
        assert server_delete(server=server, actor=operator) == 1
        assert not McpServer.objects.exists() and not UpstreamSession.objects.filter(pk=session.pk).exists()
        kinds = sorted(AuditEvent.objects.values_list("kind", flat=True))
        assert kinds == ["admin.change", "session.revoked"]
        assert AuditEvent.objects.get(kind="admin.change").detail["slug"] == "crm"
