import pytest
import responses
from django.conf import settings
from django.contrib.auth.models import User

from oauthproxy.authserver.tokens import _recently_touched
from oauthproxy.core.caching import client_cache_clear, server_cache_clear
from oauthproxy.core.destinations import destination_policies_clear
from oauthproxy.models import McpServer

UPSTREAM = "https://idp.example.com"


def make_server(**overrides) -> McpServer:
    values = dict(
        slug="crm",
        name="CRM tools",
        mcp_url="http://crm.internal:8080/mcp",
        authorization_endpoint=f"{UPSTREAM}/authorize",
        token_endpoint=f"{UPSTREAM}/token",
        client_id="proxy-client",
        client_secret="upstream-secret-value-123",
        scopes=["openid", "email", "offline_access"],
    )
    values.update(overrides)
    server = McpServer(**values)
    server.full_clean()
    server.save()
    return server


def pytest_collection_modifyitems(config, items):
    """On SQLite (``make test``'s second run, ``make run``'s database) the tests marked ``postgres`` are
    skipped: they need PostgreSQL's concurrency or start PostgreSQL deployments."""
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _per_process_caches_cleared():
    """Each test's database is rolled back; a server or client cached by an earlier test must not outlive it
    (nor the record of a row's ``last_used`` stamp: SQLite hands a rolled-back primary key out again)."""
    server_cache_clear()
    client_cache_clear()
    destination_policies_clear()
    _recently_touched.clear()
    yield
    server_cache_clear()
    client_cache_clear()
    destination_policies_clear()
    _recently_touched.clear()


@pytest.fixture
def operator(db):
    """A platform admin (superuser), the actor of audited console actions."""
    return User.objects.create_superuser("ops", password="pw")


@pytest.fixture
def server(db) -> McpServer:
    return make_server()


@pytest.fixture
def server_factory(db):
    return make_server


@pytest.fixture
def upstream():
    """The upstream IdP at the HTTP boundary: unregistered URLs fail like an unreachable host."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock
