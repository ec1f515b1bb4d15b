"""The identity claims kept on an upstream session for the identity assertion (email, name, groups)."""

import json

import pytest

from oauthproxy.grants.sessions import identity_claims_pick, upstream_session_claims
from oauthproxy.models import UpstreamSession
from tests.conftest import make_server


def test_email_name_and_groups_are_picked_and_bounded():
    picked = identity_claims_pick(
        server=object(),
        claims={"sub": "u1", "email": "a@example.com", "name": "A", "groups": ["eng", 7, {"x": 1}], "phone": "1"},
    )
    assert picked == {"email": "a@example.com", "name": "A", "groups": ["eng", "7"]}


def test_a_single_group_string_becomes_a_list_and_odd_types_are_dropped():
    assert identity_claims_pick(server=object(), claims={"groups": "eng", "email": 5}) == {"groups": ["eng"]}
    assert identity_claims_pick(server=object(), claims={}) == {}


class _Nested:
    groups_claim = "realm_access.roles"


def test_groups_follow_the_servers_groups_claim_path():
    claims = {"realm_access": {"roles": ["admin"]}, "groups": ["ignored"]}
    assert identity_claims_pick(server=_Nested(), claims=claims) == {"groups": ["admin"]}


@pytest.mark.django_db
def test_claims_are_stored_encrypted_on_the_session():
    from django.db import connection

    from tests.factories import make_client, make_upstream_session

    server = make_server()
    session = make_upstream_session(server, make_client(server))
    session.claims = json.dumps({"email": "a@example.com"})
    session.save()
    assert upstream_session_claims(UpstreamSession.objects.get(pk=session.pk)) == {"email": "a@example.com"}
    with connection.cursor() as cursor:
        cursor.execute("SELECT claims FROM oauthproxy_upstreamsession")
        (raw,) = cursor.fetchone()
    assert raw.startswith("enc:v1:") and "example.com" not in raw
