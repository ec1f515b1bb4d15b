"""No lockouts by strangers (issue 13, finding 3): a stranger's 1,000 junk requests naming a victim's
client_id (500 bare authorize requests, 500 junk token posts) spend the stranger's own budget only; the
victim's valid authorization and refresh go through."""

import pytest
from django.core.cache import cache
from django.test import Client as HttpClient

from tests.factories import issue_tokens, refresh, token_post
from tests.flows.helpers import authorize, make_client

pytestmark = pytest.mark.django_db

STRANGER, VICTIM = "203.0.113.9", "198.51.100.7"


def test_a_strangers_junk_leaves_the_victims_flows_untouched(server, settings):
    cache.clear()
    # Per-client budgets below the stranger's 500 + 500 junk: before the fix junk filled them.
    limits = {"authorize:client": (100, 60), "token:client": (400, 60)}
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": limits}
    victim = make_client(server, name="Victim app")
    victim_http = HttpClient(REMOTE_ADDR=VICTIM)
    tokens = issue_tokens(victim_http, server, victim)
    stranger = HttpClient(REMOTE_ADDR=STRANGER)

    authorize_statuses = [
        stranger.get(f"/oauth/{server.slug}/authorize", {"client_id": victim.client_id}).status_code
        for _ in range(500)
    ]
    junk = {"grant_type": "refresh_token", "refresh_token": "junk", "client_id": victim.client_id,
            "client_secret": "wrong"}
    token_statuses = [token_post(stranger, server, junk).status_code for _ in range(500)]
    assert 429 in authorize_statuses and 429 not in authorize_statuses[:100]  # limited on their own budget
    assert set(token_statuses) <= {400, 401, 429}

    assert authorize(victim_http, server, victim).status_code == 302
    refreshed = refresh(victim_http, server, victim, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.content


def test_the_clients_own_limit_still_holds_for_valid_requests(server, settings):
    cache.clear()
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"authorize:client": (2, 60)}}
    victim = make_client(server)
    statuses = [authorize(HttpClient(REMOTE_ADDR=f"192.0.2.{n}"), server, victim).status_code for n in range(1, 4)]
    assert statuses == [302, 302, 429]  # valid requests from many addresses share the client's budget
