"""The soak test: two proxy "hosts" (separate uvicorn process groups on their own ports, 2 workers each) sharing
one PostgreSQL database and Redis, behind a load balancer that sends every request to a host at random;
50 MCP clients for 60 s doing full flows, refreshes and tool calls, while the upstream's access tokens expire
every 30 s.

Passes when: no client operation failed; the upstream refreshed each grant at most once per expiry (the IdP's
refresh count equals the sessions' refresh counts, no refresh was refused as a reused token, and no session
was refreshed more often than its lifetime allows); no MCP session was lost (every client kept its
``Mcp-Session-Id`` from first call to last) and no grant was ended.

Clients work in pairs sharing one grant (one app making concurrent calls), so the calls of one grant reach
both hosts at the moment its upstream token falls due: the upstream refresh must still happen once.

The internal MCP server checks every request's upstream token at the IdP's userinfo endpoint (as a real
resource server would), so a call forwarded with an expired upstream token fails the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import proxy as e2e_proxy  # noqa: E402  (tests/e2e/proxy.py: its load balancer; on sys.path via .stack)

from . import oauth
from .load import McpSession, new_http
from .stack import IDP_CONFIG, SCOPES, SLUG, ProxyDeployment, harness, upstream_client

TTL = 30
MARGIN = 5


async def soak(
    *, clients: int = 50, seconds: float = 60.0, max_ops_per_client: int = 5000, log=print
) -> dict[str, Any]:
    with contextlib.ExitStack() as cleanup:
        idp = cleanup.enter_context(harness.start_upstream({**IDP_CONFIG, "access_token_ttl": TTL, "clients": []}))
        mcp = cleanup.enter_context(
            harness.start_mcp_server(userinfo_url=idp.userinfo_endpoint, env={"REQUIRE_BEARER": "userinfo"})
        )
        lb_listener = e2e_proxy.listen_loopback()
        public = e2e_proxy.socket_url(lb_listener)
        idp.add_client(upstream_client("mcp-proxy", [f"{public}/oauth/{SLUG}/callback"]))
        deployment = ProxyDeployment(public_base_url=public, extra_env={"UPSTREAM_REFRESH_MARGIN": str(MARGIN)})
        cleanup.callback(deployment.stop)
        deployment.import_servers(
            [idp.server_config("mcp-proxy", slug=SLUG, name="Soak tools", mcp_url=mcp.url, scopes=SCOPES)]
        )
        hosts = [deployment.start_host(workers=2, name="host-a"), deployment.start_host(workers=2, name="host-b")]
        rng = random.Random(7)
        lb = cleanup.enter_context(
            e2e_proxy.LoadBalancer(
                [h.url for h in hosts], listener=lb_listener, route=lambda method, path: rng.randrange(2)
            )
        )
        log(f"  soak: hosts {[h.url for h in hosts]} behind {lb.url}; upstream tokens live {TTL} s")
        gateway = f"{public}/mcp/{SLUG}"
        server = oauth.discover(gateway)
        pool = ThreadPoolExecutor(max_workers=clients + 8)
        loop = asyncio.get_running_loop()
        ops: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        samples: list[str] = []
        lost_sessions = 0
        cpu0 = {h.name: h.cpu() for h in hosts}
        db_name = deployment.database_url.rsplit("/", 1)[1]
        pg_peak = {"proxy_database": 0}

        async def sample_pg() -> None:
            from .stack import _pg

            def sample() -> int:
                with _pg() as conn:
                    return conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (db_name,)
                    ).fetchone()[0]

            while True:
                with contextlib.suppress(Exception):
                    count = await loop.run_in_executor(pool, sample)
                    pg_peak["proxy_database"] = max(pg_peak["proxy_database"], count)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_pg())
        t0 = time.monotonic()
        deadline = t0 + seconds

        def failed(kind: str, exc: BaseException) -> None:
            failures[kind] += 1
            if len(samples) < 10:
                samples.append(f"{kind}: {type(exc).__name__}: {str(exc)[:300]}")

        async def flow(i: int) -> oauth.Grant:
            return await loop.run_in_executor(pool, lambda: oauth.full_flow(server, username=f"soak{i}"))

        # Clients work in pairs sharing one grant, like one app making concurrent calls: both call tools with
        # the pair's current access token (so calls of one grant run at the same time on both hosts when its
        # upstream token falls due); the first of the pair also refreshes and now and then starts a new flow.
        shared: dict[int, oauth.Grant] = {}
        first_flows: dict[int, asyncio.Future] = {}
        retried = Counter()

        async def with_current_token(pair: int, session: McpSession, op) -> None:
            """Run ``op`` with the pair's current access token. When the pair's owner refreshed between our read
            of the token and the request (the refresh revokes the old access token at once), wait for the new
            token (at most 2 s) and retry with it, as an app whose other task is refreshing would (at most 3
            times: the owner may refresh again meanwhile)."""
            for attempt in range(4):
                token = shared[pair].access_token
                session.set_bearer(token)
                try:
                    await op()
                    return
                except Exception as exc:  # noqa: BLE001
                    if " 401 " not in f" {exc} " or attempt == 3:
                        raise
                    for _ in range(40):
                        if shared[pair].access_token != token:
                            break
                        await asyncio.sleep(0.05)
                    if shared[pair].access_token == token:
                        raise
                    retried["call_after_concurrent_refresh"] += 1

        async def client(i: int) -> None:
            nonlocal lost_sessions
            crng = random.Random(i)
            pair, owner = i // 2, i % 2 == 0
            await asyncio.sleep(crng.uniform(0, 2))  # clients arrive over two seconds
            if owner:
                first_flows[pair] = asyncio.ensure_future(flow(i))
            else:
                while pair not in first_flows:
                    await asyncio.sleep(0.05)
            try:
                grant = await asyncio.shield(first_flows[pair])
                shared.setdefault(pair, grant)
                if owner:
                    ops["flow"] += 1
            except Exception as exc:  # noqa: BLE001
                if owner:
                    failed("flow", exc)
                return
            async with new_http() as http:
                session = McpSession(http, gateway, bearer=shared[pair].access_token)
                try:
                    await with_current_token(pair, session, session.initialize)
                    ops["initialize"] += 1
                except Exception as exc:  # noqa: BLE001
                    failed("initialize", exc)
                    return
                session_id = session.session_id
                n = 0
                while time.monotonic() < deadline and n < max_ops_per_client:
                    n += 1
                    pick = crng.random()
                    kind = "call" if not owner or pick < 0.85 else "refresh" if pick < 0.98 else "flow"
                    try:
                        if kind == "call":
                            await with_current_token(pair, session, lambda text=f"c{i}-{n}": session.echo(text))
                        elif kind == "refresh":
                            await oauth.refresh_async(http, shared[pair])
                        else:
                            new = await flow(i)
                            shared[pair] = new
                        ops[kind] += 1
                    except Exception as exc:  # noqa: BLE001
                        failed(kind, exc)
                        if "404" in str(exc):
                            lost_sessions += 1
                    if session.session_id != session_id:
                        lost_sessions += 1
                    await asyncio.sleep(crng.uniform(0.05, 0.3))
                try:
                    session.set_bearer(shared[pair].access_token)
                    await session.echo("last")
                    ops["call"] += 1
                except Exception as exc:  # noqa: BLE001
                    failed("call", exc)
                await session.close()

        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.monotonic() - t0
        sampler.cancel()
        cpu = {h.name: round(h.cpu() - cpu0[h.name], 2) for h in hosts}
        rss = {h.name: [round(x, 1) for x in h.rss_per_worker()] for h in hosts}
        stats = idp.stats()["token"]
        rows = deployment.sql(
            "SELECT refresh_count, EXTRACT(EPOCH FROM (now() - created)), revoked_at IS NOT NULL "
            "FROM oauthproxy_upstreamsession"
        )
        pool.shutdown(wait=False, cancel_futures=True)

    refresh_total = sum(r[0] for r in rows)
    # One refresh per expiry: a session alive for L seconds can have needed at most L / (TTL - MARGIN) refreshes
    # (one second of slack per refresh for request latency).
    over = [(int(r[0]), round(float(r[1]), 1)) for r in rows if r[0] > int(float(r[1]) // (TTL - MARGIN - 1))]
    by_backend = Counter(entry.backend for entry in lb.log)
    idp_refresh = stats["by_grant_type"].get("refresh_token", 0)
    idp_refresh_ok = stats.get("success_by_grant_type", {}).get("refresh_token", 0)
    idp_refresh_errors = stats.get("errors", {}).get("refresh_token", {})
    result = {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "ops": dict(ops),
        "failed_ops": dict(failures),
        "failure_samples": samples,
        "calls_retried_after_concurrent_refresh": retried["call_after_concurrent_refresh"],
        "lost_mcp_sessions": lost_sessions,
        "requests_by_host": {hosts[k].name: v for k, v in sorted(by_backend.items())},
        "grants": len(rows),
        "grants_ended": sum(1 for r in rows if r[2]),
        "upstream_refresh_calls": idp_refresh,
        "upstream_refresh_ok": idp_refresh_ok,
        "upstream_refresh_errors": idp_refresh_errors,
        "sessions_refresh_count_sum": refresh_total,
        "grants_refreshed_more_than_once_per_expiry": over[:10],
        "host_cpu_seconds": cpu,
        "postgres_connections_peak": pg_peak,
        "host_rss_mb_per_worker": rss,
    }
    result["passed"] = bool(
        not failures
        and lost_sessions == 0
        and not over
        and not idp_refresh_errors
        and idp_refresh_ok == refresh_total
        and result["grants_ended"] == 0
        and len(by_backend) == 2
        and (elapsed < TTL + 5 or idp_refresh_ok > 0)  # a long enough soak must have crossed expiries
    )
    return result
