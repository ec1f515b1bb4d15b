import hashlib
import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth.hashers import check_password
from django.core.cache import cache
from django.db import connection
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from oauthproxy.authserver.registration import clients_expire_unused
from oauthproxy.models import AuditEvent, Client, UpstreamSession

BASE = "https://proxy.example.test"
REGISTER = "/oauth/crm/register"

# Bodies as real MCP clients send them.
MCP_PYTHON_SDK = {  # mcp.client.auth: OAuthClientMetadata defaults
    "redirect_uris": ["http://localhost:3030/callback"],
    "token_endpoint_auth_method": "client_secret_post",
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "client_name": "MCP Python SDK client",
    "scope": "openid email",
}
TYPESCRIPT_SDK_PUBLIC = {  # Claude Code, MCP Inspector: public native client on a loopback port
    "redirect_uris": ["http://127.0.0.1:54545/callback"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "client_name": "Claude Code (crm)",
    "application_type": "native",
}
VS_CODE = {
    "client_name": "Visual Studio Code",
    "client_uri": "https://code.visualstudio.com",
    "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
    "response_types": ["code"],
    "redirect_uris": [
        "https://insiders.vscode.dev/redirect",
        "https://vscode.dev/redirect",
        "http://localhost/",
        "http://127.0.0.1/",
        "http://localhost:33418/",
        "http://127.0.0.1:33418/",
    ],
    "token_endpoint_auth_method": "none",
    "application_type": "native",
}
CLAUDE_WEB = {
    "client_name": "Claude",
    "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "token_endpoint_auth_method": "client_secret_post",
}


def register(client, body, *, path=REGISTER, **extra):
    payload = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, data=payload, content_type=extra.pop("content_type", "application/json"), **extra)


def registered(client, body=TYPESCRIPT_SDK_PUBLIC, *, path=REGISTER) -> dict:
    response = register(client, body, path=path)
    assert response.status_code == 201, response.content
    return response.json()


def bearer(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def raw_client_row(pk) -> str:
    """The client's row as stored, every column as text (what a copy of the database holds)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM oauthproxy_client WHERE id = %s", [pk])
        return " ".join(str(value) for value in cursor.fetchone())


@pytest.mark.django_db
class TestRegister:
    def test_public_native_client_as_sdks_send_it(self, client, server):
        response = register(client, TYPESCRIPT_SDK_PUBLIC)
        assert response.status_code == 201
        assert response["Cache-Control"] == "no-store"
        body = response.json()
        assert body["redirect_uris"] == ["http://127.0.0.1:54545/callback"]
        assert body["token_endpoint_auth_method"] == "none"
        assert body["grant_types"] == ["authorization_code", "refresh_token"]
        assert body["response_types"] == ["code"]
        assert body["client_name"] == "Claude Code (crm)"
        assert body["application_type"] == "native"
        assert "client_secret" not in body and "client_secret_expires_at" not in body
        assert body["registration_client_uri"] == f"{BASE}/oauth/crm/register/{body['client_id']}"
        assert abs(body["client_id_issued_at"] - timezone.now().timestamp()) < 60
        stored = Client.objects.get(client_id=body["client_id"])
        assert stored.server == server
        assert stored.registration_source == Client.RegistrationSource.DCR
        assert stored.client_type == Client.CLIENT_PUBLIC
        assert stored.authorization_grant_type == Client.GRANT_AUTHORIZATION_CODE
        assert stored.name == "Claude Code (crm)"
        assert stored.redirect_uris.split() == body["redirect_uris"]

    def test_localhost_loopback_client(self, client, server):
        body = registered(client, {**TYPESCRIPT_SDK_PUBLIC, "redirect_uris": ["http://localhost:61000/callback"]})
        assert body["redirect_uris"] == ["http://localhost:61000/callback"]

    def test_confidential_client_gets_its_secret_once_and_it_is_stored_hashed(self, client, server):
        body = registered(client, MCP_PYTHON_SDK)
        secret = body["client_secret"]
        assert len(secret) >= 32
        assert body["client_secret_expires_at"] == 0
        assert body["token_endpoint_auth_method"] == "client_secret_post"
        stored = Client.objects.get(client_id=body["client_id"])
        assert stored.client_type == Client.CLIENT_CONFIDENTIAL
        assert stored.client_secret != secret and check_password(secret, stored.client_secret)
        assert secret not in raw_client_row(stored.pk)

    def test_client_secret_basic(self, client, server):
        body = registered(client, {**CLAUDE_WEB, "token_endpoint_auth_method": "client_secret_basic"})
        assert body["client_secret"] and body["token_endpoint_auth_method"] == "client_secret_basic"

    def test_auth_method_defaults_to_client_secret_basic(self, client, server):
        body = registered(client, {"redirect_uris": ["https://app.example.com/cb"]})
        assert body["token_endpoint_auth_method"] == "client_secret_basic"
        assert body["client_secret"]

    def test_vs_code_registers_and_unsupported_grants_are_dropped(self, client, server):
        body = registered(client, VS_CODE)
        assert body["grant_types"] == ["authorization_code", "refresh_token"]
        assert body["client_uri"] == "https://code.visualstudio.com"
        assert len(body["redirect_uris"]) == 6

    def test_descriptive_metadata_is_stored_and_echoed(self, client, server):
        extras = {
            "client_uri": "https://app.example.com",
            "logo_uri": "https://app.example.com/logo.png",
            "tos_uri": "https://app.example.com/tos",
            "policy_uri": "https://app.example.com/privacy",
            "contacts": ["ops@example.com"],
            "software_id": "4NRB1-0XZABZI9E6-5SM3R",
            "software_version": "2.1",
        }
        body = registered(client, {**CLAUDE_WEB, **extras, "unknown_field": {"ignored": True}})
        for name, value in extras.items():
            assert body[name] == value
        assert "unknown_field" not in body
        assert Client.objects.get(client_id=body["client_id"]).metadata["software_id"] == extras["software_id"]

    def test_client_name_is_stored_verbatim(self, client, server):
        name = "<script>alert('x')</script> & co"
        body = registered(client, {**TYPESCRIPT_SDK_PUBLIC, "client_name": name})
        assert body["client_name"] == name
        assert Client.objects.get(client_id=body["client_id"]).name == name

    def test_scope_is_narrowed_to_the_servers_scopes(self, client, server):
        assert registered(client, {**TYPESCRIPT_SDK_PUBLIC, "scope": "email bogus openid"})["scope"] == "email openid"
        assert registered(client, TYPESCRIPT_SDK_PUBLIC)["scope"] == "openid email offline_access"

    def test_private_use_scheme_redirect(self, client, server):
        body = registered(client, {**TYPESCRIPT_SDK_PUBLIC, "redirect_uris": ["com.example.app:/oauth2redirect"]})
        assert body["redirect_uris"] == ["com.example.app:/oauth2redirect"]

    def test_null_optional_fields_count_as_absent(self, client, server):
        body = registered(client, {**TYPESCRIPT_SDK_PUBLIC, "client_uri": None, "scope": None, "contacts": None})
        assert "client_uri" not in body and "contacts" not in body

    def test_registration_token_is_stored_only_as_its_sha256(self, client, server):
        body = registered(client)
        token = body["registration_access_token"]
        stored = Client.objects.get(client_id=body["client_id"])
        assert stored.registration_token_checksum == hashlib.sha256(token.encode()).hexdigest()
        assert token not in raw_client_row(stored.pk)

    def test_audited_without_secrets(self, client, server):
        body = registered(client, MCP_PYTHON_SDK)
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CLIENT_REGISTERED)
        assert event.server == server and event.client.client_id == body["client_id"]
        recorded = json.dumps(event.detail) + event.message
        assert body["client_secret"] not in recorded
        assert body["registration_access_token"] not in recorded

    def test_secrets_never_reach_the_log(self, client, server, caplog):
        caplog.set_level("DEBUG")
        body = registered(client, MCP_PYTHON_SDK)
        assert body["client_secret"] not in caplog.text
        assert body["registration_access_token"] not in caplog.text

    def test_cors_preflight(self, client, server):
        response = client.options(
            REGISTER,
            HTTP_ORIGIN="http://localhost:6274",
            HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
            HTTP_ACCESS_CONTROL_REQUEST_HEADERS="content-type",
        )
        assert response.status_code == 204
        assert response["Access-Control-Allow-Origin"] == "*"
        assert "POST" in response["Access-Control-Allow-Methods"]
        assert "Content-Type" in response["Access-Control-Allow-Headers"]

    @pytest.mark.parametrize("enabled", [True, False])
    def test_unknown_or_disabled_server_is_a_json_404(self, client, server, enabled):
        server.enabled = enabled
        server.save()
        response = register(client, TYPESCRIPT_SDK_PUBLIC, path="/oauth/nope/register" if enabled else REGISTER)
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}
        assert not Client.objects.exists()

    def test_client_belongs_to_the_server_it_registered_at(self, client, server, server_factory):
        other = server_factory(slug="billing", name="Billing")
        body = registered(client, path="/oauth/billing/register")
        assert Client.objects.get(client_id=body["client_id"]).server == other
        assert body["registration_client_uri"].startswith(f"{BASE}/oauth/billing/register/")


    def test_client_ids_are_random_url_safe_and_distinct(self, client, server):
        ids = {registered(client)["client_id"] for _ in range(5)}
        assert len(ids) == 5
        for client_id in ids:
            assert re.fullmatch(r"[A-Za-z0-9_-]{40}", client_id)

    def test_errors_are_json_no_store_and_readable_cross_origin(self, client, server):
        response = register(client, {"redirect_uris": ["javascript:alert(1)"]}, HTTP_ORIGIN="http://localhost:6274")
        assert response.status_code == 400
        assert response["Content-Type"] == "application/json"
        assert response["Cache-Control"] == "no-store"
        assert response["Access-Control-Allow-Origin"] == "*"
        created = register(client, TYPESCRIPT_SDK_PUBLIC, HTTP_ORIGIN="http://localhost:6274")
        assert created["Access-Control-Allow-Origin"] == "*"

    @pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
    def test_other_methods_are_a_json_405(self, client, server, method):
        response = getattr(client, method)(REGISTER)
        assert response.status_code == 405
        assert response.json()["error"] == "invalid_request"
        assert response["Allow"] == "POST, OPTIONS"
        assert not Client.objects.exists()

    def test_needs_nothing_from_middleware(self, server):
        """The view answers a bare request (no session, user or CSRF token), as it is served past Django's
        middleware stack."""
        from oauthproxy.authserver.views.registration import ClientRegisterApi

        request = RequestFactory().post(REGISTER, json.dumps(TYPESCRIPT_SDK_PUBLIC), content_type="application/json")
        response = ClientRegisterApi.as_view()(request, slug="crm")
        assert response.status_code == 201, response.content
        assert Client.objects.filter(client_id=json.loads(response.content)["client_id"], server=server).exists()


FORBIDDEN_REDIRECTS = [
    "javascript:alert(1)",
    "data:text/html,<h1>x</h1>",
    "file:///etc/passwd",
    "vbscript:msgbox(1)",
    "https://app.example.com/cb#fragment",
    "https://user:pw@app.example.com/cb",
    "http://app.example.com/cb",
    "myapp://callback",
    "/relative",
]


@pytest.mark.django_db
class TestRegisterRefusals:
    @pytest.mark.parametrize("uri", FORBIDDEN_REDIRECTS)
    def test_forbidden_redirect_uri(self, client, server, uri):
        response = register(client, {**TYPESCRIPT_SDK_PUBLIC, "redirect_uris": ["http://127.0.0.1/cb", uri]})
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "invalid_redirect_uri"
        assert body["error_description"]
        assert response["Cache-Control"] == "no-store"
        assert not Client.objects.exists()

    @pytest.mark.parametrize("redirect_uris", [None, [], "https://app.example.com/cb", [42], [None]])
    def test_at_least_one_valid_redirect_uri(self, client, server, redirect_uris):
        body = {**TYPESCRIPT_SDK_PUBLIC, "redirect_uris": redirect_uris}
        if redirect_uris is None:
            del body["redirect_uris"]
        response = register(client, body)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_redirect_uri"

    @pytest.mark.parametrize(
        ("field", "value", "mentions"),
        [
            ("token_endpoint_auth_method", "private_key_jwt", "token_endpoint_auth_method"),
            ("token_endpoint_auth_method", 5, "token_endpoint_auth_method"),
            ("grant_types", ["client_credentials"], "authorization_code"),
            ("grant_types", "authorization_code", "grant_types"),
            ("grant_types", [1, 2], "grant_types"),
            ("response_types", ["token"], "code"),
            ("application_type", "desktop", "application_type"),
            ("client_name", 5, "client_name"),
            ("client_name", "x" * 256, "client_name"),
            ("client_name", "null\x00byte", "client_name"),
            ("client_uri", "javascript:alert(1)", "client_uri"),
            ("logo_uri", "not a url", "logo_uri"),
            ("logo_uri", ["https://a.example/l.png"], "logo_uri"),
            ("contacts", "ops@example.com", "contacts"),
            ("contacts", [f"u{i}@example.com" for i in range(11)], "contacts"),
            ("scope", ["openid"], "scope"),
            ("scope", 'openid "email"', "scope"),
            ("software_id", {"a": 1}, "software_id"),
        ],
    )
    def test_bad_metadata_is_named(self, client, server, field, value, mentions):
        response = register(client, {**TYPESCRIPT_SDK_PUBLIC, field: value})
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "invalid_client_metadata"
        assert mentions in body["error_description"]

    @pytest.mark.parametrize(
        ("payload", "content_type"),
        [
            ("{not json", "application/json"),
            ("", "application/json"),
            ('["https://app.example.com/cb"]', "application/json"),
            ('"a string"', "application/json"),
            ("null", "application/json"),
            ('{"redirect_uris": NaN}', "application/json"),
            ("[" * 100000 + "]" * 100000, "application/json"),
            (b"\xff\xfe{}", "application/json"),
            (json.dumps(TYPESCRIPT_SDK_PUBLIC), "text/plain"),
            ("redirect_uris=https://app.example.com/cb", "application/x-www-form-urlencoded"),
            (json.dumps({**TYPESCRIPT_SDK_PUBLIC, "pad": "x" * 70000}), "application/json"),
        ],
    )
    def test_unparseable_bodies_are_invalid_client_metadata(self, client, server, payload, content_type):
        response = register(client, payload, content_type=content_type)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_client_metadata"

    def test_lone_surrogate_in_a_string_is_refused(self, client, server):
        payload = '{"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "\\ud800"}'
        response = register(client, payload)
        assert response.status_code == 400


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types", "client_name", "client_uri",
    "logo_uri", "scope", "contacts", "software_id", "application_type", "client_id", "client_secret",
]
URIISH = st.sampled_from(["http://127.0.0.1/cb", "https://a.example/cb", "com.x.y:/cb"]) | st.text(max_size=40)
METADATA = st.fixed_dictionaries(
    {"redirect_uris": st.lists(URIISH, max_size=3) | JSON},
    optional={name: JSON | st.text() | st.lists(st.text(), max_size=3) for name in FIELDS[1:]},
)
FUZZ = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.django_db
class TestRegisterNeverFails:
    @pytest.fixture(autouse=True)
    def _unlimited(self, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"register:ip": (0, 60)}}

    @FUZZ
    @given(body=JSON | METADATA)
    def test_arbitrary_json(self, client, server, body):
        response = register(client, body)
        assert response.status_code in (201, 400), response.content
        if response.status_code == 400:
            assert response.json()["error"] in ("invalid_client_metadata", "invalid_redirect_uri")

    @FUZZ
    @given(payload=st.binary(max_size=200))
    def test_arbitrary_bytes(self, client, server, payload):
        response = register(client, payload)
        assert response.status_code in (201, 400)


@pytest.mark.django_db
class TestClientConfiguration:
    def url(self, body):
        return body["registration_client_uri"].removeprefix(BASE)

    def test_read_with_the_registration_token(self, client, server):
        body = registered(client, MCP_PYTHON_SDK)
        response = client.get(self.url(body), **bearer(body["registration_access_token"]))
        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        read = response.json()
        assert read["client_id"] == body["client_id"]
        assert read["registration_access_token"] == body["registration_access_token"]
        assert read["redirect_uris"] == body["redirect_uris"]
        assert read["client_name"] == body["client_name"]
        assert read["client_secret_expires_at"] == 0
        assert "client_secret" not in read  # only known at registration: it is stored hashed

    def test_update_replaces_the_metadata(self, client, server):
        body = registered(client)
        update = {
            "client_id": body["client_id"],
            "redirect_uris": ["http://127.0.0.1:9999/callback", "https://app.example.com/cb"],
            "token_endpoint_auth_method": "none",
            "client_name": "Renamed",
        }
        response = client.put(
            self.url(body), data=json.dumps(update), content_type="application/json",
            **bearer(body["registration_access_token"]),
        )
        assert response.status_code == 200, response.content
        assert response.json()["client_name"] == "Renamed"
        stored = Client.objects.get(client_id=body["client_id"])
        assert stored.name == "Renamed"
        assert stored.redirect_uris.split() == update["redirect_uris"]
        assert "application_type" not in stored.metadata  # a replacement, not a patch
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CLIENT_UPDATED, client=stored).exists()

    @pytest.mark.parametrize(
        ("change", "error"),
        [
            ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
            ({"client_id": "someone-else"}, "invalid_request"),
            ({"token_endpoint_auth_method": "client_secret_basic"}, "invalid_client_metadata"),
            ({"client_secret": "guess"}, "invalid_client_metadata"),
        ],
    )
    def test_bad_update_changes_nothing(self, client, server, change, error):
        body = registered(client)
        response = client.put(
            self.url(body), data=json.dumps({**TYPESCRIPT_SDK_PUBLIC, **change}), content_type="application/json",
            **bearer(body["registration_access_token"]),
        )
        assert response.status_code == 400
        assert response.json()["error"] == error
        assert Client.objects.get(client_id=body["client_id"]).redirect_uris == "http://127.0.0.1:54545/callback"

    def test_confidential_update_may_repeat_its_secret(self, client, server):
        body = registered(client, MCP_PYTHON_SDK)
        update = {**MCP_PYTHON_SDK, "client_id": body["client_id"], "client_secret": body["client_secret"]}
        response = client.put(
            self.url(body), data=json.dumps(update), content_type="application/json",
            **bearer(body["registration_access_token"]),
        )
        assert response.status_code == 200

    def test_malformed_update_body(self, client, server):
        body = registered(client)
        response = client.put(
            self.url(body), data="{", content_type="application/json", **bearer(body["registration_access_token"])
        )
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_client_metadata"

    def test_delete(self, client, server):
        body = registered(client)
        response = client.delete(self.url(body), **bearer(body["registration_access_token"]))
        assert response.status_code == 204
        assert not Client.objects.filter(client_id=body["client_id"]).exists()
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.CLIENT_DELETED)
        assert event.detail["client_id"] == body["client_id"]
        assert client.get(self.url(body), **bearer(body["registration_access_token"])).status_code == 401

    @pytest.mark.parametrize("method", ["get", "put", "delete"])
    @pytest.mark.parametrize(
        "authorization", [None, "Bearer wrong-token", "Basic Zm9vOmJhcg==", "Bearer", "Bearer a b"]
    )
    def test_bad_or_missing_token(self, client, server, method, authorization):
        body = registered(client)
        headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
        response = client.generic(
            method.upper(), self.url(body), json.dumps(TYPESCRIPT_SDK_PUBLIC), "application/json", **headers
        )
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert Client.objects.get(client_id=body["client_id"]).name == "Claude Code (crm)"

    def test_another_clients_token_is_refused(self, client, server):
        first, second = registered(client), registered(client)
        response = client.get(self.url(first), **bearer(second["registration_access_token"]))
        assert response.status_code == 401

    def test_never_across_servers(self, client, server, server_factory):
        server_factory(slug="billing", name="Billing")
        body = registered(client)  # at crm
        other_url = f"/oauth/billing/register/{body['client_id']}"
        for method in ("get", "put", "delete"):
            response = client.generic(
                method.upper(), other_url, json.dumps(TYPESCRIPT_SDK_PUBLIC), "application/json",
                **bearer(body["registration_access_token"]),
            )
            assert response.status_code == 401
        assert Client.objects.filter(client_id=body["client_id"]).exists()

    def test_unknown_client_looks_like_a_bad_token(self, client, server):
        body = registered(client)
        response = client.get("/oauth/crm/register/unknown-client", **bearer(body["registration_access_token"]))
        assert response.status_code == 401

    def test_cimd_and_manual_clients_cannot_be_managed(self, client, server):
        body = registered(client)
        Client.objects.filter(client_id=body["client_id"]).update(registration_source=Client.RegistrationSource.MANUAL)
        assert client.get(self.url(body), **bearer(body["registration_access_token"])).status_code == 401

    def test_disabled_server(self, client, server):
        body = registered(client)
        server.enabled = False
        server.save()
        response = client.get(self.url(body), **bearer(body["registration_access_token"]))
        assert response.status_code == 404


@pytest.mark.django_db
class TestLimits:
    def test_rate_limited_per_server_and_address(self, client, server, server_factory, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"register:ip": (2, 60)}}
        server_factory(slug="billing", name="Billing")
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 201
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 201
        response = register(client, TYPESCRIPT_SDK_PUBLIC)
        assert response.status_code == 429
        assert 1 <= int(response["Retry-After"]) <= 60
        assert response.json()["error"]
        assert register(client, TYPESCRIPT_SDK_PUBLIC, REMOTE_ADDR="192.0.2.7").status_code == 201
        assert register(client, TYPESCRIPT_SDK_PUBLIC, path="/oauth/billing/register").status_code == 201

    def test_registrations_are_capped_per_server(self, client, server, server_factory, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 2}
        server_factory(slug="billing", name="Billing")
        registered(client)
        registered(client)
        response = register(client, TYPESCRIPT_SDK_PUBLIC)
        assert response.status_code == 429
        assert response.json()["error"] == "temporarily_unavailable"
        assert "limit" in response.json()["error_description"]
        assert response["Retry-After"]
        assert Client.objects.filter(server=server).count() == 2
        assert register(client, TYPESCRIPT_SDK_PUBLIC, path="/oauth/billing/register").status_code == 201


    def test_the_cap_is_exact_and_a_deleted_registration_frees_its_slot(self, client, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 3}
        first = registered(client)
        registered(client)
        registered(client)
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 429
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 429
        url = first["registration_client_uri"].removeprefix(BASE)
        assert client.delete(url, **bearer(first["registration_access_token"])).status_code == 204
        registered(client)  # the freed slot, at once
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 429
        assert Client.objects.filter(server=server).count() == 3

    def test_clients_beyond_a_lowered_cap_refuse_new_registrations(self, client, server, settings):
        for _ in range(3):
            registered(client)
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 2}
        response = register(client, TYPESCRIPT_SDK_PUBLIC)
        assert response.status_code == 429
        assert response.json()["error"] == "temporarily_unavailable"

    def test_registrations_below_the_cap_do_not_count_the_servers_clients(self, client, server, settings):
        """The cost of a registration does not grow with the clients a server holds: they are counted once
        a minute (a count that stops at the cap), not on every registration."""
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 1000}
        registered(client)
        with CaptureQueriesContext(connection) as queries:
            for _ in range(5):
                registered(client)
        statements = [q["sql"] for q in queries.captured_queries]
        assert not [sql for sql in statements if "COUNT(" in sql.upper() or sql.startswith("SELECT")]
        if connection.vendor != "postgresql":
            return  # elsewhere the client and its audit event are two INSERTs (oauthproxy.db.sql)
        # Per registration one statement, writing the client and its audit event.
        assert len(statements) == 5
        assert all('INSERT INTO "oauthproxy_client"' in sql and 'INSERT INTO "oauthproxy_auditevent"' in sql
                   for sql in statements)


def age(client_id: str, *, seconds: int) -> None:
    Client.objects.filter(client_id=client_id).update(created=timezone.now() - timedelta(seconds=seconds))


@pytest.mark.django_db
class TestUnusedRegistrationsExpire:
    def test_only_old_never_used_self_registered_clients_go(self, client, server):
        old_unused, old_used, old_with_session, recent = (registered(client)["client_id"] for _ in range(4))
        for client_id in (old_unused, old_used, old_with_session):
            age(client_id, seconds=2 * 24 * 3600)
        Client.objects.filter(client_id=old_used).update(last_used=timezone.now())
        UpstreamSession.objects.create(
            server=server, client=Client.objects.get(client_id=old_with_session), subject="alice",
            access_token="upstream-at", refresh_token="",
        )
        manual = Client.objects.create(
            server=server, name="manual", client_type=Client.CLIENT_PUBLIC,
            authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE, redirect_uris="https://a.example/cb",
        )
        age(manual.client_id, seconds=2 * 24 * 3600)

        assert clients_expire_unused() == 1
        remaining = set(Client.objects.values_list("client_id", flat=True))
        assert remaining == {old_used, old_with_session, recent, manual.client_id}
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CLIENT_DELETED, detail__reason="unused").exists()

    def test_threshold_is_configurable(self, client, server, settings):
        client_id = registered(client)["client_id"]
        age(client_id, seconds=120)
        assert clients_expire_unused(older_than_seconds=3600) == 0
        assert clients_expire_unused(older_than_seconds=60) == 1
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "UNUSED_REGISTRATION_TTL": 30}
        age(registered(client)["client_id"], seconds=120)
        assert clients_expire_unused() == 1

    def test_registration_expires_stale_ones_at_most_once_a_minute(self, client, server):
        first = registered(client)["client_id"]
        age(first, seconds=2 * 24 * 3600)
        cache.clear()
        registered(client)  # runs the expiry
        assert not Client.objects.filter(client_id=first).exists()
        again = registered(client)["client_id"]
        age(again, seconds=2 * 24 * 3600)
        registered(client)  # within the minute: not run again
        assert Client.objects.filter(client_id=again).exists()

    def test_expiry_makes_room_under_the_cap(self, client, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 1}
        age(registered(client)["client_id"], seconds=2 * 24 * 3600)
        cache.clear()
        assert register(client, TYPESCRIPT_SDK_PUBLIC).status_code == 201


@pytest.mark.django_db
def test_public_clients_store_no_secret_and_confidential_secrets_use_the_fast_hasher(client, server):
    from oauthproxy.models import Client

    public = registered(client)
    assert Client.objects.get(client_id=public["client_id"]).client_secret == ""
    confidential = registered(client, {**TYPESCRIPT_SDK_PUBLIC, "token_endpoint_auth_method": "client_secret_basic"})
    stored = Client.objects.get(client_id=confidential["client_id"]).client_secret
    assert stored.startswith("pbkdf2_sha256_generated_secret$1$")
    assert confidential["client_secret"] not in stored
