"""Token services and helpers: what is stored (DESIGN §5.1), the replay seal, client credentials, the
token-validation selector."""

import base64

import pytest
import responses
from django.db import connection
from django.utils import timezone

from oauthproxy.authserver.dot.validator import (
    ClientCredentials,
    client_credentials_parse,
    replay_open,
    replay_seal,
    verified_secrets,
)
from oauthproxy.authserver.tokens import introspection_credential_create, token_introspect
from oauthproxy.core.exceptions import InvalidClient, InvalidRequest
from oauthproxy.grants.selectors import access_token_get_active
from oauthproxy.models import AccessToken, UpstreamSession
from tests.conftest import UPSTREAM
from tests.factories import (
    DEFAULT_CODE_VERIFIER,
    issue_tokens,
    make_client,
    make_code,
    make_introspection_credential,
    make_upstream_session,
    redeem_code,
    refresh,
)


def database_dump() -> str:
    """Every row of every table, as text: what a copy of the database would give an attacker."""
    parts = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")  # noqa: S608 (from the catalog)
            parts.extend(" ".join(str(value) for value in row) for row in cursor.fetchall())
    return "\n".join(parts)


@pytest.mark.django_db
class TestNothingUsableAtRest:
    def test_database_holds_no_raw_token_code_or_secret_after_a_full_flow(self, client, server):
        """DESIGN §5.1: proxy tokens, codes and secrets as hashes; upstream tokens encrypted."""
        confidential = make_client(server, public=False)
        session = make_upstream_session(server, confidential, access_token="UPSTREAM-AT-3f9a1c",
                                        refresh_token="UPSTREAM-RT-77b2e0")
        code = make_code(session, confidential)
        first = redeem_code(client, server, confidential, code).json()
        second = refresh(client, server, confidential, first["refresh_token"]).json()
        replayed = refresh(client, server, confidential, first["refresh_token"]).json()  # grace duplicate
        assert replayed == second
        with responses.RequestsMock() as mock:  # an upstream refresh rotates the upstream tokens too
            mock.add(responses.POST, f"{UPSTREAM}/token",
                     json={"access_token": "UPSTREAM-AT-new-51d0", "refresh_token": "UPSTREAM-RT-new-e4a9",
                           "expires_in": 300})
            UpstreamSession.objects.filter(pk=session.pk).update(expires_at=timezone.now())  # due
            third = refresh(client, server, confidential, second["refresh_token"]).json()
        _credential, introspection_secret = introspection_credential_create(server=server, name="rs")

        dump = database_dump()
        secrets = {
            "code": code,
            "code_verifier": DEFAULT_CODE_VERIFIER,
            "client secret": confidential.plain_client_secret,
            "introspection secret": introspection_secret,
            "upstream client secret": "upstream-secret-value-123",
            **{f"proxy {k} {i}": tokens[k] for i, tokens in enumerate((first, second, third))
               for k in ("access_token", "refresh_token")},
            "upstream access token": "UPSTREAM-AT-3f9a1c",
            "upstream refresh token": "UPSTREAM-RT-77b2e0",
            "new upstream access token": "UPSTREAM-AT-new-51d0",
            "new upstream refresh token": "UPSTREAM-RT-new-e4a9",
        }
        assert len(dump) > 1000
        leaked = [name for name, value in secrets.items() if value in dump]
        assert leaked == []


class TestReplaySeal:
    def test_round_trip_needs_the_raw_token_and_the_row(self):
        sealed = replay_seal(raw_token="rt-raw", context="row.1", plaintext='{"a": 1}')
        assert sealed.startswith("v1:") and "rt-raw" not in sealed and '"a"' not in sealed
        assert replay_open(raw_token="rt-raw", context="row.1", sealed=sealed) == '{"a": 1}'
        assert replay_open(raw_token="rt-other", context="row.1", sealed=sealed) is None
        assert replay_open(raw_token="rt-raw", context="row.2", sealed=sealed) is None  # moved to another row

    @pytest.mark.parametrize("sealed", ["", "v1:", "v1:!!!", "v2:abc", "v1:" + base64.urlsafe_b64encode(b"x").decode()])
    def test_garbage_does_not_open(self, sealed):
        assert replay_open(raw_token="rt", context="c", sealed=sealed) is None

    def test_each_seal_is_different(self):
        assert replay_seal(raw_token="t", context="c", plaintext="p") != replay_seal(raw_token="t", context="c",
                                                                                     plaintext="p")


class TestClientCredentials:
    def basic(self, raw: str) -> str:
        return "Basic " + base64.b64encode(raw.encode()).decode()

    def test_basic_is_form_decoded(self):
        credentials = client_credentials_parse(authorization=self.basic("my%3Aclient:s%2Bcret+x"), client_id=None,
                                               client_secret=None)
        assert credentials == ClientCredentials("my:client", "s+cret x", "client_secret_basic")

    def test_body_credentials(self):
        assert client_credentials_parse(authorization=None, client_id="c", client_secret="s") == ClientCredentials(
            "c", "s", "client_secret_post")
        assert client_credentials_parse(authorization=None, client_id="c", client_secret=None).method == "none"

    def test_other_schemes_are_ignored(self):
        assert client_credentials_parse(authorization="Bearer abc", client_id="c", client_secret=None).client_id == "c"

    @pytest.mark.parametrize("raw", ["Basic", "Basic !!", "Basic " + base64.b64encode(b"nocolon").decode(),
                                     "Basic " + base64.b64encode(b":secret").decode(),
                                     "Basic " + base64.b64encode(b"\xff\xfe:x").decode()])
    def test_unreadable_basic_is_invalid_client(self, raw):
        with pytest.raises(InvalidClient):
            client_credentials_parse(authorization=raw, client_id=None, client_secret=None)

    def test_mixing_methods_is_refused(self):
        with pytest.raises(InvalidRequest):
            client_credentials_parse(authorization=self.basic("c:s"), client_id=None, client_secret="s")
        with pytest.raises(InvalidClient):
            client_credentials_parse(authorization=self.basic("c:s"), client_id="d", client_secret=None)


class TestVerifiedSecrets:
    def test_only_positive_results_are_remembered(self):
        calls = []

        def checker(provided, stored):
            calls.append(provided)
            return provided == "right"

        assert verified_secrets.check("wrong", "hash-1", checker) is False
        assert verified_secrets.check("wrong", "hash-1", checker) is False
        assert verified_secrets.check("right", "hash-1", checker) is True
        assert verified_secrets.check("right", "hash-1", checker) is True
        assert calls == ["wrong", "wrong", "right"]
        assert verified_secrets.check("right", "hash-2", checker) is True  # another stored hash: checked again
        assert calls[-1] == "right" and len(calls) == 4


@pytest.mark.django_db
class TestAccessTokenSelector:
    def test_active_token_comes_with_client_and_session(self, client, server, django_assert_num_queries):
        mcp_client = make_client(server)
        tokens = issue_tokens(client, server, mcp_client)
        with django_assert_num_queries(1):
            access = access_token_get_active(server=server, token=tokens["access_token"])
            assert access.application == mcp_client
            assert access.upstream_session.subject == "user-42"

    def test_other_server_disabled_client_ended_session_and_audience_are_checked(
        self, client, server, server_factory
    ):
        other = server_factory(slug="other")
        mcp_client = make_client(server)
        tokens = issue_tokens(client, server, mcp_client)
        token = tokens["access_token"]
        assert access_token_get_active(server=other, token=token) is None
        AccessToken.objects.update(resource=[other.resource_url])
        assert access_token_get_active(server=server, token=token) is None
        AccessToken.objects.update(resource=[server.resource_url])
        assert access_token_get_active(server=server, token=token) is not None
        UpstreamSession.objects.update(revoked_at=tokens["session"].created)
        assert access_token_get_active(server=server, token=token) is None

    @pytest.mark.parametrize("token", ["", "x", "a\x00b", "x" * 10000, None, 42])
    def test_garbage_is_none(self, server, token):
        assert access_token_get_active(server=server, token=token) is None

    def test_introspection_answer_never_has_upstream_tokens(self, client, server):
        tokens = issue_tokens(client, server, make_client(server), access_token="UP-AT", refresh_token="UP-RT")
        answer = token_introspect(server=server, token=tokens["access_token"])
        assert answer["active"] is True
        assert "UP-" not in repr(answer)

    def test_introspection_credential_create_returns_secret_once(self, server):
        credential, secret = introspection_credential_create(server=server, name="rs")
        credential.refresh_from_db()
        assert credential.check_secret(secret) and secret not in credential.secret_hash
        assert make_introspection_credential(server)[0].client_id.startswith("rs_")
