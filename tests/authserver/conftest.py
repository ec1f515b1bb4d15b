"""Fixtures shared by the browser-facing view tests (authorize, consent, callback)."""

import pytest
from django.test import Client as HttpClient

from tests.flows.helpers import make_client


@pytest.fixture
def browser() -> HttpClient:
    """A browser of its own (cookies kept), separate from pytest-django's ``client``."""
    return HttpClient()


@pytest.fixture
def mcp_client(server):
    """An MCP client registered at the ``server`` fixture, as DCR creates it."""
    return make_client(server)
