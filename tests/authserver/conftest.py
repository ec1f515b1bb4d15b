"""Fixtures shared by the authorization server tests."""

import pytest
from django.core.cache import cache
from django.test import Client as HttpClient

from tests.flows.helpers import make_client


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Rate-limit windows, quota counters, failure backoffs, cached upstream discovery, JWKS and metadata
    documents (all in the cache) start empty in every test."""
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def browser() -> HttpClient:
    """A browser of its own (cookies kept), separate from pytest-django's ``client``."""
    return HttpClient()


@pytest.fixture
def mcp_client(server):
    """An MCP client registered at the ``server`` fixture, as DCR creates it."""
    return make_client(server)
