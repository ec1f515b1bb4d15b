"""The scenarios S1-S6 (docs/PERFORMANCE.md says what each number means).

Every comparison is interleaved: within one repeat the targets run back to back (direct, gateway, FastMCP...),
and each ratio is computed from the runs of one repeat before the median is taken over the repeats, so the
machine's drift (up to 2x from minute to minute here) hits both sides of a ratio alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import re
import secrets
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import oauth
from .load import McpSession, RunStats, closed_loop, new_http
from .stack import RP_CLIENT, RP_REDIRECT, UPSTREAM_SECRET, VARIANT_SLUGS, Stack, cpu_seconds, rss_mb


@dataclass
class Mode:
    name: str
    repeats: int
    seconds: float  # one measured run
    max_ops: int  # bound per run, whatever the time
    flows: int  # S4 flows per target and repeat
    s5_streams: int
    s6_levels: tuple[int, ...]
    s6_ops: int


QUICK = Mode(
    "quick", repeats=3, seconds=4.0, max_ops=20_000, flows=8, s5_streams=1000, s6_levels=(1_000, 100_000), s6_ops=150
)
FULL = Mode(
    "full",
    repeats=5,
    seconds=10.0,
    max_ops=100_000,
    flows=20,
    s5_streams=1000,
    s6_levels=(1_000, 100_000, 1_000_000),
    s6_ops=300,
)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return round(statistics.median(values), 3) if values else None


def self_cpu() -> float:
    return cpu_seconds([os.getpid()])


class Bench:
    """State shared by the scenarios of one run: the stack, grants per target, results."""

    def __init__(self, st: Stack, mode: Mode, log: Callable[[str], None] = print) -> None:
        self.st, self.mode, self.log = st, mode, log
        self.servers: dict[str, oauth.AuthServer] = {}
        self.grants: dict[str, list[oauth.Grant]] = {}
        self.pool = ThreadPoolExecutor(max_workers=64)
        self.pg_peak: dict[str, int] = {}
        self._sampler: asyncio.Task | None = None

    # PostgreSQL connections, sampled twice a second while the scenarios run -----------------------

    def pg_sampling_start(self) -> None:
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_pg())

    async def _sample_pg(self) -> None:
        from .stack import _pg

        loop = asyncio.get_running_loop()

        def sample() -> dict[str, int]:
            with _pg() as conn:
                return dict(
                    conn.execute("SELECT coalesce(datname, '-'), count(*) FROM pg_stat_activity GROUP BY 1").fetchall()
                )

        while True:
            try:
                counts = await loop.run_in_executor(self.pool, sample)
            except Exception:  # noqa: BLE001 - PostgreSQL full: exactly what we want to see, next time
                counts = {}
            mine = counts.get(self.db_name(), 0)
            self.pg_peak["proxy_database"] = max(self.pg_peak.get("proxy_database", 0), mine)
            self.pg_peak["all_databases"] = max(self.pg_peak.get("all_databases", 0), sum(counts.values()))
            await asyncio.sleep(0.5)

    def pg_peak_take(self) -> dict[str, int]:
        peak, self.pg_peak = self.pg_peak, {}
        return peak

    # targets ------------------------------------------------------------------------------------

    def targets(self) -> dict[str, str]:
        """target name -> MCP URL (S7's gateway variants are targets too, used by S7 only)."""
        out = {"direct": self.st.mcp.url, "gateway": self.st.gateway_url}
        for name, (slug, _fields) in VARIANT_SLUGS.items():
            out[name] = f"{self.st.proxy.url}/mcp/{slug}"
        if self.st.fastmcp_gateway:
            out["fastmcp_gateway"] = self.st.fastmcp_gateway.url
        if self.st.fastmcp_own:
            out["fastmcp_own"] = self.st.fastmcp_own.url
        return out

    def cpu_probes(self) -> dict[str, Callable[[], float]]:
        probes: dict[str, Callable[[], float]] = {
            "proxy": self.st.proxy.cpu,
            "internal": lambda: cpu_seconds([self.st.mcp.pid]),
            "idp": lambda: cpu_seconds([self.st.idp.pid]),
            "loadgen": self_cpu,
        }
        if self.st.fastmcp_gateway:
            probes["fastmcp_gateway"] = self.st.fastmcp_gateway.cpu
        if self.st.fastmcp_own:
            probes["fastmcp_own"] = self.st.fastmcp_own.cpu
        return probes

    def server(self, target: str) -> oauth.AuthServer:
        if target not in self.servers:
            self.servers[target] = oauth.discover(self.targets()[target])
        return self.servers[target]

    async def flows(self, target: str, n: int) -> list[oauth.Grant]:
        server = self.server(target)
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(
                *(
                    loop.run_in_executor(self.pool, lambda i=i: oauth.full_flow(server, username=f"user{i}"))
                    for i in range(n)
                )
            )
        )

    async def grants_for(self, target: str, n: int) -> list[oauth.Grant]:
        have = self.grants.setdefault(target, [])
        if len(have) < n:
            have.extend(await self.flows(target, n - len(have)))
        return have[:n]

    # sessions -----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def sessions(self, target: str, n: int):
        """n virtual clients, each with its own connection, grant (not for direct) and MCP session."""
        url = self.targets()[target]
        grants = await self.grants_for(target, n) if target != "direct" else [None] * n
        https = [new_http() for _ in range(n)]
        sessions = [
            McpSession(h, url, bearer=g.access_token if g else None) for h, g in zip(https, grants, strict=True)
        ]
        try:
            await asyncio.gather(*(s.initialize() for s in sessions))
            yield sessions
        finally:
            await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
            await asyncio.gather(*(h.aclose() for h in https), return_exceptions=True)

    async def echo_run(self, target: str, concurrency: int, *, seconds: float | None = None) -> RunStats:
        async with self.sessions(target, concurrency) as sessions:
            for s in sessions:  # warm the connection and every cache on the way
                for _ in range(3):
                    await s.echo()
            return await closed_loop(
                [s.echo for s in sessions],
                duration=seconds or self.mode.seconds,
                max_ops=self.mode.max_ops,
                cpu_probes=self.cpu_probes(),
            )

    # database and upstream counters (the hot-path check) ----------------------------------------

    def db_name(self) -> str:
        return self.st.deployment.database_url.rsplit("/", 1)[1]

    def db_xacts(self) -> int:
        from .stack import _pg

        with _pg() as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (self.db_name(),)
            ).fetchone()
        return int(row[0])

    def idp_token_calls(self) -> int:
        return int(self.st.idp.stats()["token"]["total"])


# ------------------------------------------------------------------------------------------------
# S1: tools/call through the gateway vs directly


async def s7(b: Bench, *, concurrencies: tuple[int, ...] = (1, 16)) -> dict[str, Any]:
    """tools/call through the gateway with a tool policy and with identity assertions, beside the plain
    gateway and direct calls, interleaved per repeat like S1 (each variant is its own server of the same
    deployment, in front of the same internal server)."""
    targets = ["direct", "gateway", *VARIANT_SLUGS]
    runs = await echo_runs(b, targets, concurrencies, label="S7")
    return {"runs": runs, "summary": summarize_echo(runs, concurrencies, targets)}


async def echo_runs(b: Bench, targets: list[str], concurrencies: tuple[int, ...], *, label: str) -> list[dict]:
    """Each repeat runs every target back to back at each concurrency (grants made first)."""
    runs = []
    for c in concurrencies:
        for t in targets:
            if t != "direct":
                await b.grants_for(t, c)
        for rep in range(b.mode.repeats):
            for t in targets:
                stats = await b.echo_run(t, c)
                entry = _run_entry(t, c, rep, stats)
                runs.append(entry)
                b.log(
                    f"  {label} c={c} rep={rep} {t:20s} {entry['rate']:8.1f}/s p50 {entry['p50_ms']:7.2f} ms "
                    f"p99 {entry['p99_ms']:8.2f} ms err {entry['errors']}"
                )
    return runs


def _run_entry(target: str, concurrency: int, repeat: int, stats: RunStats) -> dict[str, Any]:
    return {"target": target, "concurrency": concurrency, "repeat": repeat, **stats.summary()}


def _cpu_key(target: str) -> str | None:
    if target in VARIANT_SLUGS:
        return "proxy"
    return {"gateway": "proxy", "fastmcp_gateway": "fastmcp_gateway", "fastmcp_own": "fastmcp_own"}.get(target)


def summarize_echo(runs: list[dict[str, Any]], concurrencies: tuple[int, ...], targets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in concurrencies:
        per: dict[str, Any] = {}
        for t in targets:
            mine = [r for r in runs if r["target"] == t and r["concurrency"] == c]
            if not mine:
                continue
            key = _cpu_key(t)
            per[t] = {
                "rate": median([r["rate"] for r in mine]),
                "p50_ms": median([r["p50_ms"] for r in mine]),
                "p99_ms": median([r["p99_ms"] for r in mine]),
                "errors": sum(r["errors"] for r in mine),
                "server_cpu_ms_per_call": median([r.get(f"cpu_ms_per_op_{key}") for r in mine]) if key else None,
                "internal_cpu_ms_per_call": median([r.get("cpu_ms_per_op_internal") for r in mine]),
                "loadgen_cpu_ms_per_call": median([r.get("cpu_ms_per_op_loadgen") for r in mine]),
            }
        # ratios from the runs of the same repeat
        ratios: dict[str, Any] = {}
        repeats = sorted({r["repeat"] for r in runs if r["concurrency"] == c})
        for t in targets:
            if t == "direct":
                continue
            slow, delta = [], []
            for rep in repeats:
                d = next(
                    (r for r in runs if r["target"] == "direct" and r["concurrency"] == c and r["repeat"] == rep), None
                )
                x = next((r for r in runs if r["target"] == t and r["concurrency"] == c and r["repeat"] == rep), None)
                if d and x and x["rate"]:
                    slow.append(d["rate"] / x["rate"])
                    delta.append(x["p50_ms"] - d["p50_ms"])
            ratios[t] = {
                "slowdown_x": median(slow),
                "p50_delta_ms": median(delta),
                "per_repeat_slowdown": [round(s, 3) for s in slow],
            }
        out[f"c{c}"] = {"targets": per, "vs_direct": ratios}
    return out


async def s1(b: Bench, *, concurrencies: tuple[int, ...] = (1, 16), check_hot_path: bool = True) -> dict[str, Any]:
    targets = [t for t in b.targets() if t not in VARIANT_SLUGS]
    runs = await echo_runs(b, targets, concurrencies, label="S1")
    result = {"runs": runs, "summary": summarize_echo(runs, concurrencies, targets)}
    if check_hot_path:
        result["hot_path"] = await hot_path_check(b)
    return result


PG_LOG = Path(os.environ.get("BENCH_PG_LOG", "/var/log/postgresql/postgresql-15-main.log"))


async def hot_path_check(b: Bench) -> dict[str, Any]:
    """SQL statements and upstream calls on the gateway's hot path, counted exactly.

    A separate proxy host of the same deployment (one worker) connects with ``log_statement=all``, so
    PostgreSQL logs every statement it runs (the main hosts do not: logging costs time). Runs of equal length
    at 1 and at 16 clients, all sharing one valid token with a fresh upstream token, go through that host;
    the statements logged for the proxy's database during each run are counted, and the IdP's token
    endpoint calls are read from its counters.

    Expected: no upstream call; statements only when a cache entry of the worker expires
    (``GATEWAY_CACHE_SECONDS`` and ``SERVER_CACHE_SECONDS``, 5 s each: the validated token and the server's
    configuration), so their number
    follows the run's length, not its number of calls."""
    seconds = max(b.mode.seconds, 8.0)
    if not os.access(PG_LOG, os.R_OK):
        return {"skipped": f"cannot read the PostgreSQL log {PG_LOG} (BENCH_PG_LOG)"}
    grant = (await b.grants_for("gateway", 1))[0]
    url = b.st.deployment.database_url + "?options=-c%20log_statement%3Dall"
    loop = asyncio.get_running_loop()
    host = await loop.run_in_executor(
        b.pool, lambda: b.st.deployment.start_host(workers=1, name="hotpath", env={"DATABASE_URL": url})
    )
    gateway = f"{host.url}/mcp/{b.st.slug}"
    marker = f"@{b.db_name()} "
    runs: dict[str, Any] = {}
    try:
        for clients in (1, 16):
            https = [new_http() for _ in range(clients)]
            sessions = [McpSession(h, gateway, bearer=grant.access_token) for h in https]
            try:
                await asyncio.gather(*(s.initialize() for s in sessions))
                for s in sessions:
                    await s.echo()
                offset, upstream = PG_LOG.stat().st_size, b.idp_token_calls()
                stats = await closed_loop([s.echo for s in sessions], duration=seconds, max_ops=b.mode.max_ops)
                await asyncio.sleep(0.5)
                upstream = b.idp_token_calls() - upstream
                with PG_LOG.open("rb") as log:
                    log.seek(offset)
                    lines = [line.decode(errors="replace") for line in log.read().splitlines()]
            finally:
                await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
                await asyncio.gather(*(h.aclose() for h in https), return_exceptions=True)
            statements = [line.split("statement: ", 1)[1] for line in lines if marker in line and "statement: " in line]
            kinds = collections.Counter(" ".join(st.split()[:4])[:60] for st in statements)
            runs[f"c{clients}"] = {
                "calls": stats.count,
                "errors": stats.errors,
                "seconds": round(stats.duration, 2),
                "sql_statements": len(statements),
                "upstream_calls": upstream,
                "sql_statements_per_1000_calls": round(len(statements) * 1000 / max(stats.count, 1), 3),
                "statement_kinds": dict(kinds.most_common(8)),
            }
    finally:
        await loop.run_in_executor(b.pool, host.stop)
        b.st.deployment.hosts.remove(host)
    c1, c16 = runs["c1"], runs["c16"]
    refills = 2 * (seconds / 5.0 + 1)  # token and server configuration, per 5 s, one worker
    upstream_total = c1["upstream_calls"] + c16["upstream_calls"]
    return {
        **runs,
        "upstream_calls": upstream_total,
        "cache_refills_expected_per_run": round(refills, 1),
        "met": bool(
            upstream_total == 0 and c16["sql_statements"] <= 4 * refills and c1["sql_statements"] <= 4 * refills
        ),
        "note": "validated tokens and server configurations are cached per worker for GATEWAY_CACHE_SECONDS "
        "and SERVER_CACHE_SECONDS (5 s each); a refill costs one query plus Django's connection bookkeeping "
        "(health check, pool reset), never one per call",
    }


# ------------------------------------------------------------------------------------------------
# S2: refresh grants, each client chaining its own rotating refresh token


async def _refresh_run(b: Bench, grants: list[oauth.Grant], seconds: float) -> RunStats:
    https = [new_http() for _ in grants]
    try:
        ops = [lambda h=h, g=g: oauth.refresh_async(h, g) for h, g in zip(https, grants, strict=True)]
        return await closed_loop(ops, duration=seconds, max_ops=b.mode.max_ops, cpu_probes=b.cpu_probes())
    finally:
        await asyncio.gather(*(h.aclose() for h in https))


async def _upstream_refresh_run(b: Bench, grants: list[oauth.UpstreamGrant], seconds: float) -> RunStats:
    https = [new_http() for _ in grants]
    try:
        ops = [
            lambda h=h, g=g: oauth.upstream_refresh_async(h, b.st.idp, RP_CLIENT, UPSTREAM_SECRET, g)
            for h, g in zip(https, grants, strict=True)
        ]
        return await closed_loop(ops, duration=seconds, max_ops=b.mode.max_ops, cpu_probes=b.cpu_probes())
    finally:
        await asyncio.gather(*(h.aclose() for h in https))


async def s2(b: Bench, *, concurrencies: tuple[int, ...] = (1, 16)) -> dict[str, Any]:
    """Phase "not due": upstream tokens live an hour; the proxy answers from its database alone. Phase "due":
    the IdP issues 30 s tokens, under the proxy's 60 s refresh margin, so every proxy refresh also refreshes
    upstream. FastMCP calls the upstream on every refresh in both phases. "upstream" is the bench refreshing
    at the IdP directly (its own time)."""
    idp = b.st.idp
    n = max(concurrencies)
    fast = "fastmcp_gateway" if "fastmcp_gateway" in b.targets() else None
    loop = asyncio.get_running_loop()
    runs: list[dict[str, Any]] = []
    phases: dict[str, dict[str, list[oauth.Grant]]] = {}
    idp_refresh_calls: dict[str, int] = {}
    try:
        for phase, ttl in (("not_due", 3600), ("due", 30)):
            idp.set_config(access_token_ttl=ttl)
            grants = {"gateway": await b.flows("gateway", n)}
            if fast:
                grants[fast] = await b.flows(fast, n)
            upstream = list(
                await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            b.pool,
                            lambda i=i: oauth.upstream_grant(idp, RP_CLIENT, RP_REDIRECT, UPSTREAM_SECRET, f"rp{i}"),
                        )
                        for i in range(n)
                    )
                )
            )
            phases[phase] = grants
            for c in concurrencies:
                for rep in range(b.mode.repeats):
                    for target in ("gateway", fast, "upstream"):
                        if target is None:
                            continue
                        before = idp.token_calls("refresh_token", "mcp-proxy")
                        if target == "upstream":
                            stats = await _upstream_refresh_run(b, upstream[:c], b.mode.seconds)
                        else:
                            stats = await _refresh_run(b, grants[target][:c], b.mode.seconds)
                        entry = {"phase": phase, **_run_entry(target, c, rep, stats)}
                        if target == "gateway":
                            entry["upstream_refreshes_by_proxy"] = (
                                idp.token_calls("refresh_token", "mcp-proxy") - before
                            )
                        runs.append(entry)
                        b.log(
                            f"  S2 {phase:7s} c={c} rep={rep} {target:16s} {entry['rate']:8.1f}/s "
                            f"p50 {entry['p50_ms']:7.2f} ms p99 {entry['p99_ms']:8.2f} ms err {entry['errors']}"
                        )
            idp_refresh_calls[phase] = idp.token_calls("refresh_token", "mcp-proxy")
    finally:
        idp.set_config(access_token_ttl=3600)

    summary: dict[str, Any] = {}
    for phase in ("not_due", "due"):
        for c in concurrencies:
            mine = [r for r in runs if r["phase"] == phase and r["concurrency"] == c]
            per = {}
            for t in ("gateway", fast, "upstream"):
                rs = [r for r in mine if r["target"] == t]
                if rs:
                    per["proxy" if t == "gateway" else t] = {
                        "rate": median([r["rate"] for r in rs]),
                        "p50_ms": median([r["p50_ms"] for r in rs]),
                        "p99_ms": median([r["p99_ms"] for r in rs]),
                        "errors": sum(r["errors"] for r in rs),
                        "proxy_cpu_ms_per_refresh": median([r.get("cpu_ms_per_op_proxy") for r in rs])
                        if t == "gateway"
                        else None,
                        "upstream_refreshes_per_op": round(
                            sum(r.get("upstream_refreshes_by_proxy", 0) for r in rs)
                            / max(1, sum(r["ops"] for r in rs)),
                            3,
                        )
                        if t == "gateway"
                        else None,
                    }
            vs_fast, extra = [], []
            for rep in range(b.mode.repeats):
                g = next((r for r in mine if r["target"] == "gateway" and r["repeat"] == rep), None)
                f = next((r for r in mine if r["target"] == fast and r["repeat"] == rep), None)
                u = next((r for r in mine if r["target"] == "upstream" and r["repeat"] == rep), None)
                if g and f and f["rate"]:
                    vs_fast.append(g["rate"] / f["rate"])
                if g and u:
                    extra.append(g["p50_ms"] - u["p50_ms"])
            per["proxy_vs_fastmcp_rate_x"] = median(vs_fast)
            per["proxy_p50_minus_upstream_p50_ms"] = median(extra)
            summary[f"{phase}_c{c}"] = per
    return {"runs": runs, "summary": summary}


# ------------------------------------------------------------------------------------------------
# S3: registrations


async def s3(b: Bench, *, concurrencies: tuple[int, ...] = (1, 16)) -> dict[str, Any]:
    targets = ["gateway"] + (["fastmcp_gateway"] if "fastmcp_gateway" in b.targets() else [])
    runs = []
    for c in concurrencies:
        for rep in range(b.mode.repeats):
            for t in targets:
                server = b.server(t)
                https = [new_http() for _ in range(c)]

                async def register(h: httpx.AsyncClient, server: oauth.AuthServer = server) -> None:
                    body = oauth.registration_body(f"http://127.0.0.1:{40000 + secrets.randbelow(20000)}/callback")
                    response = await h.post(server.registration_endpoint, json=body)
                    if response.status_code != 201:
                        raise RuntimeError(f"{response.status_code} {response.text[:200]}")

                try:
                    stats = await closed_loop(
                        [lambda h=h: register(h) for h in https],
                        duration=b.mode.seconds,
                        max_ops=b.mode.max_ops,
                        cpu_probes=b.cpu_probes(),
                    )
                finally:
                    await asyncio.gather(*(h.aclose() for h in https))
                entry = _run_entry(t, c, rep, stats)
                runs.append(entry)
                b.log(
                    f"  S3 c={c} rep={rep} {t:16s} {entry['rate']:8.1f}/s p50 {entry['p50_ms']:7.2f} ms "
                    f"err {entry['errors']}"
                )
    summary = {}
    for c in concurrencies:
        per: dict[str, Any] = {}
        for t in targets:
            rs = [r for r in runs if r["target"] == t and r["concurrency"] == c]
            key = _cpu_key(t)
            per["proxy" if t == "gateway" else t] = {
                "rate": median([r["rate"] for r in rs]),
                "p50_ms": median([r["p50_ms"] for r in rs]),
                "p99_ms": median([r["p99_ms"] for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "server_cpu_ms_per_registration": median([r.get(f"cpu_ms_per_op_{key}") for r in rs]),
            }
        ratios = []
        for rep in range(b.mode.repeats):
            g = next(
                (r for r in runs if r["target"] == "gateway" and r["concurrency"] == c and r["repeat"] == rep), None
            )
            f = next(
                (r for r in runs if r["target"] == "fastmcp_gateway" and r["concurrency"] == c and r["repeat"] == rep),
                None,
            )
            if g and f and f["rate"]:
                ratios.append(g["rate"] / f["rate"])
        per["proxy_vs_fastmcp_rate_x"] = median(ratios)
        summary[f"c{c}"] = per
    return {"runs": runs, "summary": summary}


# ------------------------------------------------------------------------------------------------
# S4: full authorization flows


async def s4(b: Bench) -> dict[str, Any]:
    """Sequential flows (register, authorize, consent, IdP login, callback with the upstream code exchange,
    code redemption). Server CPU per flow from /proc; wall time split by origin: the browser's requests to the
    IdP (its login pages) are "upstream time"; the IdP's own CPU is reported separately."""
    targets = ["gateway"] + (["fastmcp_gateway"] if "fastmcp_gateway" in b.targets() else [])
    loop = asyncio.get_running_loop()
    runs = []
    for t in targets:  # warm-up: first requests of each worker import templates, open connections
        await b.flows(t, 4)
    for rep in range(b.mode.repeats):
        for t in targets:
            server = b.server(t)
            cpu_key = _cpu_key(t)
            probes = b.cpu_probes()
            before = {k: p() for k, p in probes.items()}
            timing: dict[str, float] = collections.defaultdict(float)
            t0 = time.perf_counter()

            def run_flows(server: oauth.AuthServer = server, timing: dict[str, float] = timing) -> None:
                for i in range(b.mode.flows):
                    oauth.full_flow(server, username=f"flow{i}", timing=timing)

            await loop.run_in_executor(b.pool, run_flows)
            wall = time.perf_counter() - t0
            cpu = {k: p() - before[k] for k, p in probes.items()}
            n = b.mode.flows
            idp_origin = b.st.idp.url
            entry = {
                "target": t,
                "repeat": rep,
                "flows": n,
                "wall_ms_per_flow": round(wall * 1000 / n, 2),
                "server_cpu_ms_per_flow": round(cpu[cpu_key] * 1000 / n, 2),
                "idp_cpu_ms_per_flow": round(cpu["idp"] * 1000 / n, 2),
                "browser_at_idp_ms_per_flow": round(timing.get(idp_origin, 0.0) * 1000 / n, 2),
                "browser_at_server_ms_per_flow": round(
                    sum(v for k, v in timing.items() if k != idp_origin and not k.startswith("step ")) * 1000 / n, 2
                ),
                "wall_ms_per_step": {
                    k[5:]: round(v * 1000 / n, 2)
                    for k, v in sorted(timing.items())
                    # the IdP's own steps (/interaction/..., /auth/<uid>) are counted under its origin
                    if k.startswith("step ") and "/interaction/" not in k and not re.search(r" /auth/(?!callback)", k)
                },
            }
            runs.append(entry)
            b.log(
                f"  S4 rep={rep} {t:16s} wall {entry['wall_ms_per_flow']:7.1f} ms/flow, server CPU "
                f"{entry['server_cpu_ms_per_flow']:6.1f} ms, IdP CPU {entry['idp_cpu_ms_per_flow']:6.1f} ms, "
                f"at IdP {entry['browser_at_idp_ms_per_flow']:6.1f} ms"
            )
    summary = {}
    for t in targets:
        rs = [r for r in runs if r["target"] == t]
        summary["proxy" if t == "gateway" else t] = {
            k: median([r[k] for r in rs])
            for k in (
                "wall_ms_per_flow",
                "server_cpu_ms_per_flow",
                "idp_cpu_ms_per_flow",
                "browser_at_idp_ms_per_flow",
                "browser_at_server_ms_per_flow",
            )
        }
    return {"runs": runs, "summary": summary}


# ------------------------------------------------------------------------------------------------
# S5: 1,000 idle SSE streams held open through the gateway while S1 runs


@dataclass
class HeldStream:
    session: McpSession
    task: asyncio.Task | None = None
    opened: bool = False
    closed_early: bool = False
    bytes: int = 0
    status: int | None = None
    problems: list[str] = field(default_factory=list)


async def _hold_stream(http: httpx.AsyncClient, held: HeldStream, ready: asyncio.Event) -> None:
    headers = {k: v for k, v in held.session.headers.items() if k != "content-type"}
    headers["accept"] = "text/event-stream"
    try:
        request = http.build_request("GET", held.session.url, headers=headers, timeout=httpx.Timeout(30, read=None))
        response = await http.send(request, stream=True)
        held.status = response.status_code
        held.opened = response.status_code == 200
        ready.set()
        try:
            async for chunk in response.aiter_raw():
                held.bytes += len(chunk)
            held.closed_early = True
        finally:
            await response.aclose()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        held.problems.append(f"{type(exc).__name__}: {exc}")
        held.closed_early = True
        ready.set()


async def s5(b: Bench) -> dict[str, Any]:
    n = b.mode.s5_streams
    grants = await b.grants_for("gateway", 16)
    workers = b.st.proxy.worker_pids()
    rss_before = [rss_mb(p) for p in workers]
    https = [new_http(connections=200, timeout=60) for _ in range((n + 199) // 200)]  # sessions' POSTs
    stream_http = new_http(connections=n + 10, timeout=60)
    held: list[HeldStream] = []
    sem = asyncio.Semaphore(32)

    async def open_one(i: int) -> None:
        async with sem:
            session = McpSession(https[i % len(https)], b.st.gateway_url, bearer=grants[i % len(grants)].access_token)
            await session.initialize()
            h = HeldStream(session)
            ready = asyncio.Event()
            h.task = asyncio.create_task(_hold_stream(stream_http, h, ready))
            await asyncio.wait_for(ready.wait(), 30)
            held.append(h)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(open_one(i) for i in range(n)), return_exceptions=True)
    open_seconds = time.perf_counter() - t0
    pg_peak = b.pg_peak_take()
    open_errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    opened = sum(1 for h in held if h.opened)
    b.log(f"  S5 opened {opened}/{n} SSE streams through the gateway in {open_seconds:.1f} s")
    rss_streams = [rss_mb(p) for p in workers]
    try:
        s1_result = await s1(b, concurrencies=(16,), check_hot_path=False)
        rss_peak = [rss_mb(p) for p in workers]
        still_open = sum(1 for h in held if h.opened and not h.closed_early)
    finally:
        for h in held:
            if h.task:
                h.task.cancel()
        await asyncio.gather(*(h.task for h in held if h.task), return_exceptions=True)
        await asyncio.gather(*(h.session.close() for h in held), return_exceptions=True)
        for client in [*https, stream_http]:
            await client.aclose()
    return {
        "streams_requested": n,
        "streams_opened": opened,
        "streams_still_open_after_s1": still_open,
        "open_errors": open_errors[:5],
        "open_seconds": round(open_seconds, 2),
        "postgres_connections_peak_while_opening": pg_peak,
        "rss_mb_per_worker": {
            "before": [round(x, 1) for x in rss_before],
            "streams_open": [round(x, 1) for x in rss_streams],
            "after_s1": [round(x, 1) for x in rss_peak],
        },
        "internal_server_rss_mb": round(rss_mb(b.st.mcp.pid), 1),
        "s1": s1_result,
    }


# ------------------------------------------------------------------------------------------------
# S6: cost growth with 1k, 100k, 1M grants and tokens in PostgreSQL


def _columns(conn, table: str) -> list[tuple[str, bool]]:
    rows = conn.execute(
        "SELECT column_name, is_identity = 'YES' FROM information_schema.columns WHERE table_name = %s "
        "ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    return [(name, bool(identity)) for name, identity in rows]


def _clone(
    conn,
    table: str,
    template_where: str,
    count: int,
    overrides: dict[str, str],
    start: int,
    with_clause: str = "",
    from_extra: str = "",
) -> None:
    """Insert ``count`` copies of one template row, numbered ``i`` from ``start``, with column overrides (SQL
    expressions over ``i``)."""
    cols = [name for name, identity in _columns(conn, table) if not identity]
    exprs = [overrides.get(name, f"t.{name}") for name in cols]
    conn.execute(
        f"{with_clause} INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(exprs)} "
        f"FROM generate_series({start}, {start + count - 1}) AS i, "
        f"(SELECT * FROM {table} WHERE {template_where} LIMIT 1) AS t {from_extra}"
    )


def bulk_load(b: Bench, grant: oauth.Grant, *, start: int, count: int) -> float:
    """Filler grants: per grant a client (one per ten grants), an upstream session, an access token and a
    refresh token, cloned from the real rows of ``grant`` with fresh identifiers. Returns seconds taken."""
    from .stack import _pg

    t0 = time.perf_counter()
    checksum = hashlib.sha256(grant.access_token.encode()).hexdigest()
    with _pg(b.st.deployment.database_url) as conn:
        at = conn.execute(
            "SELECT id, application_id, upstream_session_id FROM oauthproxy_accesstoken WHERE token_checksum = %s",
            (checksum,),
        ).fetchone()
        at_id, client_pk, session_id = at
        with conn.transaction():
            clients = max(1, count // 10)
            cstart = start // 10 + 1
            _clone(
                conn,
                "oauthproxy_client",
                f"id = {client_pk}",
                clients,
                {"client_id": "'filler-c-' || i", "registration_token_checksum": "''"},
                cstart,
            )
            arr = (
                "WITH c AS (SELECT array_agg(id ORDER BY id) AS a FROM oauthproxy_client "
                "WHERE client_id LIKE 'filler-c-%')"
            )
            cref = "c.a[1 + (i % cardinality(c.a))]"
            _clone(
                conn,
                "oauthproxy_upstreamsession",
                f"id = '{session_id}'",
                count,
                {"id": "md5('filler-s-' || i)::uuid", "client_id": cref, "subject": "'filler' || i"},
                start,
                with_clause=arr,
                from_extra=", c",
            )
            _clone(
                conn,
                "oauthproxy_accesstoken",
                f"id = {at_id}",
                count,
                {
                    "token": "''",
                    "token_checksum": "encode(sha256(('filler-at-' || i)::bytea), 'hex')",
                    "application_id": cref,
                    "upstream_session_id": "md5('filler-s-' || i)::uuid",
                    "source_refresh_token_id": "NULL",
                    "id_token_id": "NULL",
                },
                start,
                with_clause=arr,
                from_extra=", c",
            )
            _clone(
                conn,
                "oauthproxy_refreshtoken",
                f"upstream_session_id = '{session_id}'",
                count,
                {
                    "token": "''",
                    "token_checksum": "encode(sha256(('filler-rt-' || i)::bytea), 'hex')",
                    "application_id": cref,
                    "upstream_session_id": "md5('filler-s-' || i)::uuid",
                    "access_token_id": "NULL",
                    "token_family": "md5('filler-f-' || i)::uuid",
                    "revoked": "NULL",
                    "replay_response": "''",
                },
                start,
                with_clause=arr,
                from_extra=", c",
            )
        for table in (
            "oauthproxy_client",
            "oauthproxy_upstreamsession",
            "oauthproxy_accesstoken",
            "oauthproxy_refreshtoken",
        ):
            conn.execute(f"ANALYZE {table}")
        # Write the load's dirty pages out now: otherwise the checkpoint the load's WAL triggers runs during the
        # measurement, and each commit pays full-page images on a saturated disk (a refresh p50 of 168 ms at
        # 1M grants in one full run, 4.8 ms when measured after the checkpoint).
        conn.execute("CHECKPOINT")
    return time.perf_counter() - t0


def mint_tokens(b: Bench, grant: oauth.Grant, n: int) -> list[str]:
    """n more proxy access tokens of ``grant``'s session, written straight to the database (as the token
    endpoint stores them: SHA-256 only), never seen by the proxy before: each one's first use is a cache miss."""
    from .stack import _pg

    raws = [secrets.token_urlsafe(32) for _ in range(n)]
    checksum = hashlib.sha256(grant.access_token.encode()).hexdigest()
    with _pg(b.st.deployment.database_url) as conn:
        at_id = conn.execute("SELECT id FROM oauthproxy_accesstoken WHERE token_checksum = %s", (checksum,)).fetchone()[
            0
        ]
        cols = [name for name, identity in _columns(conn, "oauthproxy_accesstoken") if not identity]
        exprs = {"token": "''", "token_checksum": "%s", "source_refresh_token_id": "NULL", "id_token_id": "NULL"}
        sql = (
            f"INSERT INTO oauthproxy_accesstoken ({', '.join(cols)}) SELECT "
            f"{', '.join(exprs.get(c, c) for c in cols)} FROM oauthproxy_accesstoken WHERE id = {at_id}"
        )
        with conn.cursor() as cur:
            cur.executemany(sql, [(hashlib.sha256(r.encode()).hexdigest(),) for r in raws])
    return raws


async def s6(b: Bench) -> dict[str, Any]:
    grant = (await b.flows("gateway", 1))[0]
    refresh_grant = (await b.flows("gateway", 1))[0]
    levels = []
    loaded = 0
    for level in b.mode.s6_levels:
        add = level - loaded
        if add > 0:
            seconds = await asyncio.get_running_loop().run_in_executor(
                b.pool, lambda start=loaded + 1, count=add: bulk_load(b, grant, start=start, count=count)
            )
            loaded = level
            b.log(f"  S6 loaded {level} grants ({seconds:.1f} s)")
        fresh = mint_tokens(b, grant, b.mode.s6_ops)
        async with new_http() as http:
            session = McpSession(http, b.st.gateway_url, bearer=grant.access_token)
            await session.initialize()
            for _ in range(5):
                await session.echo()
            hot = await closed_loop([session.echo], duration=b.mode.seconds, max_ops=b.mode.s6_ops)
            tokens = iter(fresh)

            async def cold(session: McpSession = session, tokens=tokens) -> None:
                session.set_bearer(next(tokens))
                await session.echo()

            cold_stats = await closed_loop([cold], duration=max(b.mode.seconds, 30), max_ops=len(fresh))
            await session.close()
        async with new_http() as http:
            refresh = await closed_loop(
                [lambda: oauth.refresh_async(http, refresh_grant)],
                duration=max(b.mode.seconds, 30),
                max_ops=b.mode.s6_ops,
            )
        server = b.server("gateway")
        async with new_http() as http:

            async def register(http: httpx.AsyncClient = http, server: oauth.AuthServer = server) -> None:
                response = await http.post(
                    server.registration_endpoint, json=oauth.registration_body("http://127.0.0.1:3333/callback")
                )
                if response.status_code != 201:
                    raise RuntimeError(f"{response.status_code} {response.text[:200]}")

            registration = await closed_loop([register], duration=max(b.mode.seconds, 10), max_ops=50)
        entry = {
            "grants_in_db": level,
            "gateway_cached_p50_ms": hot.summary()["p50_ms"],
            "gateway_cold_validation_p50_ms": cold_stats.summary()["p50_ms"],
            "gateway_cold_validation_p99_ms": cold_stats.summary()["p99_ms"],
            "refresh_p50_ms": refresh.summary()["p50_ms"],
            "refresh_p99_ms": refresh.summary()["p99_ms"],
            "registration_p50_ms": registration.summary()["p50_ms"],
            "errors": hot.errors + cold_stats.errors + refresh.errors + registration.errors,
        }
        levels.append(entry)
        b.log(
            f"  S6 {level:>9} grants: gateway cached p50 {entry['gateway_cached_p50_ms']} ms, cold "
            f"{entry['gateway_cold_validation_p50_ms']} ms, refresh p50 {entry['refresh_p50_ms']} ms, "
            f"registration p50 {entry['registration_p50_ms']} ms, "
            f"errors {entry['errors']}"
        )
    first, last = levels[0], levels[-1]
    growth = {
        k: round(last[k] / first[k], 2) if first[k] else None
        for k in ("gateway_cached_p50_ms", "gateway_cold_validation_p50_ms", "refresh_p50_ms", "registration_p50_ms")
    }
    return {"levels": levels, "growth_last_over_first": growth}
