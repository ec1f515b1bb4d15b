import json
import socket
import time
from datetime import timedelta

import pytest
import requests
import responses
from django.core.cache import cache
from django.utils import timezone

from oauthproxy.authserver.cimd import ClientMetadataDocumentError, client_id_is_metadata_url, client_resolve
from oauthproxy.authserver.registration import RegistrationLimitReached
from oauthproxy.console.clients import client_delete, client_update
from oauthproxy.core import http as core_http
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import AuditEvent, Client
from tests.factories import make_client

URL = "https://app.example.com/oauth/client-metadata.json"


def document(**overrides) -> dict:
    doc = {
        "client_id": URL,
        "client_name": "Example App",
        "client_uri": "https://app.example.com",
        "redirect_uris": ["http://127.0.0.1/callback", "https://app.example.com/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.fixture
def http():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def serve(http, body=None, *, status=200, cache_control="max-age=600", content_type="application/json", url=URL):
    headers = {"Cache-Control": cache_control} if cache_control else {}
    payload = body if isinstance(body, (str, bytes)) else json.dumps(document() if body is None else body)
    http.add(responses.GET, url, body=payload, status=status, headers=headers, content_type=content_type)


@pytest.mark.django_db
class TestFirstSight:
    def test_document_becomes_a_public_client_of_this_server(self, http, server):
        serve(http)
        client = client_resolve(server=server, client_id=URL)
        assert client.pk and client.server == server
        assert client.client_id == URL
        assert client.registration_source == Client.RegistrationSource.CIMD
        assert client.client_type == Client.CLIENT_PUBLIC
        assert client.token_endpoint_auth_method == "none"
        assert client.authorization_grant_type == Client.GRANT_AUTHORIZATION_CODE
        assert client.name == "Example App"
        assert client.redirect_uris.split() == document()["redirect_uris"]
        assert client.metadata["client_uri"] == "https://app.example.com"
        assert client.verified_domain == "app.example.com"
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CLIENT_REGISTERED, client=client).exists()
        request = http.calls[0].request
        assert request.headers["Accept"] == "application/json"

    def test_auth_method_may_be_absent(self, http, server):
        serve(http, document(token_endpoint_auth_method=None, grant_types=None, response_types=None))
        assert client_resolve(server=server, client_id=URL).client_type == Client.CLIENT_PUBLIC

    def test_one_url_is_one_client_per_server(self, http, server, server_factory):
        other = server_factory(slug="billing", name="Billing")
        serve(http)
        here, there = client_resolve(server=server, client_id=URL), client_resolve(server=other, client_id=URL)
        assert here.pk != there.pk
        assert (here.server, there.server) == (server, other)
        assert Client.objects.filter(client_id=URL).count() == 2

    def test_cap_applies(self, http, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "MAX_REGISTRATIONS_PER_SERVER": 1}
        serve(http)
        serve(http, document(client_id=URL + "?v=2"), url=URL + "?v=2")
        client_resolve(server=server, client_id=URL)
        with pytest.raises(RegistrationLimitReached):
            client_resolve(server=server, client_id=URL + "?v=2")


@pytest.mark.django_db
class TestCaching:
    def test_fresh_documents_are_not_refetched(self, http, server):
        serve(http)
        first = client_resolve(server=server, client_id=URL)
        second = client_resolve(server=server, client_id=URL)
        assert first.pk == second.pk
        assert len(http.calls) == 1

    @pytest.mark.parametrize(
        ("cache_control", "seconds"),
        [
            ("public, max-age=600", 600),
            ("max-age=5", 300),  # DOT's CIMD_METADATA_MIN_AGE_SECONDS floor
            ("max-age=99999999", 86400),  # and CIMD_METADATA_MAX_AGE_SECONDS ceiling
            ("no-store", 300),
            (None, 86400),
        ],
    )
    def test_lifetime_follows_cache_control(self, http, server, cache_control, seconds):
        serve(http, cache_control=cache_control)
        client = client_resolve(server=server, client_id=URL)
        expected = timezone.now() + timedelta(seconds=seconds)
        assert abs((client.cimd_expires_at - expected).total_seconds()) < 30

    def test_stale_documents_are_refetched_and_changes_applied(self, http, server):
        serve(http)
        client = client_resolve(server=server, client_id=URL)
        Client.objects.filter(pk=client.pk).update(cimd_expires_at=timezone.now() - timedelta(seconds=1))
        http.replace(responses.GET, URL, json=document(redirect_uris=["https://app.example.com/new"]))
        refreshed = client_resolve(server=server, client_id=URL)
        assert refreshed.pk == client.pk
        assert refreshed.redirect_uris == "https://app.example.com/new"
        assert refreshed.cimd_expires_at > timezone.now()
        assert len(http.calls) == 2
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.CLIENT_UPDATED, client=client).exists()

    def test_failed_refresh_keeps_the_last_good_document(self, http, server):
        serve(http)
        client = client_resolve(server=server, client_id=URL)
        Client.objects.filter(pk=client.pk).update(cimd_expires_at=timezone.now() - timedelta(seconds=1))
        http.replace(responses.GET, URL, status=503)
        kept = client_resolve(server=server, client_id=URL)
        assert kept.pk == client.pk and kept.redirect_uris == client.redirect_uris
        client_resolve(server=server, client_id=URL)  # backed off: no new fetch
        assert len(http.calls) == 2

    def test_failures_are_backed_off(self, http, server):
        serve(http, status=404)
        for _ in range(3):
            with pytest.raises(ClientMetadataDocumentError, match="HTTP 404"):
                client_resolve(server=server, client_id=URL)
        assert len(http.calls) == 1
        cache.clear()
        with pytest.raises(ClientMetadataDocumentError):
            client_resolve(server=server, client_id=URL)
        assert len(http.calls) == 2


@pytest.mark.django_db
class TestValidation:
    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (document(client_id="https://app.example.com/other.json"), "must equal the URL"),
            (document(client_id=URL + "/"), "must equal the URL"),
            (document(client_id=None), "must equal the URL"),
            (document(token_endpoint_auth_method="client_secret_basic"), '"none" or "private_key_jwt"'),
            (document(token_endpoint_auth_method="private_key_jwt"), "needs jwks_uri or jwks"),
            (document(token_endpoint_auth_method="client_secret_basic",
                      token_endpoint_auth_methods_supported=["client_secret_post"]), '"none" or "private_key_jwt"'),
            (document(client_secret="s3cret"), "client_secret"),
            (document(client_secret_expires_at=0), "client_secret"),
            (document(redirect_uris=None), "redirect_uris"),
            (document(redirect_uris=[]), "redirect_uris"),
            (document(redirect_uris=["http://app.example.com/cb"]), "non-loopback"),
            (document(redirect_uris=["javascript:alert(1)"]), "javascript"),
            (document(redirect_uris=["https://app.example.com/cb#x"]), "fragment"),
            (document(grant_types=["client_credentials"]), "authorization_code"),
            (document(client_name=["not", "a", "string"]), "client_name"),
            (["a", "list"], "JSON object"),
            ("{not json", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
        ],
    )
    def test_bad_documents_are_refused_with_a_reason(self, http, server, body, reason):
        serve(http, body)
        with pytest.raises(ClientMetadataDocumentError) as info:
            client_resolve(server=server, client_id=URL)
        assert info.value.error == "invalid_client"
        assert reason in info.value.description
        assert not Client.objects.exists()

    def test_wrong_content_type(self, http, server):
        serve(http, content_type="text/html")
        with pytest.raises(ClientMetadataDocumentError, match="application/json"):
            client_resolve(server=server, client_id=URL)

    def test_structured_json_content_type_is_fine(self, http, server):
        serve(http, content_type="application/client-metadata+json; charset=utf-8")
        assert client_resolve(server=server, client_id=URL)

    def test_size_is_bounded(self, http, server):
        serve(http, document(client_uri="https://app.example.com/" + "x" * 20000))
        with pytest.raises(ClientMetadataDocumentError, match="larger than"):
            client_resolve(server=server, client_id=URL)

    @pytest.mark.parametrize("status", [301, 302, 307, 308])
    def test_redirects_are_not_followed(self, http, server, status):
        http.add(responses.GET, URL, status=status, headers={"Location": "https://evil.example/doc.json"})
        with pytest.raises(ClientMetadataDocumentError, match="redirect"):
            client_resolve(server=server, client_id=URL)
        assert len(http.calls) == 1

    def test_network_failure(self, http, server):
        http.add(responses.GET, URL, body=requests.ConnectionError("boom"))
        with pytest.raises(ClientMetadataDocumentError, match="could not be fetched"):
            client_resolve(server=server, client_id=URL)

    def test_timeout(self, http, server):
        http.add(responses.GET, URL, body=requests.Timeout())
        with pytest.raises(ClientMetadataDocumentError, match="timed out"):
            client_resolve(server=server, client_id=URL)

    @pytest.mark.parametrize(
        "url",
        [
            "https://app.example.com/a/../client.json",
            "https://user@app.example.com/client.json",
            "https://app.example.com/client.json#frag",
            "https://app.example.com:99999/client.json",
        ],
    )
    def test_unacceptable_urls_are_never_fetched(self, http, server, url):
        with pytest.raises(ClientMetadataDocumentError, match="not acceptable"):
            client_resolve(server=server, client_id=url)
        assert not http.calls


@pytest.mark.django_db
class TestPlainClientIds:
    def test_lookup_is_per_server(self, server, server_factory):
        other = server_factory(slug="billing", name="Billing")
        client = Client.objects.create(
            server=server, client_type=Client.CLIENT_PUBLIC,
            authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE, redirect_uris="https://a.example/cb",
        )
        assert client_resolve(server=server, client_id=client.client_id) == client
        assert client_resolve(server=other, client_id=client.client_id) is None

    @pytest.mark.parametrize(
        "client_id",
        ["unknown", "", None, 42, "x" * 300, "abc\x00def", "https://app.example.com", "https://" + "a" * 300 + "/x"],
    )
    def test_unknown_or_odd_ids_are_none(self, http, server, client_id):
        assert client_resolve(server=server, client_id=client_id) is None
        assert not http.calls

    def test_operator_provisioned_url_client_is_never_taken_over(self, http, server):
        manual = Client.objects.create(
            server=server, client_id=URL, client_type=Client.CLIENT_PUBLIC,
            authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE, redirect_uris="https://a.example/cb",
        )
        assert client_resolve(server=server, client_id=URL) == manual
        assert not http.calls


@pytest.fixture
def public_addresses_only(settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CIMD_ALLOW_PRIVATE_ADDRESSES": False}


def fake_dns(monkeypatch, answers: dict[str, list[str]]):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            return [
                (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in answers[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.django_db
@pytest.mark.usefixtures("public_addresses_only")
class TestSsrfGuard:
    """No ``responses`` here: these go through the real connection code, which refuses before connecting."""

    @pytest.mark.parametrize(
        "url",
        [
            "https://127.0.0.1/client.json",
            "https://localhost/client.json",
            "https://[::1]/client.json",
            "https://10.1.2.3/client.json",
            "https://192.168.0.10:8443/client.json",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::ffff:169.254.169.254]/client.json",
            "https://[64:ff9b::a9fe:a9fe]/client.json",
        ],
    )
    def test_private_addresses_are_refused(self, server, url):
        with pytest.raises(ClientMetadataDocumentError, match="non-public address"):
            client_resolve(server=server, client_id=url)

    def test_a_name_resolving_to_a_private_address_is_refused(self, server, monkeypatch):
        fake_dns(monkeypatch, {"app.example.com": ["10.0.0.5"]})
        with pytest.raises(ClientMetadataDocumentError, match="non-public address"):
            client_resolve(server=server, client_id=URL)

    def test_one_private_address_among_public_ones_refuses_the_host(self, server, monkeypatch):
        fake_dns(monkeypatch, {"app.example.com": ["93.184.215.14", "127.0.0.1"]})
        with pytest.raises(ClientMetadataDocumentError, match="non-public address"):
            client_resolve(server=server, client_id=URL)

    def test_the_checked_address_is_the_one_connected_to(self, server, monkeypatch):
        fake_dns(monkeypatch, {"app.example.com": ["93.184.215.14"]})
        connected = []

        def create_connection(address, *args, **kwargs):
            connected.append(address)
            raise OSError("no network in tests")

        monkeypatch.setattr(core_http, "create_connection", create_connection)
        with pytest.raises(ClientMetadataDocumentError, match="could not be fetched"):
            client_resolve(server=server, client_id=URL)
        assert connected == [("93.184.215.14", 443)]

    def test_http_urls_are_not_metadata_documents(self, server):
        assert not client_id_is_metadata_url("http://app.example.com/client.json")
        assert client_resolve(server=server, client_id="http://app.example.com/client.json") is None


def test_http_and_private_addresses_only_when_allowed(settings):
    assert settings.OAUTHPROXY["CIMD_ALLOW_PRIVATE_ADDRESSES"]  # the test settings
    assert client_id_is_metadata_url("http://127.0.0.1:8000/client.json")
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CIMD_ALLOW_PRIVATE_ADDRESSES": False}
    assert not client_id_is_metadata_url("http://127.0.0.1:8000/client.json")
    assert client_id_is_metadata_url(URL)
    assert not client_id_is_metadata_url("https://app.example.com")


@pytest.mark.django_db
class TestClientCache:
    """``client_resolve`` keeps client rows per process for a few seconds (``caching.clients``)."""

    def test_a_repeat_lookup_needs_no_query(self, server, django_assert_num_queries):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        with django_assert_num_queries(0):
            again = client_resolve(server=server, client_id=client.client_id)
        assert again.pk == client.pk
        assert again.server == server and again.is_usable(None)

    def test_an_id_looked_up_before_its_client_existed_is_found_at_once(self, server, django_assert_num_queries):
        assert client_resolve(server=server, client_id="registered-later") is None
        with django_assert_num_queries(0):
            assert client_resolve(server=server, client_id="registered-later") is None
        created = make_client(server, client_id="registered-later")
        assert client_resolve(server=server, client_id="registered-later").pk == created.pk

    def test_each_caller_gets_its_own_copy(self, server):
        client = make_client(server)
        first = client_resolve(server=server, client_id=client.client_id)
        first.name, first.redirect_uris, first.disabled = "changed", "https://evil.example/cb", True
        first.metadata["client_name"] = "changed too"
        second = client_resolve(server=server, client_id=client.client_id)
        assert (second.name, second.redirect_uris, second.disabled) == (client.name, client.redirect_uris, False)
        assert second.metadata == {"client_name": client.name}

    def test_the_client_carries_the_callers_server(self, server):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        server.enabled = False  # the caller's (fresh) server, e.g. just disabled
        assert not client_resolve(server=server, client_id=client.client_id).is_usable(None)

    def test_a_client_disabled_in_this_process_is_refused_at_once(self, server):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        client_update(client=client, actor=None, disabled=True)
        assert not client_resolve(server=server, client_id=client.client_id).is_usable(None)

    def test_a_changed_client_is_seen_at_once(self, server):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        client.redirect_uris = "https://app.example/new-callback"
        client.save()
        seen = client_resolve(server=server, client_id=client.client_id)
        assert seen.redirect_uris == "https://app.example/new-callback"

    def test_a_deleted_client_is_unknown_at_once(self, server):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        client_delete(client=client, actor=None)
        assert client_resolve(server=server, client_id=client.client_id) is None

    def test_a_client_disabled_by_another_process_is_refused_once_the_ttl_passed(self, server, monkeypatch):
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        Client.objects.filter(pk=client.pk).update(disabled=True)  # another process: no signal reaches this one
        now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: now + proxy_settings.CLIENT_CACHE_SECONDS + 0.1)
        assert not client_resolve(server=server, client_id=client.client_id).is_usable(None)

    def test_no_cache_with_a_ttl_of_zero(self, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CLIENT_CACHE_SECONDS": 0}
        client = make_client(server)
        client_resolve(server=server, client_id=client.client_id)
        Client.objects.filter(pk=client.pk).update(disabled=True)
        assert not client_resolve(server=server, client_id=client.client_id).is_usable(None)

    def test_a_cached_client_never_outlives_its_metadata_document(self, http, server, monkeypatch):
        serve(http)  # max-age=600
        client = client_resolve(server=server, client_id=URL)
        client_resolve(server=server, client_id=URL)  # now served from the cache
        assert len(http.calls) == 1
        http.replace(responses.GET, URL, json=document(redirect_uris=["https://app.example.com/new"]))
        after_expiry = client.cimd_expires_at + timedelta(seconds=1)
        monkeypatch.setattr(timezone, "now", lambda: after_expiry)
        refreshed = client_resolve(server=server, client_id=URL)
        assert len(http.calls) == 2
        assert refreshed.redirect_uris == "https://app.example.com/new"

    def test_a_document_refresh_never_undoes_a_change_made_by_another_process(self, http, server, monkeypatch):
        serve(http)
        client = client_resolve(server=server, client_id=URL)
        client_resolve(server=server, client_id=URL)  # now served from the cache
        Client.objects.filter(pk=client.pk).update(disabled=True)  # an admin, in another process
        after_expiry = client.cimd_expires_at + timedelta(seconds=1)
        monkeypatch.setattr(timezone, "now", lambda: after_expiry)
        refreshed = client_resolve(server=server, client_id=URL)
        assert len(http.calls) == 2
        assert refreshed.disabled and Client.objects.get(pk=client.pk).disabled
