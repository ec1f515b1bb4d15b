"""Queries and in-process time per request for the proxy's non-gateway endpoints (register, refresh).

    .venv/bin/python -m bench.diagnose [--settings proposed]

Starts the stack, obtains a real grant over HTTP, then runs Django in a child process with the deployment's
settings and database and sends requests through Django's test client (no network, no ASGI server), counting
the SQL statements of each request (``CaptureQueriesContext``) and timing them. This separates what Django and
the project do per request from what the ASGI server, the thread hops and the connections cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

from . import oauth
from .load import closed_loop, new_http
from .stack import REPO_DIR, stack

CHILD = r"""
import json, sys, time
from urllib.parse import urlencode
import django
django.setup()
from django.db import connection, reset_queries
from django.test import Client
from django.test.utils import CaptureQueriesContext

args = json.loads(sys.argv[1])
client = Client(SERVER_NAME="127.0.0.1")
out = {}

def measure(name, fn, n):
    fn()  # warm
    with CaptureQueriesContext(connection) as ctx:
        status = fn()
    queries = [q["sql"][:160] for q in ctx.captured_queries]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    out[name] = {"status": status, "queries": len(queries), "sql": queries,
                 "ms_per_request_in_process": round((time.perf_counter() - t0) * 1000 / n, 2),
                 "cpu_ms_per_request_in_process": round((time.process_time() - c0) * 1000 / n, 2)}

register_body = json.dumps({"client_name": "diag", "redirect_uris": ["http://127.0.0.1:3333/cb"],
                            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                            "token_endpoint_auth_method": "none"})
measure("register", lambda: client.post(f"/oauth/{args['slug']}/register", register_body,
                                        content_type="application/json").status_code, 100)

state = {"rt": args["refresh_token"]}
def refresh():
    r = client.post(f"/oauth/{args['slug']}/token", urlencode({"grant_type": "refresh_token",
                    "refresh_token": state["rt"], "client_id": args["client_id"], "resource": args["resource"]}),
                    content_type="application/x-www-form-urlencoded")
    if r.status_code == 200:
        state["rt"] = r.json()["refresh_token"]
        return r.status_code
    return f"{r.status_code} {r.content[:200]!r}"
measure("refresh_not_due", refresh, 100)
if args.get("profile"):
    import cProfile, io, pstats
    for name, fn in (("register", lambda: client.post(f"/oauth/{args['slug']}/register", register_body,
                                                      content_type="application/json")), ("refresh", refresh)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            fn()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        out[f"profile_{name}"] = buf.getvalue()
print(json.dumps(out))
"""


async def http_latencies(st, server) -> dict:
    """The same requests over HTTP through the real server, one at a time: p50 of 200 each."""
    grant = oauth.full_flow(server)
    out = {}
    async with new_http() as http:

        async def healthz() -> None:
            (await http.get(f"{st.proxy.url}/healthz")).raise_for_status()

        async def register() -> None:
            response = await http.post(
                server.registration_endpoint, json=oauth.registration_body("http://127.0.0.1:3333/callback")
            )
            response.raise_for_status()

        for name, op in (
            ("healthz", healthz),
            ("register", register),
            ("refresh_not_due", lambda: oauth.refresh_async(http, grant)),
        ):
            await op()
            cpu_before = st.proxy.cpu()
            stats = await closed_loop([op], duration=60, max_ops=200)
            out[f"http_{name}"] = {
                "p50_ms": stats.summary()["p50_ms"],
                "p99_ms": stats.summary()["p99_ms"],
                "errors": stats.errors,
                "server_cpu_ms": round((st.proxy.cpu() - cpu_before) * 1000 / max(len(stats.latencies), 1), 2),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.diagnose")
    parser.add_argument("--settings", choices=("current", "proposed"), default="current")
    parser.add_argument("--profile", action="store_true", help="also cProfile 30 requests of each kind")
    args = parser.parse_args()
    from . import stack as stack_module

    stack_module.SETTINGS_MODULE = "bench.settings_proposed" if args.settings == "proposed" else "bench.settings_bench"
    with stack(workers=1, with_fastmcp=False) as st:
        server = oauth.discover(st.gateway_url)
        grant = oauth.full_flow(server)
        payload = json.dumps(
            {
                "slug": st.slug,
                "refresh_token": grant.refresh_token,
                "client_id": grant.client_id,
                "resource": server.resource,
                "profile": args.profile,
            }
        )
        result = subprocess.run(
            [sys.executable, "-c", CHILD, payload],
            cwd=REPO_DIR,
            env=st.deployment.env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            sys.exit(result.stderr[-5000:])
        data = json.loads(result.stdout.strip().splitlines()[-1])
        data.update(asyncio.run(http_latencies(st, server)))
    for name, entry in data.items():
        if name.startswith("http_"):
            print(
                f"{name}: p50 {entry['p50_ms']} ms, p99 {entry['p99_ms']} ms, errors {entry['errors']}, "
                f"server CPU {entry['server_cpu_ms']} ms per request"
            )
            continue
        if name.startswith("profile_"):
            print(f"--- {name}\n{entry}")
            continue
        print(
            f"{name}: HTTP {entry['status']}, {entry['queries']} queries, "
            f"{entry['ms_per_request_in_process']} ms ({entry['cpu_ms_per_request_in_process']} ms CPU) "
            "per request in process"
        )
        for sql in entry["sql"]:
            print(f"    {sql}")


if __name__ == "__main__":
    main()
