"""The processes a benchmark run needs, all on loopback, all stopped when the run ends.

- the upstream IdP (oidc-provider, ``tests/e2e/harness.start_upstream``) and the internal MCP server (MCP Python
  SDK, ``harness.start_mcp_server``), both from the end-to-end harness;
- the proxy as production runs it: ``uvicorn proxy_site.asgi:application --workers N`` (uvloop, httptools,
  no access log), ``DEBUG`` off, a fresh PostgreSQL database migrated with ``manage.py migrate`` and configured
  with ``manage.py import_servers``, Redis as the shared cache. Settings are ``bench.settings_bench``:
  production settings with the open endpoints' rate limits raised out of the way (still counted in Redis);
- FastMCP's OIDCProxy (``bench/fastmcp_server.py`` in ``bench/.venv-fastmcp``), as a gateway to the same
  internal server and serving its own echo tool.

Process accounting (CPU seconds, RSS) reads ``/proc``: a uvicorn host is its supervisor plus its workers.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
E2E_DIR = REPO_DIR / "tests" / "e2e"
if str(E2E_DIR) not in sys.path:
    sys.path.insert(0, str(E2E_DIR))

import harness  # noqa: E402  (tests/e2e/harness.py: the IdP and the internal MCP server)

FASTMCP_PYTHON = BENCH_DIR / ".venv-fastmcp" / "bin" / "python"
FASTMCP_SCRIPT = BENCH_DIR / "fastmcp_server.py"
SETTINGS_MODULE = os.environ.get("BENCH_SETTINGS", "bench.settings_bench")  # run.py --settings proposed
ADMIN_DB_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DB_PREFIX = "oauthproxy_bench_"
SLUG = "bench"
# S7's variants of the same server: a tool policy (every tools/call parsed, none refused) and identity assertions.
VARIANT_SLUGS = {
    "gateway_tool_policy": ("bench-policy", {"tool_policy": [{"tools": ["admin_*"], "groups": ["bench-admins"]}]}),
    "gateway_identity": ("bench-identity", {"identity_assertion": True}),
}
UPSTREAM_SECRET = "bench upstream secret/with+odd=chars"
# authlib (FastMCP's upstream client) sends Basic credentials without form-encoding them (RFC 6749 §2.3.1), which
# the IdP refuses for the secret above; FastMCP's clients get a plain one.
FASTMCP_UPSTREAM_SECRET = "fastmcpUpstreamSecret0123456789"
SCOPES = ["openid", "profile", "email", "offline_access"]
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The IdP as a company IdP, minus what would only slow the bench's own driving of it (auto consent).
IDP_CONFIG: dict[str, Any] = {
    "access_token_ttl": 3600,
    "refresh_token_policy": "always",
    "rotate_refresh_tokens": True,
    "pkce_required": True,
    "auto_consent": True,
    "resource_indicators": True,
    "clock_tolerance": 0,
}

# ------------------------------------------------------------------------------------------------
# /proc accounting


def cpu_seconds(pids: Iterable[int]) -> float:
    """user + system CPU seconds of these processes (live ones)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    return total


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return sorted(kids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def _db_url(name: str) -> str:
    return re.sub(r"/[^/]*$", f"/{name}", ADMIN_DB_URL)


def _pg(url: str = ADMIN_DB_URL):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


_created_dbs: list[str] = []


@atexit.register
def _drop_dbs() -> None:
    for name in reversed(_created_dbs):
        with contextlib.suppress(Exception):
            with _pg() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drop_stale() -> None:
    """Databases of earlier bench runs whose process is gone."""
    with _pg() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (DB_PREFIX + "%",)).fetchall()
        for (name,) in rows:
            match = re.fullmatch(DB_PREFIX + r"(\d+)_\w+", name)
            if match and int(match.group(1)) != os.getpid():
                try:
                    os.kill(int(match.group(1)), 0)
                except ProcessLookupError:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_template: str | None = None
_counter = iter(range(1, 1_000_000))


def new_database() -> str:
    """A fresh migrated database (a copy of a template migrated once per run); returns its URL."""
    global _template
    if _template is None:
        _drop_stale()
        name = f"{DB_PREFIX}{os.getpid()}_template"
        with _pg() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        _created_dbs.insert(0, name)
        env = proxy_env(public_base_url="http://127.0.0.1:9", database_url=_db_url(name), keys=new_key())
        result = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=REPO_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            raise RuntimeError(f"migrate failed:\n{result.stdout}\n{result.stderr}")
        _template = name
    name = f"{DB_PREFIX}{os.getpid()}_{next(_counter)}"
    with _pg() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_template}"')
    _created_dbs.append(name)
    return _db_url(name)


# ------------------------------------------------------------------------------------------------
# the proxy


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def proxy_env(
    *,
    public_base_url: str,
    database_url: str,
    keys: str,
    secret_key: str = "bench-" + "x" * 40,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ") if k in os.environ}
    env.update(
        DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
        PYTHONPATH=str(REPO_DIR),
        SECRET_KEY=secret_key,
        PROXY_ENCRYPTION_KEYS=keys,
        PUBLIC_BASE_URL=public_base_url,
        ALLOW_HTTP_BASE_URL="true",
        DATABASE_URL=database_url,
        REDIS_URL=REDIS_URL,
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        MAX_REGISTRATIONS_PER_SERVER="100000000",
    )
    env.update(extra or {})
    return env


@dataclass
class ProxyDeployment:
    """One proxy configuration: public URL, keys, database. Start hosts (uvicorn process groups) of it."""

    public_base_url: str
    extra_env: dict[str, str] = field(default_factory=dict)
    database_url: str = ""
    keys: str = field(default_factory=new_key)
    secret_key: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(32))
    hosts: list[ProxyHost] = field(default_factory=list)
    cache_prefix: str = field(default_factory=lambda: "bench-" + secrets.token_hex(6))

    def __post_init__(self) -> None:
        self.database_url = self.database_url or new_database()

    def env(self) -> dict[str, str]:
        return proxy_env(
            public_base_url=self.public_base_url,
            database_url=self.database_url,
            keys=self.keys,
            secret_key=self.secret_key,
            extra={"BENCH_CACHE_PREFIX": self.cache_prefix, **self.extra_env},
        )

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_DIR,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def import_servers(self, documents: list[dict[str, Any]]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([{k: v for k, v in d.items() if v is not None} for d in documents], f)
        try:
            self.manage("import_servers", f.name)
        finally:
            os.unlink(f.name)

    def sql(self, query: str, params: Any = None) -> list[tuple]:
        with _pg(self.database_url) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def start_host(
        self, *, port: int | None = None, workers: int = 2, name: str = "proxy", env: Mapping[str, str] | None = None
    ) -> ProxyHost:
        host = ProxyHost(self, port=port or free_port(), workers=workers, name=name, env=env)
        self.hosts.append(host)
        return host

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


_live_groups: set[int] = set()


@atexit.register
def _kill_groups() -> None:
    for pgid in list(_live_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class ProxyHost:
    """``uvicorn proxy_site.asgi:application --workers N`` in its own process group (a "host")."""

    def __init__(
        self, deployment: ProxyDeployment, *, port: int, workers: int, name: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.deployment, self.port, self.workers, self.name = deployment, port, workers, name
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "proxy_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
            "--timeout-keep-alive",
            "30",
            "--backlog",
            "4096",
            "--limit-concurrency",
            "20000",
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_DIR,
            env={**deployment.env(), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _live_groups.add(self.proc.pid)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200 and len(self.worker_pids()) >= workers:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready in 90 s:\n{self.log_text()}")
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        if self.workers == 1:  # uvicorn serves in the process itself, no supervisor
            return [self.proc.pid]
        kids = children_of(self.proc.pid)
        # uvicorn's supervisor may keep a multiprocessing resource tracker; workers run the app
        return [pid for pid in kids if "resource_tracker" not in _cmdline(pid)]

    def pids(self) -> list[int]:
        return sorted({self.proc.pid, *self.worker_pids()})

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss_per_worker(self) -> list[float]:
        return [rss_mb(pid) for pid in self.worker_pids()]

    def log_text(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # workers of a killed supervisor would linger in the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _live_groups.discard(self.proc.pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------
# FastMCP


def fastmcp_available() -> bool:
    return FASTMCP_PYTHON.exists()


class FastMcpProc(harness.ManagedProcess):
    def __init__(
        self, *, mode: str, idp: harness.Upstream, client_id: str, internal_url: str = "", storage: str = "disk"
    ) -> None:
        argv = [
            str(FASTMCP_PYTHON),
            str(FASTMCP_SCRIPT),
            "--mode",
            mode,
            "--config-url",
            idp.discovery_url,
            "--client-id",
            client_id,
            "--client-secret",
            FASTMCP_UPSTREAM_SECRET,
            "--internal-url",
            internal_url,
            "--storage",
            storage,
        ]
        self.home = tempfile.mkdtemp(prefix=f"bench-fastmcp-{mode}-")
        super().__init__(f"fastmcp-{mode}", argv, cwd=BENCH_DIR, ready_timeout=90, env={"FASTMCP_HOME": self.home})
        self.url: str = self.ready_info["url"]
        self.base_url: str = self.ready_info["base_url"]
        self.mode = mode

    def cpu(self) -> float:
        return cpu_seconds([self.pid])

    def rss(self) -> float:
        return rss_mb(self.pid)

    def stop(self, timeout: float = 5.0) -> int | None:
        code = super().stop(timeout)
        import shutil

        shutil.rmtree(self.home, ignore_errors=True)
        return code


# ------------------------------------------------------------------------------------------------
# one stack


def upstream_client(client_id: str, redirect_uris: list[str], secret: str = UPSTREAM_SECRET) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": secret,
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["authorization_code", "refresh_token"],
    }


@dataclass
class Stack:
    idp: harness.Upstream
    mcp: harness.McpServerProc
    deployment: ProxyDeployment
    proxy: ProxyHost
    fastmcp_gateway: FastMcpProc | None = None
    fastmcp_own: FastMcpProc | None = None
    slug: str = SLUG

    @property
    def gateway_url(self) -> str:
        return f"{self.proxy.url}/mcp/{self.slug}"


RP_CLIENT = "bench-rp"  # the bench itself as a relying party of the IdP (the upstream's own refresh time)
RP_REDIRECT = "http://127.0.0.1:9/callback"


@contextlib.contextmanager
def stack(
    *,
    workers: int = 2,
    with_fastmcp: bool = True,
    proxy_extra_env: Mapping[str, str] | None = None,
    idp_config: Mapping[str, Any] | None = None,
    fastmcp_storage: str = "disk",
):
    with contextlib.ExitStack() as cleanup:
        idp = cleanup.enter_context(harness.start_upstream({**IDP_CONFIG, **(idp_config or {}), "clients": []}))
        idp.add_client(upstream_client(RP_CLIENT, [RP_REDIRECT]))
        mcp = cleanup.enter_context(harness.start_mcp_server())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        slugs = [SLUG, *(slug for slug, _ in VARIANT_SLUGS.values())]
        idp.add_client(upstream_client("mcp-proxy", [f"{base}/oauth/{slug}/callback" for slug in slugs]))
        deployment = ProxyDeployment(public_base_url=base, extra_env=dict(proxy_extra_env or {}))
        cleanup.callback(deployment.stop)
        deployment.import_servers(
            [idp.server_config("mcp-proxy", slug=SLUG, name="Bench tools", mcp_url=mcp.url, scopes=SCOPES)]
            + [
                idp.server_config(
                    "mcp-proxy", slug=slug, name=f"Bench tools ({target})", mcp_url=mcp.url, scopes=SCOPES, **fields
                )
                for target, (slug, fields) in VARIANT_SLUGS.items()
            ]
        )
        proxy = deployment.start_host(port=port, workers=workers)
        fgw = fown = None
        if with_fastmcp and fastmcp_available():
            # FastMCP's callback is BASE/auth/callback; its port is known only once it runs, so its IdP
            # client is added with a placeholder first and replaced with the real redirect URI.
            for mode in ("gateway", "own"):
                cid = f"fastmcp-{mode}"
                idp.add_client(upstream_client(cid, ["http://127.0.0.1:9/auth/callback"], FASTMCP_UPSTREAM_SECRET))
                proc = cleanup.enter_context(
                    FastMcpProc(mode=mode, idp=idp, client_id=cid, internal_url=mcp.url, storage=fastmcp_storage)
                )
                idp.add_client(upstream_client(cid, [f"{proc.base_url}/auth/callback"], FASTMCP_UPSTREAM_SECRET))
                if mode == "gateway":
                    fgw = proc
                else:
                    fown = proc
        yield Stack(idp=idp, mcp=mcp, deployment=deployment, proxy=proxy, fastmcp_gateway=fgw, fastmcp_own=fown)
