"""The asyncio load generator: closed-loop virtual clients, each with its own connection and MCP session,
bounded in operations and in time.

The MCP client is deliberately lean (JSON-RPC over streamable HTTP with httpx, ~0.3 ms of client CPU per call)
so the client costs as little as possible of the two cores it shares with the servers it measures: the
same client drives the direct path, the gateway and FastMCP, so the ratios compare the servers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

PROTOCOL_VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"


class McpCallError(Exception):
    pass


def parse_jsonrpc(response: httpx.Response, body: bytes) -> dict[str, Any]:
    """The JSON-RPC response in a JSON or SSE body (the last ``data:`` that carries a result or error)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return json.loads(body)
    message = None
    for line in body.splitlines():
        if line.startswith(b"data:"):
            data = json.loads(line[5:])
            if "result" in data or "error" in data:
                message = data
    if message is None:
        raise McpCallError(f"no JSON-RPC response in {body[:200]!r}")
    return message


class McpSession:
    """One MCP client session over streamable HTTP (initialize handshake, then requests)."""

    def __init__(self, http: httpx.AsyncClient, url: str, *, bearer: str | None = None) -> None:
        self.http, self.url = http, url
        self.headers = {"accept": ACCEPT, "content-type": "application/json"}
        if bearer:
            self.headers["authorization"] = f"Bearer {bearer}"
        self.ids = itertools.count(1)
        self.session_id: str | None = None

    def set_bearer(self, bearer: str) -> None:
        self.headers["authorization"] = f"Bearer {bearer}"

    async def _post(self, message: dict[str, Any]) -> tuple[httpx.Response, bytes]:
        response = await self.http.post(self.url, content=json.dumps(message), headers=self.headers)
        return response, response.content

    async def initialize(self) -> None:
        self.headers.pop("mcp-session-id", None)  # a new session (also when initializing again)
        self.headers.pop("mcp-protocol-version", None)
        self.session_id = None
        response, body = await self._post(
            {
                "jsonrpc": "2.0",
                "id": next(self.ids),
                "method": "initialize",
                "params": {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "bench", "version": "1"},
                },
            }
        )
        if response.status_code != 200:
            raise McpCallError(f"initialize: {response.status_code} {body[:300]!r}")
        result = parse_jsonrpc(response, body)
        if "error" in result:
            raise McpCallError(f"initialize: {result['error']}")
        self.session_id = response.headers.get("mcp-session-id")
        if self.session_id:
            self.headers["mcp-session-id"] = self.session_id
        self.headers["mcp-protocol-version"] = result["result"].get("protocolVersion", PROTOCOL_VERSION)
        response, body = await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if response.status_code not in (200, 202):
            raise McpCallError(f"initialized: {response.status_code} {body[:300]!r}")

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        response, body = await self._post(
            {
                "jsonrpc": "2.0",
                "id": next(self.ids),
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments},
            }
        )
        if response.status_code != 200:
            raise McpCallError(f"tools/call: {response.status_code} {body[:300]!r}")
        message = parse_jsonrpc(response, body)
        if "error" in message or message["result"].get("isError"):
            raise McpCallError(f"tools/call: {message}")
        return message["result"]

    async def echo(self, text: str = "hello") -> None:
        result = await self.call_tool("echo", {"text": text})
        if result["content"][0]["text"] != text:
            raise McpCallError(f"echo answered {result}")

    async def close(self) -> None:
        if self.session_id:
            try:
                await self.http.delete(self.url, headers=self.headers)
            except httpx.HTTPError:
                pass


def new_http(*, connections: int = 1, timeout: float = 30) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=False,
    )


# ------------------------------------------------------------------------------------------------
# closed-loop runs


@dataclass
class RunStats:
    """Latencies (seconds) of the successful operations of one run, its errors and its duration."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    duration: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds during the run

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.duration if self.duration else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        out = {
            "ops": self.count,
            "errors": self.errors,
            "seconds": round(self.duration, 3),
            "rate": round(self.rate, 1),
            "p50_ms": round(self.pct(0.50) * 1000, 2),
            "p99_ms": round(self.pct(0.99) * 1000, 2),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2) if self.latencies else None,
        }
        for name, seconds in self.cpu.items():
            out[f"cpu_ms_per_op_{name}"] = round(seconds * 1000 / self.count, 3) if self.count else None
        if self.error_samples:
            out["error_samples"] = self.error_samples[:3]
        return out


async def closed_loop(
    workers: list[Callable[[], Awaitable[None]]],
    *,
    duration: float,
    max_ops: int,
    cpu_probes: dict[str, Callable[[], float]] | None = None,
) -> RunStats:
    """Each worker runs its operation back to back until ``duration`` seconds passed or ``max_ops`` operations
    (all workers together) were started. CPU of the probed processes is sampled around the run."""
    stats = RunStats()
    started = itertools.count()
    probes = cpu_probes or {}
    cpu_before = {name: probe() for name, probe in probes.items()}
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(op: Callable[[], Awaitable[None]]) -> None:
        while time.perf_counter() < deadline and next(started) < max_ops:
            start = time.perf_counter()
            try:
                await op()
            except Exception as exc:  # noqa: BLE001 - counted and sampled, the run goes on
                stats.errors += 1
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            stats.latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(op) for op in workers))
    stats.duration = time.perf_counter() - t0
    stats.cpu = {name: probe() - cpu_before[name] for name, probe in probes.items()}
    return stats
