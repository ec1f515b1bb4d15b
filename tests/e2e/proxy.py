"""The proxy as a real server process for end-to-end tests: uvicorn, PostgreSQL, production settings.

    from proxy import listen_loopback, start_proxy

    listener = listen_loopback()                     # the port is known before anything starts
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    ... start the IdP with redirect URI f"{base_url}/oauth/demo/callback" ...
    with start_proxy([server_document], listener=listener) as proxy:
        proxy.base_url, proxy.url("/mcp/demo"), proxy.log_text(), proxy.sql("SELECT ...")

What runs is what a deployment runs (README, Dockerfile): ``proxy_site.settings.production`` configured by
environment variables, ``manage.py migrate``, ``manage.py import_servers FILE``, and
``uvicorn proxy_site.asgi:application``. What differs from production is meant for loopback tests:
``ALLOW_HTTP_BASE_URL`` (http public URL), ``CIMD_ALLOW_PRIVATE_ADDRESSES`` (the client metadata document is
served on loopback), and short token lifetimes or refresh margins where a scenario needs them.

Reliability:
- Ports are chosen by the kernel at run time. The listening socket is bound here (port 0) and handed to
  uvicorn as an inherited file descriptor (``--fd``), so the port is known before the process starts
  (it goes into ``PUBLIC_BASE_URL`` and into the IdP's redirect URI) and no other process can take it in
  between. Connections made before the app is up wait in the socket's backlog.
- Readiness: uvicorn announces itself with a JSON line once it serves the socket (``harness.ManagedProcess``
  waits for it, never for a fixed time), then ``/readyz`` must answer 200 (database reachable).
- Every process is stopped and every database dropped when the ``with`` block ends, at interpreter exit,
  and (processes) when the test process dies: the server exits when its stdin closes.
- Databases: ``manage.py migrate`` runs once per test run into a template database; each proxy gets a
  fresh copy (``CREATE DATABASE ... TEMPLATE``, well under a second). Databases left behind by a test run
  that was killed are dropped by the next run.

Two processes behind one database: ``ProxyDeployment`` is one configuration (database, keys, public URL);
``deployment.start_process(listener)`` starts one more process of it; ``LoadBalancer`` puts them behind one
public URL.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

try:  # importable both as a top-level module (pytest rootdir insertion) and as a package module
    import harness
except ImportError:  # pragma: no cover
    from tests.e2e import harness

E2E_DIR = Path(__file__).resolve().parent
REPO_DIR = E2E_DIR.parent.parent
MANAGE_PY = REPO_DIR / "manage.py"
SETTINGS_MODULE = "proxy_site.settings.production"
DB_PREFIX = "oauthproxy_e2e_"
DEFAULT_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT = 60.0

# What a proxy process inherits from the test process: nothing that configures the proxy. Its settings come
# only from its deployment (below), never from whatever the developer's shell exports.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")

__all__ = [
    "Database",
    "LoadBalancer",
    "ProxyDeployment",
    "ProxyProcess",
    "Proxy",
    "collectstatic",
    "create_database",
    "listen_loopback",
    "start_proxy",
]


# ------------------------------------------------------------------------------------------------
# sockets



def _manage_run(args: list[str], *, env: Mapping[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`manage.py ARGS` in the repository with *env*, output captured."""
    return subprocess.run(
        [sys.executable, str(MANAGE_PY), *args], cwd=REPO_DIR, env=env, capture_output=True, text=True,
        timeout=timeout,
    )

def listen_loopback(host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket on a port the kernel picks; pass it to a server that takes it over."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the listener says TCP.
    sock = socket.socket(
        socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(256)
    return sock


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def _admin_url() -> str:
    """Where to create databases: DATABASE_URL's server (make test sets it), database `postgres`."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        return DEFAULT_ADMIN_URL
    return _with_database(url, "postgres")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def _connect(url: str):
    import psycopg  # the proxy's own dependency

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def _ident(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"unexpected database name {name!r}")
    return f'"{name}"'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Database:
    """One PostgreSQL database of this test run; `drop()` is idempotent."""

    name: str
    url: str
    dropped: bool = False

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run one query on this database (for assertions on what the proxy stored)."""
        with _connect(self.url) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def drop(self) -> None:
        if self.dropped:
            return
        with _connect(_admin_url()) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {_ident(self.name)} WITH (FORCE)")
        self.dropped = True
        _databases.discard(self)

    def __hash__(self) -> int:
        return hash(self.name)


_databases: set[Database] = set()
_counter = itertools.count(1)
_template_lock = threading.Lock()
_template: Database | None = None


def _drop_stale_databases() -> None:
    """Drop databases of earlier test runs whose process is gone (killed runs leave them behind)."""
    with _connect(_admin_url()) as conn:
        names = [
            row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (DB_PREFIX + "%",))
        ]
        for name in names:
            match = re.fullmatch(DB_PREFIX + r"(\d+)_\w+", name)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")


def _template_database() -> Database:
    """The migrated template, built once per test run with `manage.py migrate`."""
    global _template
    with _template_lock:
        if _template is None:
            _drop_stale_databases()
            name = f"{DB_PREFIX}{os.getpid()}_template"
            with _connect(_admin_url()) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
                conn.execute(f"CREATE DATABASE {_ident(name)}")
            template = Database(name, _with_database(_admin_url(), name))
            _databases.add(template)
            env = _base_env(
                public_base_url="http://127.0.0.1:9",
                database_url=template.url,
                secret_key="e2e-migrate",
                encryption_keys=_new_key(),
            )
            result = _manage_run(["migrate", "--noinput"], env=env, timeout=300)
            if result.returncode != 0:
                template.drop()
                raise harness.HarnessError(f"manage.py migrate failed:\n{result.stdout}\n{result.stderr}")
            _template = template
        return _template


def create_database() -> Database:
    """A fresh, migrated database for one deployment."""
    template = _template_database()
    name = f"{DB_PREFIX}{os.getpid()}_{next(_counter)}"
    with _connect(_admin_url()) as conn:
        conn.execute(f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(template.name)}")
    database = Database(name, _with_database(_admin_url(), name))
    _databases.add(database)
    return database


@atexit.register
def _drop_all_databases() -> None:
    for database in sorted(_databases, key=lambda d: d.name.endswith("_template")):  # template last
        try:
            database.drop()
        except Exception as exc:  # noqa: BLE001 - best effort at exit; the next run drops leftovers
            print(f"e2e: could not drop database {database.name}: {exc}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# static files (the admin's CSS and JS; production serves them from STATIC_ROOT via WhiteNoise)

_static_done = False


def collectstatic() -> None:
    """`manage.py collectstatic` once per test run, as the Docker image does at build time.

    Production settings use the manifest storage: without this, admin pages fail to render. STATIC_ROOT
    (var/static, git-ignored) is shared by concurrent test runs, so a file lock serialises them.
    """
    global _static_done
    if _static_done:
        return
    lock_path = REPO_DIR / "var" / ".e2e-collectstatic.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    env = _base_env(
        public_base_url="http://127.0.0.1:9",
        database_url="postgres://unused@127.0.0.1:1/unused",
        secret_key="e2e-collectstatic",
        encryption_keys=_new_key(),
    )
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = _manage_run(["collectstatic", "--noinput"], env=env, timeout=300)
    if result.returncode != 0:
        raise harness.HarnessError(f"manage.py collectstatic failed:\n{result.stdout}\n{result.stderr}")
    _static_done = True


# ------------------------------------------------------------------------------------------------
# environment


def _new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _base_env(
    *,
    public_base_url: str,
    database_url: str,
    secret_key: str,
    encryption_keys: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    env.update(
        DJANGO_SETTINGS_MODULE=SETTINGS_MODULE,
        SECRET_KEY=secret_key,
        PROXY_ENCRYPTION_KEYS=encryption_keys,
        PUBLIC_BASE_URL=public_base_url,
        DATABASE_URL=database_url,
        ALLOW_HTTP_BASE_URL="true",
        CIMD_ALLOW_PRIVATE_ADDRESSES="true",
        OUTBOUND_ALLOW_SPECIAL_ADDRESSES="true",  # the upstream and internal servers listen on loopback
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------------
# one deployment: configuration + database; any number of processes


class ProxyDeployment:
    """A configured proxy: public URL, keys, database. Start processes of it with `start_process`."""

    def __init__(
        self,
        *,
        public_base_url: str,
        database: Database | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.public_base_url = public_base_url.rstrip("/")
        self.database = database or create_database()
        self.secret_key = "e2e-" + secrets.token_urlsafe(32)
        self.encryption_keys = _new_key()
        self.extra_env = dict(env or {})
        self.processes: list[ProxyProcess] = []

    def env(self) -> dict[str, str]:
        return _base_env(
            public_base_url=self.public_base_url,
            database_url=self.database.url,
            secret_key=self.secret_key,
            encryption_keys=self.encryption_keys,
            extra=self.extra_env,
        )

    def url(self, path: str) -> str:
        return self.public_base_url + path

    def manage(self, *args: str, env: Mapping[str, str] | None = None, check: bool = True) -> str:
        """Run `manage.py ARGS` with this deployment's settings; returns stdout (raises on failure)."""
        result = _manage_run(list(args), env={**self.env(), **(env or {})}, timeout=120)
        if check and result.returncode != 0:
            raise harness.HarnessError(
                f"manage.py {' '.join(args)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout + result.stderr if not check else result.stdout

    def import_servers(self, documents: Iterable[Mapping[str, Any]]) -> str:
        """`manage.py import_servers FILE` with these configuration documents (DESIGN §3)."""
        docs = [{k: v for k, v in doc.items() if v is not None} for doc in documents]
        with tempfile.NamedTemporaryFile("w", prefix="e2e-servers-", suffix=".json", delete=False) as f:
            json.dump(docs, f, indent=2)
            path = f.name
        try:
            return self.manage("import_servers", path)
        finally:
            os.unlink(path)

    def create_admin(self, username: str = "admin", password: str | None = None) -> tuple[str, str]:
        """`manage.py ensure_admin` (what `make run` does); returns (username, password)."""
        password = password or secrets.token_urlsafe(16)
        self.manage("ensure_admin", env={"ADMIN_USERNAME": username, "ADMIN_PASSWORD": password})
        return username, password

    def start_process(self, listener: socket.socket | None = None, *, name: str = "proxy") -> ProxyProcess:
        proc = ProxyProcess(self, listener or listen_loopback(), name=name)
        self.processes.append(proc)
        return proc

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
        return self.database.sql(query, params)

    def stop(self, *, drop_database: bool = True) -> None:
        for proc in self.processes:
            proc.stop()
        if drop_database:
            self.database.drop()


class ProxyProcess(harness.ManagedProcess):
    """One uvicorn process serving the proxy on an inherited, already listening socket."""

    def __init__(self, deployment: ProxyDeployment, listener: socket.socket, *, name: str = "proxy") -> None:
        self.deployment = deployment
        self.direct_url = socket_url(listener)  # this process itself, bypassing any load balancer
        fd = listener.fileno()
        try:
            super().__init__(
                name,
                [sys.executable, str(Path(__file__).resolve()), "serve", "--fd", str(fd)],
                env=deployment.env(),
                cwd=REPO_DIR,
                ready_timeout=READY_TIMEOUT,
                pass_fds=(fd,),
            )
        finally:
            listener.close()  # the child has its own copy; ours would keep the port open after it exits
        try:
            self._wait_readyz()
        except BaseException:
            self.stop()
            raise

    def _wait_readyz(self) -> None:
        response = httpx.get(f"{self.direct_url}/readyz", timeout=30)
        if response.status_code != 200:
            raise harness.HarnessError(
                f"{self.name}: /readyz answered {response.status_code}: {response.text}\n{self.log_text()}"
            )


class Proxy:
    """A deployment with one process: what most tests need. `with start_proxy(...) as proxy:`."""

    def __init__(self, deployment: ProxyDeployment, process: ProxyProcess) -> None:
        self.deployment = deployment
        self.process = process
        self.base_url = deployment.public_base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_text(self, limit: int = 20_000) -> str:
        return self.process.log_text(limit)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> list[tuple]:
        return self.deployment.sql(query, params)

    def is_running(self) -> bool:
        return self.process.is_running()

    def stop(self) -> None:
        self.deployment.stop()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy(
    servers: Iterable[Mapping[str, Any]],
    *,
    listener: socket.socket | None = None,
    env: Mapping[str, str] | None = None,
) -> Proxy:
    """A fresh database, `import_servers` of `servers`, and one uvicorn process on `listener`."""
    listener = listener or listen_loopback()
    deployment = ProxyDeployment(public_base_url=socket_url(listener), env=env)
    try:
        deployment.import_servers(servers)
        process = deployment.start_process(listener)
    except BaseException:
        listener.close()
        deployment.stop()
        raise
    return Proxy(deployment, process)


# ------------------------------------------------------------------------------------------------
# a load balancer: one public URL, several proxy processes, routing chosen by the test


@dataclass
class Routed:
    method: str
    path: str
    backend: int
    status: int | None = None


HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}


@dataclass
class LoadBalancer:
    """An HTTP reverse proxy on a loopback port in front of several proxy processes (what a real
    deployment has in front of its stateless workers). Each request goes to the backend that
    `route(method, path)` names (default: round robin), the Host header is kept, responses stream
    through unbuffered (SSE). `log` records which backend served what."""

    backends: list[str]
    route: Callable[[str, str], int] | None = None
    listener: socket.socket | None = None
    log: list[Routed] = field(default_factory=list)

    def __post_init__(self) -> None:
        import uvicorn  # the proxy's own dependency

        self._rr = itertools.count()
        self.listener = self.listener or listen_loopback()
        self.url = socket_url(self.listener)
        self._client: httpx.AsyncClient | None = None
        started = threading.Event()

        balancer = self

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                started.set()

            async def shutdown(self, sockets=None):
                await super().shutdown(sockets=sockets)
                if balancer._client is not None:
                    await balancer._client.aclose()

        config = uvicorn.Config(
            self._app, interface="asgi3", lifespan="off", log_level="warning", timeout_graceful_shutdown=1
        )
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.listener]}, name="e2e-lb", daemon=True
        )
        self._thread.start()
        if not started.wait(30):
            raise harness.HarnessError("load balancer did not start")

    def pick(self, method: str, path: str) -> int:
        if self.route is not None:
            return self.route(method, path)
        return next(self._rr) % len(self.backends)

    def backends_for(self, predicate: Callable[[Routed], bool]) -> set[int]:
        return {r.backend for r in self.log if predicate(r)}

    async def _app(self, scope, receive, send) -> None:
        import anyio

        if scope["type"] != "http":
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), follow_redirects=False)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        index = self.pick(scope["method"], path)
        entry = Routed(scope["method"], path, index)
        self.log.append(entry)
        target = self.backends[index] + scope["raw_path"].decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        # A bare Request, not client.build_request(): the client's cookie jar must never add one user's
        # cookies to another user's request (a load balancer keeps no cookies).
        request = httpx.Request(scope["method"], target, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            entry.status = 502
            payload = f"bad gateway: {type(exc).__name__}".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 502,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(payload)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        entry.status = response.status_code
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            await response.aclose()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> LoadBalancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# the server process itself: `python tests/e2e/proxy.py serve --fd N`


def _serve(argv: list[str]) -> None:
    """uvicorn proxy_site.asgi:application on the inherited socket; prints the ready line, exits on stdin EOF."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)

    def watch_stdin() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    sock = socket.socket(fileno=args.fd)  # family and type come from the descriptor

    class _ReadyServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                sys.stdout.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
                sys.stdout.flush()

    sys.path.insert(0, str(REPO_DIR))
    config = uvicorn.Config(
        "proxy_site.asgi:application",
        lifespan="off",  # Django has no lifespan handler
        log_level="info",
        access_log=True,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
    )
    _ReadyServer(config).run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        _serve(sys.argv[2:])
    else:
        sys.exit("usage: proxy.py serve --fd N")
