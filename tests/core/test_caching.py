"""The per-process server cache: fresh after a change in this process, private copies per request."""

import pytest

from oauthproxy.core.caching import MISS
from oauthproxy.core.servers import server_get_enabled, server_view_cached, server_view_load

pytestmark = pytest.mark.django_db


def test_a_disabled_server_is_gone_at_once_in_the_process_that_disabled_it(server, client):
    assert server_get_enabled(slug=server.slug) is not None
    server.enabled = False
    server.save()
    assert server_get_enabled(slug=server.slug) is None
    response = client.post(f"/oauth/{server.slug}/token", {"grant_type": "refresh_token"})
    assert response.status_code == 404


def test_a_new_server_is_found_at_once_after_an_unknown_slug_was_cached(server_factory):
    assert server_get_enabled(slug="fresh") is None
    server_factory(slug="fresh")
    assert server_get_enabled(slug="fresh").slug == "fresh"


def test_a_deleted_server_is_gone_at_once(server):
    assert server_get_enabled(slug=server.slug) is not None
    server.delete()
    assert server_get_enabled(slug=server.slug) is None


def test_each_caller_gets_its_own_copy(server):
    first = server_get_enabled(slug=server.slug)
    first.name = "changed by one request"
    assert server_get_enabled(slug=server.slug).name == server.name


def test_the_cached_row_serves_repeat_lookups_without_a_query(server, django_assert_num_queries):
    server_get_enabled(slug=server.slug)
    with django_assert_num_queries(0):
        assert server_get_enabled(slug=server.slug).pk == server.pk


def test_the_gateway_reads_the_same_server_cache(server, django_assert_num_queries):
    """One server cache: a row loaded for the OAuth endpoints serves the gateway's view without a query,
    and a save drops both at once."""
    made = []

    def view(instance):
        made.append(instance.slug if instance else None)
        return ("view", instance.slug if instance else None)

    assert server_view_cached(slug=server.slug, make=view) is MISS
    server_get_enabled(slug=server.slug)
    with django_assert_num_queries(0):
        assert server_view_cached(slug=server.slug, make=view) == ("view", server.slug)
        assert server_view_cached(slug=server.slug, make=view) == ("view", server.slug)
    assert made == [server.slug]  # made once per cached row
    server.enabled = False
    server.save()
    assert server_view_cached(slug=server.slug, make=view) is MISS
    assert server_view_load(slug=server.slug, make=view) == ("view", None)
