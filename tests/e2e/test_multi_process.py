"""Production shape: several stateless proxy processes on one PostgreSQL database behind a load balancer.

All state an authorization needs between its steps (the pending request, consent, the upstream state and
PKCE verifier, codes, tokens, the upstream session) must live in the database, so any process can serve
any step. The load balancer (proxy.LoadBalancer) sends each request where the test says and records it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
    from conftest import server_document
    from harness import bearer_of, sleep_until, tool_text
except ImportError:  # pragma: no cover
    from tests.e2e import harness
    from tests.e2e.conftest import server_document
    from tests.e2e.harness import bearer_of, sleep_until, tool_text

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,  # PostgreSQL deployments: run once, in the PostgreSQL pass of `make test`
    pytest.mark.skipif(not harness.node_available(), reason="e2e upstream not installed: run tests/e2e/install.sh"),
]


def served_by(cluster, path_suffix: str, since: int = 0) -> list[int]:
    """Which backend served each request whose path ends with `path_suffix` (in order)."""
    return [r.backend for r in cluster.lb.log[since:] if r.path.endswith(path_suffix)]


def test_flow_starts_on_one_process_and_finishes_on_the_other(make_cluster):
    cluster = make_cluster(processes=2)
    slug = cluster.slug

    # Phase 1: discovery, registration, authorize and consent on process A; from the upstream's
    # redirect to the callback on, everything on process B.
    phase = {"backend": 0}

    def switch_at_callback(method: str, path: str) -> int:
        if path == f"/oauth/{slug}/callback":
            phase["backend"] = 1
        return phase["backend"]

    cluster.lb.route = switch_at_callback
    alice = cluster.client(username="alice")

    async def first():
        return tool_text(await alice.call_tool("whoami"))

    assert anyio.run(first) == "alice"
    assert served_by(cluster, f"/oauth/{slug}/register") == [0]
    assert served_by(cluster, f"/oauth/{slug}/authorize") == [0]
    assert set(served_by(cluster, f"/oauth/{slug}/consent")) == {0}  # shown and approved on A
    assert served_by(cluster, f"/oauth/{slug}/callback") == [1]  # upstream state checked on B
    assert served_by(cluster, f"/oauth/{slug}/token") == [1]  # code redeemed on B
    assert set(served_by(cluster, f"/mcp/{slug}")) == {0, 1}  # the 401 on A, the tool call on B
    [authorization] = alice.authorizations
    assert authorization.outcome.params["iss"] == cluster.issuer

    # Phase 2: every request goes to the other process than the one before (round robin): a second
    # client and user, a refresh, and an MCP session whose messages alternate between the processes.
    cluster.lb.route = None
    mark = len(cluster.lb.log)
    bob = cluster.client(username="bob", client_name="Second client")

    async def second():
        provider = bob.new_provider()
        assert tool_text(await bob.call_tool("whoami", provider=provider)) == "bob"
        # the proxy's refresh grant, on whichever process the balancer picks: the client app is told its
        # access token expired (the SDK's own expiry bookkeeping), so it refreshes before the next request
        provider.context.token_expiry_time = time.time() - 1
        async with bob.connect(provider) as session:
            for _ in range(3):
                assert tool_text(await session.call_tool("whoami", {})) == "bob"

    anyio.run(second)
    steps = cluster.lb.log[mark:]
    backends = [r.backend for r in steps]
    assert all(a != b for a, b in zip(backends, backends[1:], strict=False))  # strictly alternating
    assert all((r.status or 500) < 500 for r in steps), [(r.method, r.path, r.status) for r in steps]
    refreshes = [e for e in bob.requests(path_suffix="/token") if e.form.get("grant_type") == "refresh_token"]
    assert len(refreshes) == 1 and refreshes[0].status == 200
    assert set(served_by(cluster, f"/mcp/{slug}", since=mark)) == {0, 1}
    assert len(bob.authorizations) == 1

    stats = cluster.idp.stats()
    assert stats["logins"] == 2
    assert stats["token"]["by_client"] == {cluster.upstream_client_id: {"authorization_code": 2}}
    assert cluster.mcp.stats()["unauthorized"] == 0
    for process in cluster.processes:
        assert process.is_running()


def test_upstream_refresh_once_across_processes(make_cluster):
    """An upstream token falls due while requests for the same grant arrive at both processes at once:
    the upstream sees exactly one refresh (it rotates refresh tokens and would revoke the grant on a
    second use of the old one), and every request succeeds with the fresh token."""
    ttl = 6
    cluster = make_cluster(processes=2, idp_config={"access_token_ttl": ttl, "rotate_refresh_tokens": True})
    cluster.lb.route = lambda method, path: 0
    client = cluster.client()

    async def login():
        return bearer_of(await client.call_tool("echo_auth"))

    upstream_token = anyio.run(login)
    proxy_token = client.storage.tokens.access_token
    expiry = cluster.idp.introspect(upstream_token, cluster.upstream_client_id)["exp"]
    cluster.idp.reset_stats()
    cluster.idp.set_config(token_delay_ms=400)  # a slow upstream widens the window for a double refresh
    cluster.lb.route = None  # round robin: the concurrent sessions alternate between the processes
    mark = len(cluster.lb.log)
    sessions = 6

    async def concurrent():
        await sleep_until(expiry - 0.5)  # due for refresh (UPSTREAM_REFRESH_MARGIN=2s), not expired
        results: list[str] = []

        async def one() -> None:
            async with client.connect(bearer=proxy_token) as session:
                results.append(tool_text(await session.call_tool("whoami", {})))
                results.append(bearer_of(await session.call_tool("echo_auth", {})))

        async with anyio.create_task_group() as tg:
            for _ in range(sessions):
                tg.start_soon(one)
        return results

    results = anyio.run(concurrent)
    assert results.count("alice") == sessions
    tokens = {r for r in results if r != "alice"}
    assert len(tokens) == 1 and upstream_token not in tokens, "one fresh upstream token for everybody"
    stats = cluster.idp.stats()
    assert stats["token"]["by_grant_type"] == {"refresh_token": 1}
    assert stats["token"]["errors"] == {}
    initializes = [r.backend for r in cluster.lb.log[mark:] if r.method == "POST" and r.path.endswith(cluster.slug)]
    assert set(initializes) == {0, 1}
    assert cluster.mcp.stats()["unauthorized"] == 0


def test_revocation_reaches_the_other_process_within_a_second(make_cluster):
    """Issue 13, finding 9: a token revoked through process A is refused by process B (which validated and
    cached it a moment before) within one second, not after its 5-second token cache."""
    cluster = make_cluster(processes=2)
    cluster.lb.route = lambda method, path: 0
    client = cluster.client()

    async def login():
        return tool_text(await client.call_tool("whoami"))

    assert anyio.run(login) == "alice"
    tokens = client.storage.tokens
    info = client.storage.client_info
    a, b = (f"{p.direct_url}/mcp/{cluster.slug}" for p in cluster.processes)
    probe = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
    headers = {"Authorization": f"Bearer {tokens.access_token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    assert httpx.post(b, json=probe, headers=headers, timeout=30).status_code == 200  # B has it cached

    form = {"token": tokens.refresh_token, "client_id": info.client_id}
    if info.client_secret:
        form["client_secret"] = info.client_secret
    revoked = httpx.post(f"{cluster.processes[0].direct_url}/oauth/{cluster.slug}/revoke", data=form, timeout=30)
    assert revoked.status_code == 200
    revoked_at = time.monotonic()
    assert httpx.post(a, json=probe, headers=headers, timeout=30).status_code == 401  # A: the next request

    # B, probed every 50 ms from threads (a slow accepted request does not hold back the next probe)
    def probe_b(start_in: float) -> tuple[float, int]:
        time.sleep(max(0.0, revoked_at + start_in - time.monotonic()))
        started = time.monotonic() - revoked_at
        return started, httpx.post(b, json=probe, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = sorted(pool.map(probe_b, [n * 0.05 for n in range(32)]))
    first_refusal = next(started for started, status in results if status == 401)
    print(f"revocation reached the other process within {first_refusal * 1000:.0f} ms: {results}")
    assert first_refusal < 1.0
    assert all(status == 401 for started, status in results if started >= 1.0), results


POLICY_SERVER = {"scopes": ["openid", "profile", "email", "offline_access", "groups"],
                 "access": {"groups": ["crm-users"]}}


def first_change_within(urls: list[str], *, since: float, changed, within: float = 6.0) -> list[float]:
    """Probe each URL every 50 ms (from threads: a slow answer does not hold back the next probe) until
    ``changed(response)``; the delays after `since`, one per URL."""
    def watch(url: str) -> float:
        while True:
            started = time.monotonic() - since
            if changed(url):
                return started
            assert started < within, f"{url}: no change within {within} s"
            time.sleep(0.05)

    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(watch, urls))


def test_a_policy_change_reaches_every_process_within_a_second(make_cluster):
    """Issue 14: an operator's policy change, saved by another process (``manage.py import_servers``), reaches
    the gateways of both serving processes, whose server caches are warm, within a second (the invalidation
    channel), not only after SERVER_CACHE_SECONDS: first a tool policy, then a narrower access policy."""
    cluster = make_cluster(processes=2, idp_config={"account_groups": {"alice": ["crm-users"]}}, server=POLICY_SERVER)
    client = cluster.client()

    async def login():
        return tool_text(await client.call_tool("whoami"))

    assert anyio.run(login) == "alice"
    gateways = [f"{p.direct_url}/mcp/{cluster.slug}" for p in cluster.processes]
    headers = {"Authorization": f"Bearer {client.storage.tokens.access_token}",
               "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "admin_reset", "arguments": {}}}

    def refused_by_the_gateway(url: str) -> bool:  # the gateway's own JSON-RPC error: never forwarded
        response = httpx.post(url, json=call, headers=headers, timeout=30)
        return response.status_code == 200 and response.headers["content-type"].startswith("application/json") \
            and response.json().get("error", {}).get("code") == -32001

    def token_refused(url: str) -> bool:
        return httpx.post(url, json=initialize, headers=headers, timeout=30).status_code == 401

    for url in gateways:  # both caches warm: the server's snapshot (no tool policy yet) and the token
        assert httpx.post(url, json=initialize, headers=headers, timeout=30).status_code == 200
        assert not refused_by_the_gateway(url)

    documents = {**POLICY_SERVER, "tool_policy": [{"tools": ["admin_*"], "groups": ["crm-admins"]}]}
    cluster.deployment.import_servers([server_document(cluster.idp, cluster.mcp, **documents)])
    saved = time.monotonic()
    delays = first_change_within(gateways, since=saved, changed=refused_by_the_gateway)
    print(f"tool policy reached the processes after {[round(d * 1000) for d in delays]} ms")
    assert max(delays) < 1.0, delays
    assert cluster.mcp.stats()["tool_calls"] == []  # no refused call reached the internal server

    documents["access"] = {"groups": ["crm-admins"]}
    cluster.deployment.import_servers([server_document(cluster.idp, cluster.mcp, **documents)])
    saved = time.monotonic()
    delays = first_change_within(gateways, since=saved, changed=token_refused)
    print(f"access policy reached the processes after {[round(d * 1000) for d in delays]} ms")
    assert max(delays) < 1.0, delays
