"""The user's claims the identity assertion carries (email, name, groups): the one store the access policies
use too (``UserClaims`` on the upstream session), completed from userinfo for the same user only, and
re-read at each upstream refresh of a server with identity assertions."""

import json
import secrets

import jwt
import pytest
import responses
from django.db import connection
from django.test import Client as HttpClient

from oauthproxy.grants.access import user_claims_from
from oauthproxy.grants.sessions import session_user, subject_learn
from oauthproxy.models import UpstreamSession
from oauthproxy.upstream.client import TokenSet
from tests.conftest import UPSTREAM, make_server
from tests.factories import issue_tokens, make_client, make_upstream_session, refresh

pytestmark = pytest.mark.django_db

USERINFO_URL = f"{UPSTREAM}/userinfo"


def id_token(**claims) -> str:
    """No issuer configured: the signature is not checked."""
    body = {"sub": "user-42", "aud": "proxy-client", "iat": 1, "exp": 4_000_000_000, **claims}
    return jwt.encode(body, secrets.token_hex(32), algorithm="HS256")


def test_the_name_is_kept_next_to_email_and_groups_and_bounded():
    user = user_claims_from(
        subject="u1", claims={"email": "A@Example.com", "name": "  Alice  " + "x" * 400, "groups": ["eng", 7]},
    )
    assert (user.email, user.groups) == ("a@example.com", ("eng", "7"))
    assert user.name.startswith("Alice") and len(user.name) == 255
    assert user_claims_from(subject="u1", claims={"name": {"given": "A"}}).name == ""


def test_stored_claims_carry_the_name_encrypted():
    server = make_server()
    session = make_upstream_session(server, make_client(server), subject="u1")
    session.claims = json.dumps(
        user_claims_from(subject="u1", claims={"email": "a@example.com", "name": "Alice Example"}).as_stored()
    )
    session.save()
    user = session_user(UpstreamSession.objects.get(pk=session.pk))
    assert (user.email, user.name, user.groups) == ("a@example.com", "Alice Example", ())
    with connection.cursor() as cursor:
        cursor.execute("SELECT claims FROM oauthproxy_upstreamsession")
        (raw,) = cursor.fetchone()
    assert raw.startswith("enc:v1:") and "Alice" not in raw and "example.com" not in raw


def test_with_identity_assertions_userinfo_completes_what_the_id_token_lacks(upstream):
    server = make_server(identity_assertion=True, userinfo_endpoint=USERINFO_URL)
    upstream.add(responses.GET, USERINFO_URL,
                 json={"sub": "user-42", "email": "alice@example.com", "name": "Alice", "groups": ["eng"]})

    subject = subject_learn(server=server, tokens=TokenSet(access_token="at", id_token=id_token(name="Al")))

    assert subject.value == "user-42"
    assert (subject.user.email, subject.user.name, subject.user.groups) == ("alice@example.com", "Al", ("eng",))


def test_userinfo_of_another_user_is_ignored(upstream):
    server = make_server(identity_assertion=True, userinfo_endpoint=USERINFO_URL)
    upstream.add(responses.GET, USERINFO_URL, json={"sub": "mallory", "email": "mallory@example.com", "name": "M"})

    subject = subject_learn(server=server, tokens=TokenSet(access_token="at", id_token=id_token()))

    assert (subject.user.email, subject.user.name) == ("", "")


def test_without_identity_assertions_or_policies_userinfo_is_not_asked(upstream):
    server = make_server(userinfo_endpoint=USERINFO_URL)

    subject = subject_learn(server=server, tokens=TokenSet(access_token="at", id_token=id_token()))

    assert subject.value == "user-42" and not upstream.calls


def test_an_upstream_refresh_updates_the_claims_the_assertion_carries(upstream):
    server = make_server(identity_assertion=True)
    client = make_client(server)
    http = HttpClient()
    tokens = issue_tokens(http, server, client, expires_in=-10)  # the upstream token is due at once
    session = tokens["session"]
    session.claims = json.dumps({"email": "alice@example.com", "groups": ["eng"], "name": "Alice"})
    session.save()
    upstream.add(responses.POST, f"{UPSTREAM}/token", json={
        "access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600,
        "id_token": id_token(email="alice@example.com", name="Alice Renamed", groups=["eng", "oncall"]),
    })

    response = refresh(http, server, client, tokens["refresh_token"])

    assert response.status_code == 200
    user = session_user(UpstreamSession.objects.get())
    assert (user.name, user.groups) == ("Alice Renamed", ("eng", "oncall"))
