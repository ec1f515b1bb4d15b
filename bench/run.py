"""Run the benchmarks: ``python -m bench`` (see ``--help``, docs/PERFORMANCE.md).

    .venv/bin/python -m bench --quick                       # every scenario, short runs, 3 repeats (~10 min)
    .venv/bin/python -m bench --full                        # the numbers in docs/PERFORMANCE.md (~25 min)
    .venv/bin/python -m bench --quick --scenarios s1,s2     # some scenarios only
    .venv/bin/python -m bench --scenarios soak              # the two-host soak test alone

Needs PostgreSQL (BENCH_POSTGRES_URL, default postgres://postgres@127.0.0.1:5432/postgres), Redis
(BENCH_REDIS_URL, default redis://127.0.0.1:6379/0), the e2e upstream (tests/e2e/install.sh) and, for the
comparison, FastMCP in bench/.venv-fastmcp (``bench/install-fastmcp.sh``). Writes bench/results/<time>.json and
bench/results/latest.json and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import scenarios, soak
from .stack import BENCH_DIR, FASTMCP_PYTHON, REPO_DIR, fastmcp_available, stack

# S3 after S4 and S2: with the production settings as they are, S3's registration burst leaves PostgreSQL's
# connection slots full for a while (docs/PERFORMANCE.md, finding 1) and the next scenario's flows would fail.
SCENARIOS = ("s1", "s4", "s2", "s3", "s5", "s6", "s7", "soak")


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "",
    )
    mem = next(
        (line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0"
    )
    import django
    import httpx
    import uvicorn

    try:
        from importlib.metadata import version

        mcp_version = version("mcp")
    except Exception:  # noqa: BLE001
        mcp_version = "?"
    return {
        "cpu": cpu,
        "cores": int(_cmd(["nproc"]) or 0),
        "memory_gb": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "mcp": mcp_version,
        "postgres": _cmd(["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"]),
        "redis": _cmd(["redis-cli", "-h", "127.0.0.1", "INFO", "server"]).split("redis_version:")[-1].split()[0]
        if _cmd(["redis-cli", "-h", "127.0.0.1", "PING"]) == "PONG"
        else "",
        "node": _cmd([str(REPO_DIR / "tests/e2e/upstream/node_modules/.bin/node"), "--version"]),
        "fastmcp": _cmd([str(FASTMCP_PYTHON), "-c", "import fastmcp; print(fastmcp.__version__)"])
        if fastmcp_available()
        else "not installed",
        "git": _cmd(["git", "-C", os.environ.get("BENCH_SNAPSHOT", str(REPO_DIR)), "describe", "--always", "--dirty"]),
        "code_fingerprint": code_fingerprint(),
    }


def code_fingerprint() -> str:
    """SHA-256 over the product's Python files (the working tree moves while others work: this names the code
    that was measured)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*REPO_DIR.glob("oauthproxy/**/*.py"), *REPO_DIR.glob("proxy_site/**/*.py")]):
        digest.update(str(path.relative_to(REPO_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# the table


def _g(d: dict | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{value}{unit}"


def verdict(value: Any, ok: bool | None) -> str:
    if value is None or ok is None:
        return "n/a"
    return "met" if ok else "MISSED"


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, measured, target, verdict)."""
    rows: list[tuple[str, str, str, str]] = []
    s1 = results.get("s1")
    if s1:
        c16, c1 = _g(s1, "summary", "c16"), _g(s1, "summary", "c1")
        slow = _g(c16, "vs_direct", "gateway", "slowdown_x")
        rows.append(
            (
                "S1 c=16 tools/call/s direct | gateway | FastMCP gateway | FastMCP own",
                " | ".join(
                    _fmt(_g(c16, "targets", t, "rate")) for t in ("direct", "gateway", "fastmcp_gateway", "fastmcp_own")
                ),
                "",
                "",
            )
        )
        rows.append(
            (
                "S1 c=16 gateway slowdown vs direct (x)",
                _fmt(slow),
                "<= 1.5x",
                verdict(slow, slow is not None and slow <= 1.5),
            )
        )
        rows.append(
            (
                "S1 c=16 FastMCP gateway | own slowdown vs direct (x)",
                " | ".join(_fmt(_g(c16, "vs_direct", t, "slowdown_x")) for t in ("fastmcp_gateway", "fastmcp_own")),
                "",
                "",
            )
        )
        rows.append(
            (
                "S1 c=16 p99 ms direct | gateway | FastMCP gateway",
                " | ".join(_fmt(_g(c16, "targets", t, "p99_ms")) for t in ("direct", "gateway", "fastmcp_gateway")),
                "",
                "",
            )
        )
        delta = _g(c1, "vs_direct", "gateway", "p50_delta_ms")
        rows.append(
            (
                "S1 c=1 p50 ms direct | gateway | FastMCP gateway",
                " | ".join(_fmt(_g(c1, "targets", t, "p50_ms")) for t in ("direct", "gateway", "fastmcp_gateway")),
                "",
                "",
            )
        )
        rows.append(
            ("S1 c=1 gateway p50 added (ms)", _fmt(delta), "<= +2 ms", verdict(delta, delta is not None and delta <= 2))
        )
        rows.append(
            (
                "S1 proxy CPU ms per call c=1 | c=16",
                " | ".join(_fmt(_g(c, "targets", "gateway", "server_cpu_ms_per_call")) for c in (c1, c16)),
                "",
                "",
            )
        )
        rows.append(
            (
                "S1 FastMCP gateway CPU ms per call c=1 | c=16",
                " | ".join(_fmt(_g(c, "targets", "fastmcp_gateway", "server_cpu_ms_per_call")) for c in (c1, c16)),
                "",
                "",
            )
        )
        hp = s1.get("hot_path")
        if hp and "c16" in hp:
            rows.append(
                (
                    "S1 hot path: upstream calls | SQL statements in a run at c=1, c=16 (calls)",
                    f"{hp['upstream_calls']} | {hp['c1']['sql_statements']} ({hp['c1']['calls']}), "
                    f"{hp['c16']['sql_statements']} ({hp['c16']['calls']})",
                    "0 | cache refills only",
                    verdict(hp, hp["met"]),
                )
            )
    s7 = results.get("s7")
    if s7:
        variants = ("direct", "gateway", "gateway_tool_policy", "gateway_identity")
        for c in (1, 16):
            summary = _g(s7, "summary", f"c{c}")
            if not summary:
                continue
            rows.append(
                (
                    f"S7 c={c} tools/call/s direct | gateway | with tool policy | with identity assertion",
                    " | ".join(_fmt(_g(summary, "targets", t, "rate")) for t in variants),
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"S7 c={c} p50 ms direct | gateway | with tool policy | with identity assertion",
                    " | ".join(_fmt(_g(summary, "targets", t, "p50_ms")) for t in variants),
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"S7 c={c} slowdown vs direct (x): gateway | tool policy | identity assertion",
                    " | ".join(_fmt(_g(summary, "vs_direct", t, "slowdown_x")) for t in variants[1:]),
                    "within noise of the plain gateway",
                    "",
                )
            )
    s2 = results.get("s2")
    if s2:
        for c in (1, 16):
            nd = _g(s2, "summary", f"not_due_c{c}")
            due = _g(s2, "summary", f"due_c{c}")
            if not nd:
                continue
            x = nd.get("proxy_vs_fastmcp_rate_x")
            rows.append(
                (
                    f"S2 c={c} refresh/s not due: proxy | FastMCP",
                    f"{_fmt(_g(nd, 'proxy', 'rate'))} | {_fmt(_g(nd, 'fastmcp_gateway', 'rate'))}",
                    "",
                    "",
                )
            )
            rows.append(
                (f"S2 c={c} not due: proxy vs FastMCP (x)", _fmt(x), ">= 10x", verdict(x, x is not None and x >= 10))
            )
            extra = _g(due, "proxy_p50_minus_upstream_p50_ms")
            rows.append(
                (
                    f"S2 c={c} due: p50 ms proxy | upstream alone | FastMCP",
                    " | ".join(_fmt(_g(due, t, "p50_ms")) for t in ("proxy", "upstream", "fastmcp_gateway")),
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"S2 c={c} due: proxy p50 minus upstream p50 (ms)",
                    _fmt(extra),
                    "<= +10 ms",
                    verdict(extra, extra is not None and extra <= 10),
                )
            )
    s3 = results.get("s3")
    if s3:
        for c in (1, 16):
            sm = _g(s3, "summary", f"c{c}")
            x = _g(sm, "proxy_vs_fastmcp_rate_x")
            rows.append(
                (
                    f"S3 c={c} registrations/s proxy | FastMCP",
                    f"{_fmt(_g(sm, 'proxy', 'rate'))} | {_fmt(_g(sm, 'fastmcp_gateway', 'rate'))}",
                    ">= FastMCP",
                    verdict(x, x is not None and x >= 1),
                )
            )
    s4 = results.get("s4")
    if s4:
        p = _g(s4, "summary", "proxy")
        f = _g(s4, "summary", "fastmcp_gateway")
        rows.append(
            (
                "S4 flow wall ms: proxy | FastMCP",
                f"{_fmt(_g(p, 'wall_ms_per_flow'))} | {_fmt(_g(f, 'wall_ms_per_flow'))}",
                "",
                "",
            )
        )
        cpu = _g(p, "server_cpu_ms_per_flow")
        rows.append(
            (
                "S4 server CPU ms per flow: proxy | FastMCP",
                f"{_fmt(cpu)} | {_fmt(_g(f, 'server_cpu_ms_per_flow'))}",
                "proxy <= 30 ms",
                verdict(cpu, cpu is not None and cpu <= 30),
            )
        )
        rows.append(
            (
                "S4 upstream per flow: browser at IdP ms | IdP CPU ms",
                f"{_fmt(_g(p, 'browser_at_idp_ms_per_flow'))} | {_fmt(_g(p, 'idp_cpu_ms_per_flow'))}",
                "",
                "",
            )
        )
    s5 = results.get("s5")
    if s5:
        rss = max(_g(s5, "rss_mb_per_worker", "after_s1") or [0])
        rows.append(
            (
                "S5 SSE streams open | still open after S1",
                f"{s5['streams_opened']}/{s5['streams_requested']} | {s5['streams_still_open_after_s1']}",
                "all",
                verdict(s5, s5["streams_still_open_after_s1"] == s5["streams_requested"]),
            )
        )
        slow = _g(s5, "s1", "summary", "c16", "vs_direct", "gateway", "slowdown_x")
        rows.append(
            (
                "S5 S1 c=16 gateway slowdown under 1k streams (x)",
                _fmt(slow),
                "<= 1.5x",
                verdict(slow, slow is not None and slow <= 1.5),
            )
        )
        rows.append(("S5 proxy RSS MB per worker (max)", _fmt(rss), "<= 150 MB", verdict(rss, rss <= 150)))
    s6 = results.get("s6")
    if s6:
        for level in s6["levels"]:
            rows.append(
                (
                    f"S6 {level['grants_in_db']:>9,} grants: p50 ms gateway cached | cold validation | refresh | "
                    "registration",
                    f"{_fmt(level['gateway_cached_p50_ms'])} | {_fmt(level['gateway_cold_validation_p50_ms'])} | "
                    f"{_fmt(level['refresh_p50_ms'])} | {_fmt(level.get('registration_p50_ms'))}",
                    "",
                    "",
                )
            )
        growth = s6["growth_last_over_first"]
        worst = max(
            (
                growth[k]
                for k in ("gateway_cached_p50_ms", "gateway_cold_validation_p50_ms", "refresh_p50_ms")
                if growth.get(k) is not None
            ),
            default=None,
        )
        rows.append(
            (
                "S6 growth last/first level (gateway cached | cold | refresh)",
                " | ".join(
                    _fmt(growth[k])
                    for k in ("gateway_cached_p50_ms", "gateway_cold_validation_p50_ms", "refresh_p50_ms")
                ),
                "flat (<= 1.5x)",
                verdict(worst, worst is not None and worst <= 1.5),
            )
        )
        reg = growth.get("registration_p50_ms")
        rows.append(("S6 registration p50 growth last/first level (not a target)", _fmt(reg), "", ""))
    sk = results.get("soak")
    if sk:
        rows.append(
            (
                "Soak: ops | failed | lost sessions | grants ended",
                f"{sum(sk['ops'].values())} | {sum(sk['failed_ops'].values())} | {sk['lost_mcp_sessions']} | "
                f"{sk['grants_ended']}",
                "0 failed",
                "",
            )
        )
        rows.append(
            (
                "Soak: upstream refreshes IdP | sessions' count | over-refreshed grants",
                f"{sk['upstream_refresh_ok']} | {sk['sessions_refresh_count_sum']} | "
                f"{len(sk['grants_refreshed_more_than_once_per_expiry'])}",
                "one per grant per expiry",
                verdict(sk, sk["passed"]),
            )
        )
    return rows


def render_table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("what", "measured", "target", "verdict")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                str(c).replace("|", "\\|").ljust(w) if i < 3 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short runs (default)")
    size.add_argument("--full", action="store_true", help="longer runs, 5 repeats, S6 up to 1M grants")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=int, help="repeats per comparison (at least 3 for the docs)")
    parser.add_argument("--seconds", type=float, help="seconds per measured run")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers of the proxy (default 2)")
    parser.add_argument("--no-fastmcp", action="store_true", help="skip the FastMCP comparison")
    parser.add_argument(
        "--fastmcp-storage",
        choices=("disk", "memory"),
        default="disk",
        help="FastMCP's client storage: its default encrypted file store (disk), or in memory",
    )
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--soak-clients", type=int, default=50)
    parser.add_argument(
        "--settings",
        choices=("current", "proposed"),
        default="current",
        help="proxy settings: production as is (current), or with the changes docs/PERFORMANCE.md "
        "proposes (bench/settings_proposed.py), to measure their gain",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="measure a copy of the working tree taken now, so edits made while the run goes on "
        "(others working in the same tree) cannot change the code under test mid-run",
    )
    args = parser.parse_args(argv)
    if args.snapshot and not os.environ.get("BENCH_SNAPSHOT"):
        _rerun_in_snapshot([a for a in (argv if argv is not None else sys.argv[1:]) if a != "--snapshot"], args.out)

    from . import stack as stack_module

    stack_module.SETTINGS_MODULE = "bench.settings_proposed" if args.settings == "proposed" else "bench.settings_bench"
    mode = scenarios.FULL if args.full else scenarios.QUICK
    if args.repeats:
        mode = replace(mode, repeats=args.repeats)
    if args.seconds:
        mode = replace(mode, seconds=args.seconds)
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    with_fastmcp = not args.no_fastmcp and fastmcp_available()
    if not args.no_fastmcp and not fastmcp_available():
        print(
            "bench: FastMCP is not installed (bench/install-fastmcp.sh); running without the comparison",
            file=sys.stderr,
        )

    started = time.strftime("%Y-%m-%dT%H-%M-%S")
    results: dict[str, Any] = {
        "meta": {
            "started": started,
            "mode": mode.name,
            "repeats": mode.repeats,
            "seconds_per_run": mode.seconds,
            "workers": args.workers,
            "scenarios": chosen,
            "settings": args.settings,
            "fastmcp_storage": args.fastmcp_storage,
            "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
            "machine": machine(),
            "snapshot_of": os.environ.get("BENCH_SNAPSHOT", ""),
        },
    }
    print(f"bench: {mode.name}, scenarios {','.join(chosen)}, {mode.repeats} repeats x {mode.seconds:g} s", flush=True)

    def log(message: str) -> None:
        print(message, flush=True)

    async def run() -> None:
        stack_scenarios = [s for s in SCENARIOS if s in chosen and s != "soak"]
        if stack_scenarios:
            with stack(workers=args.workers, with_fastmcp=with_fastmcp, fastmcp_storage=args.fastmcp_storage) as st:
                b = scenarios.Bench(st, mode, log)
                b.pg_sampling_start()
                for name in stack_scenarios:
                    log(f"{name.upper()} ...")
                    t0 = time.monotonic()
                    try:
                        results[name] = await getattr(scenarios, name)(b)
                    except Exception as exc:  # noqa: BLE001 - one scenario's failure must not lose the others
                        import traceback

                        traceback.print_exc()
                        results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
                    if isinstance(results.get(name), dict):
                        results[name]["postgres_connections_peak"] = b.pg_peak_take()
                    log(
                        f"{name.upper()} done in {time.monotonic() - t0:.0f} s; PostgreSQL connections peak "
                        f"{results[name].get('postgres_connections_peak')}"
                    )
                    _write(results, args.out, started)
                results["meta"]["proxy_rss_mb_per_worker_end"] = [round(x, 1) for x in st.proxy.rss_per_worker()]
        if "soak" in chosen:
            log("SOAK ...")
            try:
                results["soak"] = await soak.soak(clients=args.soak_clients, seconds=args.soak_seconds, log=log)
            except Exception as exc:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                results["soak"] = {"failed": f"{type(exc).__name__}: {exc}"}

    asyncio.run(run())
    path = _write(results, args.out, started)
    print()
    print(render_table(table_rows({k: v for k, v in results.items() if isinstance(v, dict) and "failed" not in v})))
    for name, value in results.items():
        if isinstance(value, dict) and "failed" in value:
            print(f"{name}: FAILED: {value['failed']}")
    print(f"\nresults: {path}")
    snapshot = Path.cwd().parent
    if os.environ.get("BENCH_SNAPSHOT") and snapshot.name.startswith("bench-snapshot-"):
        import shutil

        shutil.rmtree(snapshot, ignore_errors=True)


def _rerun_in_snapshot(argv: list[str], out: Path) -> None:
    import shutil
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="bench-snapshot-")) / "repo"
    heavy = {
        ".venv",
        ".venv-fastmcp",
        "node_modules",
        ".git",
        "var",
        "results",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "db.sqlite3",
    }
    shutil.copytree(REPO_DIR, target, ignore=lambda _dir, names: [n for n in names if n in heavy], symlinks=True)
    (target / "tests/e2e/upstream/node_modules").symlink_to(REPO_DIR / "tests/e2e/upstream/node_modules")
    (target / "bench/.venv-fastmcp").symlink_to(BENCH_DIR / ".venv-fastmcp")
    if (REPO_DIR / "var/static").exists():
        shutil.copytree(REPO_DIR / "var/static", target / "var/static")
    print(f"bench: measuring a snapshot of the working tree in {target}", flush=True)
    os.chdir(target)
    env = {**os.environ, "BENCH_SNAPSHOT": str(REPO_DIR)}
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv, "--out", str(out.resolve())], env)


def _write(results: dict[str, Any], out: Path, started: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started}.json"
    text = json.dumps(results, indent=2, default=str)
    path.write_text(text)
    (out / "latest.json").write_text(text)
    return path
