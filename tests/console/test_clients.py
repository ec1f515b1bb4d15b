"""Operator actions on a registered client (``console/clients.py``): disable, enable and rename are audited admin
changes; deleting a client revokes its sessions (upstream tokens first) and keeps the history."""

from urllib.parse import parse_qs

import pytest

from oauthproxy.console.clients import client_delete, client_update
from oauthproxy.models import AuditEvent, Client
from tests.conftest import UPSTREAM
from tests.factories import make_client, make_upstream_session

REVOKE_URL = f"{UPSTREAM}/revoke"


@pytest.fixture
def world(server_factory):
    """A server whose upstream revokes tokens, client A with two users' sessions and client B with one."""
    crm = server_factory(slug="crm", revocation_endpoint=REVOKE_URL)
    cli_a, cli_b = make_client(crm, name="A"), make_client(crm, name="B")
    for subject, client in (("alice", cli_a), ("bob", cli_a), ("alice", cli_b)):
        make_upstream_session(crm, client, subject=subject, access_token=f"at-{subject}-{client.name}",
                              refresh_token=f"rt-{subject}-{client.name}")
    return {"crm": crm, "a": cli_a, "b": cli_b}


def revoked_upstream_tokens(mock) -> list[str]:
    return [parse_qs(call.request.body)["token"][0] for call in mock.calls if call.request.url == REVOKE_URL]


@pytest.mark.django_db
class TestClients:
    def test_disable_and_enable_are_audited_admin_changes(self, world, operator):
        client = world["a"]
        assert client_update(client=client, actor=operator, disabled=True) == ["disabled"]
        assert Client.objects.get(pk=client.pk).disabled
        assert client_update(client=client, actor=operator, disabled=True) == []  # no change, no event
        client_update(client=client, actor=operator, disabled=False)
        events = list(AuditEvent.objects.filter(kind=AuditEvent.Kind.ADMIN_CHANGE).order_by("created", "pk"))
        assert [e.message for e in events] == ["client disabled", "client enabled"]
        assert events[0].actor == operator and events[0].client == client
        assert events[0].detail["changes"] == {"disabled": {"from": False, "to": True}}

    def test_rename_is_audited(self, world, operator):
        client_update(client=world["a"], actor=operator, name="Renamed")
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE)
        assert event.detail["changes"] == {"name": {"from": "A", "to": "Renamed"}}

    def test_delete_revokes_its_sessions_upstream_first_and_keeps_the_history(self, world, operator, upstream):
        upstream.post(REVOKE_URL, status=200)
        client = world["a"]
        client_id = client.client_id
        assert client_delete(client=client, actor=operator) == 2
        assert not Client.objects.filter(client_id=client_id).exists()
        assert sorted(revoked_upstream_tokens(upstream)) == ["at-alice-A", "at-bob-A", "rt-alice-A", "rt-bob-A"]
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CLIENT_DELETED)
        assert event.actor == operator and event.server == world["crm"]
        assert event.client is None  # the row is gone; the event names it
        assert event.detail == {"client_id": client_id, "name": "A", "sessions_revoked": 2}
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED).count() == 2
