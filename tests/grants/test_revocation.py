"""Operator revocation: one session, all of a client, a user (subject) or a server (clients disabled or deleted:
tests/console/test_clients.py)."""

import hashlib
import secrets
from datetime import timedelta
from urllib.parse import parse_qs

import pytest
import responses
from django.utils import timezone

from oauthproxy.grants.revocation import SessionFilterError, server_sessions_revoke, sessions_revoke
from oauthproxy.models import AccessToken, AuditEvent, Client, RefreshToken, UpstreamSession
from tests.conftest import UPSTREAM
from tests.factories import make_client, make_upstream_session

REVOKE_URL = f"{UPSTREAM}/revoke"


def proxy_tokens(session: UpstreamSession) -> tuple[AccessToken, RefreshToken]:
    """A proxy access and refresh token of *session*, as the token endpoint stores them (hashed)."""
    raw = secrets.token_urlsafe(16)
    access = AccessToken.objects.create(
        application=session.client, token=hashlib.sha256(raw.encode()).hexdigest(), scope="",
        expires=timezone.now() + timedelta(hours=1), upstream_session=session,
    )
    refresh = RefreshToken.objects.create(
        application=session.client, token=hashlib.sha256((raw + "r").encode()).hexdigest(),
        access_token=access, upstream_session=session,
    )
    return access, refresh


@pytest.fixture
def world(server_factory):
    """Two servers (one with an upstream revocation endpoint), two clients, three users."""
    crm = server_factory(slug="crm", revocation_endpoint=REVOKE_URL)
    wiki = server_factory(slug="wiki")
    cli_a, cli_b = make_client(crm, name="A"), make_client(crm, name="B")
    cli_wiki = make_client(wiki, name="W")
    sessions = {
        "alice@a": make_upstream_session(crm, cli_a, subject="alice", access_token="at-alice-a",
                                         refresh_token="rt-alice-a"),
        "bob@a": make_upstream_session(crm, cli_a, subject="bob", access_token="at-bob-a", refresh_token="rt-bob-a"),
        "alice@b": make_upstream_session(crm, cli_b, subject="alice", access_token="at-alice-b",
                                         refresh_token="rt-alice-b"),
        "alice@wiki": make_upstream_session(wiki, cli_wiki, subject="alice"),
    }
    return {"crm": crm, "wiki": wiki, "a": cli_a, "b": cli_b, "w": cli_wiki, "sessions": sessions}


def active_keys(world) -> set[str]:
    return {key for key, s in world["sessions"].items() if UpstreamSession.objects.get(pk=s.pk).revoked_at is None}


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(REVOKE_URL, status=200)
        yield mock


def revoked_upstream_tokens(mock) -> list[tuple[str, str]]:
    out = []
    for call in mock.calls:
        if call.request.url == REVOKE_URL:
            body = parse_qs(call.request.body)
            out.append((body["token"][0], body["token_type_hint"][0]))
    return out


@pytest.mark.django_db
class TestSessionsRevoke:
    def test_all_of_a_client_cascades_to_proxy_and_upstream_tokens(self, world, operator, upstream):
        access, refresh = proxy_tokens(world["sessions"]["alice@a"])
        count = sessions_revoke(queryset_or_filters={"client": world["a"]}, actor=operator, reason="client leaked")
        assert count == 2
        assert active_keys(world) == {"alice@b", "alice@wiki"}
        assert not AccessToken.objects.filter(pk=access.pk).exists()
        assert RefreshToken.objects.get(pk=refresh.pk).revoked is not None
        assert sorted(revoked_upstream_tokens(upstream)) == sorted([
            ("rt-alice-a", "refresh_token"), ("at-alice-a", "access_token"),
            ("rt-bob-a", "refresh_token"), ("at-bob-a", "access_token"),
        ])
        session = UpstreamSession.objects.get(pk=world["sessions"]["bob@a"].pk)
        assert session.revoked_reason == "client leaked"

    def test_all_of_a_user_across_clients_and_servers(self, world, operator, upstream):
        assert sessions_revoke(queryset_or_filters={"subject": "alice"}, actor=operator, reason="left") == 3
        assert active_keys(world) == {"bob@a"}

    def test_a_user_at_one_server(self, world, operator, upstream):
        count = sessions_revoke(queryset_or_filters={"subject": "alice", "server": world["wiki"]}, actor=operator,
                                reason="r")
        assert count == 1
        assert active_keys(world) == {"alice@a", "bob@a", "alice@b"}

    def test_all_of_a_server(self, world, operator, upstream):
        assert server_sessions_revoke(server=world["crm"], actor=operator) == 3
        assert active_keys(world) == {"alice@wiki"}

    def test_a_queryset_and_already_revoked_sessions_are_not_counted_twice(self, world, operator, upstream):
        queryset = UpstreamSession.objects.filter(pk=world["sessions"]["bob@a"].pk)
        assert sessions_revoke(queryset_or_filters=queryset, actor=operator, reason="r") == 1
        assert sessions_revoke(queryset_or_filters=queryset, actor=operator, reason="r") == 0

    def test_each_revocation_is_audited_with_its_actor(self, world, operator, upstream):
        sessions_revoke(queryset_or_filters={"client": world["a"]}, actor=operator, reason="client leaked")
        events = AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED).order_by("subject")
        assert [(e.subject, e.client_id, e.actor, e.message) for e in events] == [
            ("alice", world["a"].pk, operator, "client leaked"),
            ("bob", world["a"].pk, operator, "client leaked"),
        ]
        for event in events:
            assert "at-" not in str(event.detail) and "rt-" not in str(event.detail)

    def test_a_failing_upstream_does_not_stop_the_proxy_side_revocation(self, world, operator):
        with responses.RequestsMock() as mock:
            mock.post(REVOKE_URL, status=503)
            mock.post(REVOKE_URL, status=503)
            assert sessions_revoke(queryset_or_filters={"subject": "bob"}, actor=operator, reason="r") == 1
        assert "bob@a" not in active_keys(world)

    @pytest.mark.parametrize("filters", [{}, {"subject": ""}, {"server": None}])
    def test_revoking_everything_by_accident_is_refused(self, world, operator, filters):
        with pytest.raises(SessionFilterError):
            sessions_revoke(queryset_or_filters=filters, actor=operator, reason="r")
        assert len(active_keys(world)) == 4

    def test_unknown_filters_are_refused(self, world, operator):
        with pytest.raises(SessionFilterError, match="unknown filter"):
            sessions_revoke(queryset_or_filters={"user": "alice"}, actor=operator, reason="r")
        with pytest.raises(SessionFilterError):
            sessions_revoke(queryset_or_filters=Client.objects.all(), actor=operator, reason="r")
