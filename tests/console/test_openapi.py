"""The management API against its own OpenAPI document (/api/schema/), with schemathesis.

Every operation is called with generated input, valid and invalid, as a team member and as a superuser:
no answer may be a server error, and every answer must match the document (status codes, content types
and bodies). Upstream HTTP is mocked out by ``responses`` (nothing registered: the upstream is down),
so discovery and connection checks run their failure paths.
"""

from datetime import timedelta

import pytest
import responses
import schemathesis
from django.contrib.auth.models import Group, User
from django.core import signals
from django.core.cache import cache
from django.core.management import call_command
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from knox.models import AuthToken
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from oauthproxy.core.audit import audit_record
from oauthproxy.models import AuditEvent
from tests.conftest import make_server
from tests.factories import make_client, make_upstream_session

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _load_schema():
    """The document as served, loaded through the WSGI app (the calls go through it too). Building it
    needs no database."""
    from proxy_site.wsgi import application

    return schemathesis.openapi.from_wsgi("/api/schema/", application)


schema = _load_schema()


@pytest.fixture(autouse=True)
def keep_test_connection():
    """Like Django's test client, keep the test's database connection (and its transaction) open across
    the requests that go through the WSGI app."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def populated(db):
    """Two teams' servers with clients, sessions and audit events, so lists and details have content."""
    cache.clear()
    for name in ("team-a", "team-b"):
        call_command("team_create", name, verbosity=0)
    for slug, team in (("mine", "team-a"), ("theirs", "team-b")):
        server = make_server(slug=slug, team=Group.objects.get(name=team), issuer="https://idp.example.com")
        client = make_client(server)
        make_upstream_session(server, client, subject=f"user-of-{slug}")
        audit_record(kind=AuditEvent.Kind.TOKEN_ISSUED, server=server, client=client, subject="x",
                     detail={"note": "example"})


@pytest.fixture
def upstream_down():
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        yield


def token_for(user: User) -> dict:
    _instance, token = AuthToken.objects.create(user=user, expiry=timedelta(hours=1))
    return {"Authorization": f"Token {token}"}


@pytest.fixture
def member_headers(populated):
    user = User.objects.create_user("alice", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="team-a"))
    return token_for(user)


@pytest.fixture
def superuser_headers(populated):
    return token_for(User.objects.create_superuser("root", password="pw"))


EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@schema.parametrize()
@EXAMPLES
def test_team_member_calls_conform(case, member_headers, upstream_down):
    case.call_and_validate(headers=member_headers, checks=CHECKS)


@schema.parametrize()
@settings(EXAMPLES, max_examples=8)
def test_superuser_calls_conform(case, superuser_headers, upstream_down):
    case.call_and_validate(headers=superuser_headers, checks=CHECKS)


@schema.parametrize()
@settings(EXAMPLES, max_examples=3)
def test_anonymous_calls_are_refused_as_documented(case, populated, upstream_down):
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code in (400, 401, 404)
