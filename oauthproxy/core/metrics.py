"""Prometheus metrics, served at ``BASE/metrics`` (DESIGN §2) by ``views.metrics``.

The metric objects and one small function per thing counted. Callers pass plain values; the functions
bound every label to a small known set, so a client cannot grow the number of series:

- ``server``: the slug of a configured server (admin-controlled). Pass ``None`` when the request named a
  server that does not exist: it is counted as ``unknown``, never under the slug the caller made up. As a
  second line of defence a process labels at most ``MAX_SERVER_LABELS`` distinct slugs (then ``other``).
- no client IDs (unbounded with open registration), and never a token, secret, code or subject.

Multi-process: uvicorn runs several workers, each with its own counters. With ``PROMETHEUS_MULTIPROC_DIR``
set (in the environment of every worker, before it starts; an empty directory, wiped at each deployment
start) prometheus_client keeps the values in files there and ``/metrics`` adds up all workers. Without it,
each process serves its own values (fine for one worker; with several, a scrape sees one worker's).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNKNOWN = "unknown"
MAX_SERVER_LABELS = 1000
_server_labels: set[str] = set()

# Label values outside these sets are folded into one value.
GRANT_TYPES = frozenset({"authorization_code", "refresh_token"})
OAUTH_ERRORS = frozenset({
    "invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type",
    "invalid_scope", "invalid_target", "invalid_token", "access_denied", "invalid_client_metadata",
    "invalid_redirect_uri", "temporarily_unavailable", "server_error", "slow_down", "not_found",
})
AUTHORIZATION_FAILURES = frozenset({
    "consent_denied",  # the user refused on the proxy's consent page
    "upstream_denied",  # the user refused or cancelled at the upstream (error=access_denied)
    "upstream_error",  # any other error the upstream redirected back with, or an unusable callback
    "code_exchange",  # the upstream token endpoint (or learning the subject) failed
    "expired",  # the user came back after the upstream state expired
    "client_disabled",  # the client was disabled while the user was at the upstream
    "quota",  # the client is over its share of the upstream quota
    "access_denied",  # the server's access policy does not admit the user
})
UPSTREAM_KINDS = {  # UpstreamClient's names for its calls -> label
    "code exchange": "code_exchange",
    "token refresh": "refresh",
    "revocation": "revoke",
    "userinfo": "userinfo",
    "upstream discovery": "discovery",
    "jwks": "jwks",
}
GATEWAY_METHODS = frozenset({"GET", "POST", "DELETE", "OPTIONS", "HEAD"})

TOKEN_REQUESTS = Counter(
    "oauthproxy_token_requests",
    "Token endpoint requests by grant type and outcome (issued, replayed, or the OAuth error code).",
    ["server", "grant_type", "outcome"],
)
AUTHORIZATIONS_STARTED = Counter(
    "oauthproxy_authorizations_started",
    "Authorization requests that passed validation (the user is on the consent page or on the way upstream).",
    ["server"],
)
AUTHORIZATIONS_COMPLETED = Counter(
    "oauthproxy_authorizations_completed",
    "Authorizations that ended with a proxy authorization code sent to the client.",
    ["server"],
)
AUTHORIZATIONS_FAILED = Counter(
    "oauthproxy_authorizations_failed",
    "Authorizations that ended with an error sent to the client or shown to the user, by reason.",
    ["server", "reason"],
)
UPSTREAM_REQUESTS = Counter(
    "oauthproxy_upstream_requests",
    "Calls to upstream identity providers by kind and outcome (HTTP status class, timeout, connection_error).",
    ["server", "kind", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "oauthproxy_upstream_request_duration_seconds",
    "Time until an upstream identity provider answered (response headers), by kind of call.",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
REGISTRATIONS = Counter(
    "oauthproxy_registrations",
    "Dynamic client registrations (RFC 7591) by outcome (created, or the OAuth error code).",
    ["server", "outcome"],
)
GATEWAY_REQUESTS = Counter(
    "oauthproxy_gateway_requests",
    "Requests to the MCP gateway /mcp/<slug> by server, HTTP method and response status.",
    ["server", "method", "status"],
)
GATEWAY_TOOLS_REFUSED = Counter(
    "oauthproxy_gateway_tool_calls_refused",
    "tools/call requests the gateway refused under the server's tool policy (never sent to the internal server).",
    ["server"],
)
IDENTITY_ASSERTIONS = Counter(
    "oauthproxy_identity_assertions_issued",
    "X-Identity-Assertion JWTs signed for forwarded requests (a cached assertion is counted once).",
    ["server"],
)
GATEWAY_LATENCY = Histogram(
    "oauthproxy_gateway_request_duration_seconds",
    "Time until the gateway sent its response headers (streams then stay open as long as they last).",
    ["server"],
    buckets=LATENCY_BUCKETS,
)


def _server(slug: str | None) -> str:
    if not slug:
        return UNKNOWN
    if slug not in _server_labels:
        if len(_server_labels) >= MAX_SERVER_LABELS:
            return "other"
        _server_labels.add(slug)
    return slug


def _error(code: str | None) -> str:
    return code if code in OAUTH_ERRORS else "other_error"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


# -- recording -------------------------------------------------------------------------------------

def token_request_record(*, server: str, grant_type: str | None, outcome: str) -> None:
    """``outcome``: ``issued``, ``replayed`` (a duplicate refresh inside the grace window) or an OAuth
    error code."""
    if grant_type in GRANT_TYPES:
        grant_label = grant_type
    else:
        grant_label = "other" if grant_type else "none"
    outcome_label = outcome if outcome in ("issued", "replayed") else _error(outcome)
    TOKEN_REQUESTS.labels(server=_server(server), grant_type=grant_label, outcome=outcome_label).inc()


def authorization_started(*, server: str) -> None:
    AUTHORIZATIONS_STARTED.labels(server=_server(server)).inc()


def authorization_completed(*, server: str) -> None:
    AUTHORIZATIONS_COMPLETED.labels(server=_server(server)).inc()


def authorization_failed(*, server: str, reason: str) -> None:
    AUTHORIZATIONS_FAILED.labels(
        server=_server(server), reason=reason if reason in AUTHORIZATION_FAILURES else "other"
    ).inc()


def upstream_request_record(*, server: str | None, what: str, outcome: str, seconds: float) -> None:
    """One call to an upstream; ``what`` is UpstreamClient's name for it, ``outcome`` a status class
    (``2xx``...) or ``timeout`` / ``connection_error`` / ``error``."""
    kind = UPSTREAM_KINDS.get(what, "other")
    UPSTREAM_REQUESTS.labels(server=_server(server), kind=kind, outcome=outcome).inc()
    UPSTREAM_LATENCY.labels(kind=kind).observe(seconds)


def registration_record(*, server: str, outcome: str) -> None:
    """``outcome``: ``created`` or an OAuth error code."""
    REGISTRATIONS.labels(server=_server(server), outcome=outcome if outcome == "created" else _error(outcome)).inc()


def gateway_request_record(*, server: str | None, method: str, status: int, seconds: float) -> None:
    """One gateway request once its response started. ``server``: the slug of an existing server, else
    ``None``; ``seconds``: from the request's arrival to the response headers."""
    slug = _server(server)
    method = method.upper() if method and method.upper() in GATEWAY_METHODS else "other"
    status_label = str(status) if 100 <= status <= 599 else "other"
    GATEWAY_REQUESTS.labels(server=slug, method=method, status=status_label).inc()
    GATEWAY_LATENCY.labels(server=slug).observe(seconds)


def gateway_tool_refused(*, server: str) -> None:
    GATEWAY_TOOLS_REFUSED.labels(server=_server(server)).inc()


def identity_assertion_issued(*, server: str) -> None:
    IDENTITY_ASSERTIONS.labels(server=_server(server)).inc()


# -- exposition ------------------------------------------------------------------------------------

def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def metrics_exposition() -> tuple[bytes, str]:
    """The Prometheus text format and its content type: all workers' values in multi-process mode,
    this process's (with its process and platform collectors) otherwise."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
