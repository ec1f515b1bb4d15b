"""Per-client quotas on upstream-touching operations (shared-quota protection)."""

import pytest
from django.core.cache import cache

from oauthproxy.core.exceptions import RateLimited, oauth_error_response
from oauthproxy.grants import quotas
from oauthproxy.grants.quotas import QuotaExceeded, quota_consume, quota_limits, quota_usage
from oauthproxy.models import AuditEvent
from tests.factories import make_client

NOON = 1_800_000_000 - (1_800_000_000 % 86400) + 12 * 3600  # a UTC noon, at the start of a minute


@pytest.fixture(autouse=True)
def clean_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def clock(monkeypatch):
    class Clock:
        now = float(NOON)

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(quotas.time, "time", fake)
    return fake


@pytest.fixture
def limited(server_factory):
    server = server_factory(client_upstream_rate_limit=3, client_upstream_daily_quota=5)
    return make_client(server)


@pytest.mark.django_db
class TestQuotaConsume:
    def test_counts_until_the_minute_limit_then_refuses_with_429(self, limited, clock):
        for _ in range(3):
            quota_consume(client=limited, operation="authorize")
        with pytest.raises(QuotaExceeded) as info:
            quota_consume(client=limited, operation="refresh")
        exc = info.value
        assert isinstance(exc, RateLimited) and exc.status == 429
        assert exc.as_dict()["error"] == "temporarily_unavailable"  # valid in an authorization error redirect
        response = oauth_error_response(exc)
        assert response.status_code == 429 and response["Retry-After"] == str(exc.retry_after)
        assert exc.window == "minute" and exc.limit == 3 and exc.operation == "refresh"
        assert 0 < exc.retry_after <= 60
        assert "3 upstream operations per minute" in exc.description

    def test_a_refused_operation_spends_nothing_and_is_counted_as_refused(self, limited, clock):
        for _ in range(3):
            quota_consume(client=limited, operation="authorize")
        for _ in range(2):
            with pytest.raises(QuotaExceeded):
                quota_consume(client=limited, operation="refresh")
        minute, day = quota_usage(client=limited)
        assert (minute.window, minute.used, minute.rejected, minute.limit) == ("minute", 3, 2, 3)
        assert minute.by_operation == {"authorize": 3, "refresh": 0}
        assert minute.remaining == 0
        assert (day.window, day.used, day.limit, day.remaining) == ("day", 3, 5, 2)

    def test_the_next_minute_has_a_fresh_budget_but_the_day_quota_holds(self, limited, clock):
        for _ in range(3):
            quota_consume(client=limited, operation="authorize")
        clock.now += 60
        quota_consume(client=limited, operation="refresh")
        quota_consume(client=limited, operation="refresh")
        with pytest.raises(QuotaExceeded) as info:
            quota_consume(client=limited, operation="refresh")
        assert info.value.window == "day" and info.value.limit == 5
        assert info.value.retry_after == 12 * 3600 - 60  # until the end of the UTC day
        clock.now += 12 * 3600
        quota_consume(client=limited, operation="authorize")  # a new day

    def test_clients_do_not_share_a_budget(self, limited, clock):
        other = make_client(limited.server, name="Another client")
        for _ in range(3):
            quota_consume(client=limited, operation="authorize")
        with pytest.raises(QuotaExceeded):
            quota_consume(client=limited, operation="authorize")
        quota_consume(client=other, operation="authorize")  # unaffected
        assert quota_usage(client=other)[0].used == 1

    def test_the_first_refusal_of_a_window_is_audited_once(self, limited, clock):
        for _ in range(3):
            quota_consume(client=limited, operation="authorize")
        for _ in range(4):
            with pytest.raises(QuotaExceeded):
                quota_consume(client=limited, operation="authorize")
        events = AuditEvent.objects.filter(kind=AuditEvent.Kind.QUOTA_EXCEEDED)
        assert events.count() == 1
        event = events.get()
        assert event.client == limited and event.server == limited.server
        assert event.detail == {"operation": "authorize", "window": "minute", "limit": 3}

    def test_zero_means_unlimited(self, server_factory, clock):
        client = make_client(server_factory(client_upstream_rate_limit=0, client_upstream_daily_quota=0))
        for _ in range(500):
            quota_consume(client=client, operation="refresh")
        assert quota_usage(client=client)[0].used == 500
        assert quota_usage(client=client)[0].remaining is None

    def test_unknown_operations_are_a_programming_error(self, limited):
        with pytest.raises(ValueError):
            quota_consume(client=limited, operation="userinfo")


@pytest.mark.django_db
class TestQuotaLimits:
    def test_defaults_apply_when_the_server_sets_none(self, server):
        assert quota_limits(server=server) == {"minute": 120, "day": 20000}

    def test_settings_override_the_defaults_and_servers_override_settings(self, server, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CLIENT_UPSTREAM_PER_MINUTE": 7}
        assert quota_limits(server=server) == {"minute": 7, "day": 20000}
        server.client_upstream_daily_quota = 9
        assert quota_limits(server=server) == {"minute": 7, "day": 9}

    def test_settings_limits_are_enforced(self, server, settings, clock):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CLIENT_UPSTREAM_PER_MINUTE": 1, "CLIENT_UPSTREAM_PER_DAY": 100}
        client = make_client(server)
        quota_consume(client=client, operation="authorize")
        with pytest.raises(QuotaExceeded):
            quota_consume(client=client, operation="authorize")


# -- wiring: the two upstream-touching operations spend the quota ------------------------------------


@pytest.mark.django_db
def test_authorize_over_quota_sends_the_client_back_with_its_state(client, server_factory):
    from tests.flows.helpers import DEFAULT_STATE, approve_consent, query_of, start_authorization

    server = server_factory(client_upstream_rate_limit=1)
    mcp_client = make_client(server)
    first = approve_consent(client, start_authorization(client, server, mcp_client))
    assert first.status_code == 302 and first["Location"].startswith(server.authorization_endpoint)

    second = approve_consent(client, start_authorization(client, server, mcp_client))
    assert second.status_code == 302
    params = query_of(second["Location"])
    assert "error=temporarily_unavailable" in second["Location"], params
    assert second["Location"].startswith(mcp_client.redirect_uris.split()[0])
    assert DEFAULT_STATE in second["Location"]


@pytest.mark.django_db
def test_refresh_over_quota_keeps_the_session_and_asks_to_retry(client, server_factory):
    import responses
    from django.utils import timezone

    from oauthproxy.models import UpstreamSession
    from tests.factories import issue_tokens, refresh

    server = server_factory(client_upstream_rate_limit=1)
    mcp_client = make_client(server)
    tokens = issue_tokens(client, server, mcp_client, expires_in=-1)  # upstream token already expired
    with responses.RequestsMock() as upstream:
        upstream.add(responses.POST, server.token_endpoint,
                     json={"access_token": "up-2", "refresh_token": "up-r2", "expires_in": 30})
        first = refresh(client, server, mcp_client, tokens["refresh_token"])
        assert first.status_code == 200, first.content
        # Due but still valid: over quota, the current upstream token keeps serving.
        middle = refresh(client, server, mcp_client, first.json()["refresh_token"])
        assert middle.status_code == 200
        UpstreamSession.objects.filter(pk=tokens["session"].pk).update(expires_at=timezone.now())
        second = refresh(client, server, mcp_client, middle.json()["refresh_token"])
        assert len(upstream.calls) == 1  # the second refresh never reached the upstream
    assert second.status_code == 503
    assert second.json()["error"] == "temporarily_unavailable"
    assert UpstreamSession.objects.get(pk=tokens["session"].pk).revoked_at is None
