"""Identity assertions (DESIGN §4 Gateway): with ``identity_assertion`` on, every forwarded request carries
``X-Identity-Assertion``, a short-lived ES256 JWT the internal server verifies with the server's JWKS
(``verify_identity_assertion``: the lines the README shows, as the e2e internal server runs them)."""

from __future__ import annotations

import json

import httpx
import jwt
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from oauthproxy.core import metrics
from oauthproxy.core.identity import identity_key_rotate
from oauthproxy.gateway.auth import gateway_auth_caches_clear
from oauthproxy.gateway.forwarding import gateway_caches_clear
from oauthproxy.models import IdentityKey
from tests.conftest import make_server
from tests.e2e.mcp_server import _jwk_clients, verify_identity_assertion
from tests.gateway.conftest import ACCEPT, INITIALIZE, make_grant

pytestmark = pytest.mark.django_db(transaction=True)

@pytest.fixture(autouse=True)
def _fresh_key_sets():
    """Each test's database has its own keys: a verifier's cached key set must not outlive the test."""
    _jwk_clients.clear()


CLAIMS = {"email": "alice@example.com", "name": "Alice Example", "groups": ["eng", "oncall"]}


@pytest.fixture
def identity(transactional_db, proxy, internal):
    """A server `crm` with identity assertions on, and a grant whose session knows the user's claims."""
    server = make_server(slug="crm", mcp_url=internal.url, identity_assertion=True)
    grant = make_grant(server, subject="alice")
    grant.session.claims = json.dumps(CLAIMS)
    grant.session.save()
    return grant


def post(proxy, grant, message=INITIALIZE, slug="crm") -> httpx.Response:
    response = httpx.post(f"{proxy.base_url}/mcp/{slug}", json=message, headers={**ACCEPT, **grant.auth}, timeout=10)
    assert response.status_code == 200, response.text
    return response


def verify(proxy, assertion: str, server) -> dict:
    return verify_identity_assertion(
        assertion, jwks_url=f"{proxy.base_url}/oauth/{server.slug}/jwks.json", audience=server.mcp_url,
        issuer=server.issuer_url,
    )


def issued(slug: str) -> float:
    return metrics.IDENTITY_ASSERTIONS.labels(server=slug)._value.get()


def test_forwarded_requests_carry_a_verifiable_assertion_with_the_users_identity(identity, proxy, internal):
    post(proxy, identity)
    assertion = internal.last_headers["x-identity-assertion"]
    claims = verify(proxy, assertion, identity.server)
    assert claims["iss"] == identity.server.issuer_url == "https://proxy.example.test/oauth/crm"
    assert claims["aud"] == identity.server.mcp_url
    assert claims["sub"] == "alice"
    assert (claims["email"], claims["name"], claims["groups"]) == (CLAIMS["email"], CLAIMS["name"], CLAIMS["groups"])
    assert claims["client_id"] == identity.client.client_id
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert len(claims["jti"]) >= 16
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "ES256"
    jwks = httpx.get(f"{proxy.base_url}/oauth/crm/jwks.json").json()
    assert header["kid"] in {key["kid"] for key in jwks["keys"]}
    assert all("d" not in key for key in jwks["keys"])  # public keys only
    # The upstream token still goes along by default.
    assert internal.last_headers["authorization"] == f"Bearer {identity.upstream_token}"


def test_another_servers_assertion_is_refused_by_audience(identity, proxy, internal):
    other = make_server(slug="billing", mcp_url="http://billing.internal/mcp", identity_assertion=True)
    post(proxy, identity)
    assertion = internal.last_headers["x-identity-assertion"]
    with pytest.raises(jwt.InvalidAudienceError):
        verify_identity_assertion(
            assertion, jwks_url=f"{proxy.base_url}/oauth/crm/jwks.json", audience=other.mcp_url,
            issuer=identity.server.issuer_url,
        )
    # Nor does it verify with the other server's keys.
    httpx.get(f"{proxy.base_url}/oauth/billing/jwks.json")  # no key yet: an empty set
    call_command("rotate_identity_key", "billing", "--overlap", "3600", stdout=open("/dev/null", "w"))
    with pytest.raises(jwt.PyJWKClientError):
        verify_identity_assertion(
            assertion, jwks_url=f"{proxy.base_url}/oauth/billing/jwks.json", audience=other.mcp_url,
            issuer=other.issuer_url,
        )


def test_assertions_are_cached_per_grant_no_signature_and_no_query_per_request(
    identity, proxy, internal, count_queries
):
    post(proxy, identity)  # the first request loads token, key, and signs
    before_signed, before_queries = issued("crm"), count_queries.count
    for _ in range(5):
        post(proxy, identity)
    assert issued("crm") == before_signed  # no new signature
    assert count_queries.count == before_queries  # no database query
    assertions = {h["x-identity-assertion"] for h in internal.headers}
    assert len(assertions) == 1  # the same assertion (same jti) reused


def test_claims_updated_at_an_upstream_refresh_reach_the_next_assertion(identity, proxy, internal):
    """The refresh re-reads the claims into the session (grants/sessions.py); once the gateway re-reads the
    token (GATEWAY_CACHE_SECONDS) a cached assertion with the old claims is not reused."""
    post(proxy, identity)
    identity.session.claims = json.dumps({**CLAIMS, "groups": ["eng"], "name": "Alice Renamed"})
    identity.session.save()
    gateway_auth_caches_clear()  # the token cache expired; the assertion cache did not
    post(proxy, identity)
    claims = verify(proxy, internal.last_headers["x-identity-assertion"], identity.server)
    assert (claims["name"], claims["groups"]) == ("Alice Renamed", ["eng"])


def test_a_cached_assertion_is_replaced_before_it_expires(identity, proxy, internal, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "IDENTITY_ASSERTION_LIFETIME": 60,
                           "IDENTITY_ASSERTION_RENEW_BEFORE": 60}  # never reused
    post(proxy, identity)
    post(proxy, identity)
    first, second = (h["x-identity-assertion"] for h in internal.headers[-2:])
    assert first != second
    assert verify(proxy, second, identity.server)["sub"] == "alice"


def test_without_forward_upstream_token_the_internal_server_gets_no_upstream_token(identity, proxy, internal):
    identity.server.forward_upstream_token = False
    identity.server.save()
    gateway_caches_clear()
    post(proxy, identity)
    headers = internal.last_headers
    assert "authorization" not in headers
    assert identity.upstream_token not in json.dumps(internal.headers)
    assert verify(proxy, headers["x-identity-assertion"], identity.server)["sub"] == "alice"


def test_servers_without_identity_assertion_send_none(transactional_db, proxy, internal):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url))
    post(proxy, grant)
    assert "x-identity-assertion" not in internal.last_headers
    metadata = httpx.get(f"{proxy.base_url}/.well-known/oauth-authorization-server/oauth/crm").json()
    assert "jwks_uri" not in metadata


def test_metadata_advertises_the_jwks_uri(identity, proxy):
    metadata = httpx.get(f"{proxy.base_url}/.well-known/oauth-authorization-server/oauth/crm").json()
    assert metadata["jwks_uri"] == "https://proxy.example.test/oauth/crm/jwks.json"


def test_a_client_cannot_forge_the_header(identity, proxy, internal):
    response = httpx.post(
        f"{proxy.base_url}/mcp/crm", json=INITIALIZE,
        headers={**ACCEPT, **identity.auth, "X-Identity-Assertion": "forged"}, timeout=10,
    )
    assert response.status_code == 200
    values = [v for k, v in internal.last_headers.items() if k == "x-identity-assertion"]
    assert values != ["forged"] and verify(proxy, values[0], identity.server)


def test_rotation_keeps_both_keys_published_during_the_overlap(identity, proxy, internal):
    post(proxy, identity)
    old_assertion = internal.last_headers["x-identity-assertion"]
    old_kid = jwt.get_unverified_header(old_assertion)["kid"]
    call_command("rotate_identity_key", "crm", "--overlap", "3600", stdout=open("/dev/null", "w"))
    gateway_caches_clear()  # as every process does within IDENTITY_KEY_CACHE_SECONDS
    post(proxy, identity)
    new_assertion = internal.last_headers["x-identity-assertion"]
    new_kid = jwt.get_unverified_header(new_assertion)["kid"]
    assert new_kid != old_kid
    kids = [key["kid"] for key in httpx.get(f"{proxy.base_url}/oauth/crm/jwks.json").json()["keys"]]
    assert kids == [new_kid, old_kid]
    # Both verify during the overlap.
    assert verify(proxy, old_assertion, identity.server)["sub"] == "alice"
    assert verify(proxy, new_assertion, identity.server)["sub"] == "alice"
    # Once the overlap ends the old key is no longer published, and the next rotation deletes it.
    IdentityKey.objects.filter(kid=old_kid).update(retires_at=timezone.now())
    kids = [key["kid"] for key in httpx.get(f"{proxy.base_url}/oauth/crm/jwks.json").json()["keys"]]
    assert kids == [new_kid]
    identity_key_rotate(server=identity.server, overlap_seconds=3600)
    assert not IdentityKey.objects.filter(kid=old_kid).exists()


def test_rotation_refuses_an_overlap_shorter_than_caches_allow(identity):
    with pytest.raises(CommandError, match="at least"):
        call_command("rotate_identity_key", "crm", "--overlap", "30")
    with pytest.raises(CommandError, match="Unknown"):
        call_command("rotate_identity_key", "nope")


def test_signing_keys_are_stored_encrypted(identity, proxy):
    post(proxy, identity)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT private_key FROM {IdentityKey._meta.db_table}")  # noqa: S608
        (stored,) = cursor.fetchone()
    assert stored.startswith("enc:v1:") and "PRIVATE KEY" not in stored
    assert "PRIVATE KEY" in IdentityKey.objects.get().private_key


def test_the_setting_is_part_of_the_configuration_document(identity):
    from oauthproxy.console.servers import servers_export

    (document,) = servers_export()
    assert document["identity_assertion"] is True and document["forward_upstream_token"] is True
