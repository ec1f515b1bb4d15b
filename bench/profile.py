"""Profile the proxy under one workload with py-spy (from bench/.venv-fastmcp, installed by install-fastmcp.sh).

    .venv/bin/python -m bench.profile register      # or: refresh, refresh-due, flow, echo
    .venv/bin/python -m bench.profile echo --seconds 15 --concurrency 16

Starts the stack (one worker, so the whole load lands in one profiled process), runs the workload while
``py-spy record`` samples that worker, then writes the collapsed stacks (bench/results/profile-<workload>.txt,
for flamegraph tools) and prints the functions with the most samples (self and cumulative).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
from pathlib import Path

from . import oauth
from .load import McpSession, closed_loop, new_http
from .scenarios import QUICK, Bench
from .stack import BENCH_DIR, stack

PY_SPY = BENCH_DIR / ".venv-fastmcp" / "bin" / "py-spy"


def summarize(raw: Path, top: int = 25) -> str:
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack_text, _, n = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(n)
        samples += count
        frames = stack_text.split(";")
        self_count[frames[-1]] += count
        for frame in set(frames):
            total_count[frame] += count
    out = [f"{samples} samples", "", "self:"]
    out += [f"  {100 * c / samples:5.1f}%  {f}" for f, c in self_count.most_common(top)]
    out += ["", "cumulative (project and heavy library frames):"]
    shown = 0
    for frame, count in total_count.most_common():
        if any(
            skip in frame
            for skip in (
                "<module>",
                "run (",
                "_run (",
                "run_forever",
                "_run_once",
                "serve (",
                "main (",
                "_bootstrap",
                "worker (",
                "run_until_complete",
            )
        ):
            continue
        out.append(f"  {100 * count / samples:5.1f}%  {frame}")
        shown += 1
        if shown >= top * 2:
            break
    return "\n".join(out)


async def prepare(b: Bench, name: str, concurrency: int):
    """Grants and clients for the workload, made before sampling starts."""
    if name == "echo":
        grants = await b.grants_for("gateway", concurrency)
        https = [new_http() for _ in range(concurrency)]
        sessions = [McpSession(h, b.st.gateway_url, bearer=g.access_token) for h, g in zip(https, grants, strict=True)]
        await asyncio.gather(*(s.initialize() for s in sessions))
        for s in sessions:
            await s.echo()
        return [s.echo for s in sessions]
    if name in ("refresh", "refresh-due"):
        if name == "refresh-due":
            b.st.idp.set_config(access_token_ttl=30)  # under the 60 s margin: every refresh goes upstream
        grants = await b.flows("gateway", concurrency)
        https = [new_http() for _ in range(concurrency)]
        ops = [lambda h=h, g=g: oauth.refresh_async(h, g) for h, g in zip(https, grants, strict=True)]
        for op in ops:
            await op()
        return ops
    if name == "register":
        server = b.server("gateway")
        https = [new_http() for _ in range(concurrency)]

        async def register(h) -> None:
            response = await h.post(
                server.registration_endpoint, json=oauth.registration_body("http://127.0.0.1:33333/callback")
            )
            response.raise_for_status()

        return [lambda h=h: register(h) for h in https]
    if name == "flow":
        loop = asyncio.get_running_loop()
        server = b.server("gateway")
        await b.flows("gateway", 2)
        return [lambda: loop.run_in_executor(b.pool, lambda: oauth.full_flow(server)) for _ in range(concurrency)]
    raise SystemExit(f"unknown workload {name}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("workload", choices=("register", "refresh", "refresh-due", "flow", "echo"))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (CPU, not waits)")
    parser.add_argument("--settings", choices=("current", "proposed"), default="current")
    args = parser.parse_args()
    from . import stack as stack_module

    stack_module.SETTINGS_MODULE = "bench.settings_proposed" if args.settings == "proposed" else "bench.settings_bench"
    out = BENCH_DIR / "results"
    out.mkdir(exist_ok=True)
    raw = out / f"profile-{args.workload}-{args.settings}{'-gil' if args.gil else ''}.txt"

    async def run() -> None:
        with stack(workers=1, with_fastmcp=False) as st:
            b = Bench(st, QUICK)
            ops = await prepare(b, args.workload, args.concurrency)
            worker = st.proxy.worker_pids()[0]
            spy = subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "--pid",
                    str(worker),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(int(args.seconds)),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    *(["--gil"] if args.gil else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            await asyncio.sleep(1)
            stats = await closed_loop(ops, duration=args.seconds - 1.5, max_ops=10**6)
            print(stats.summary())
            spy.wait(timeout=60)

    asyncio.run(run())
    print(summarize(raw))
    print(f"\ncollapsed stacks: {raw}")


if __name__ == "__main__":
    main()
