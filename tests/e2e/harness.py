"""Real-parts harness for end-to-end tests: a real OpenID provider and a real MCP server as subprocesses.

    from harness import start_upstream, start_mcp_server, upstream_login

    with start_upstream({"clients": [{"client_id": "proxy", "client_secret": "s3cret",
                                       "redirect_uris": ["http://127.0.0.1:8000/oauth/demo/callback"]}]}) as idp:
        idp.issuer, idp.token_endpoint, idp.stats()
        with start_mcp_server(userinfo_url=idp.userinfo_endpoint) as mcp:
            mcp.url   # http://127.0.0.1:PORT/mcp

Both processes bind port 0 and announce the real address in a JSON line on stdout; the harness waits for
that line (never for a fixed time) and fails with the process log when it does not come. Every process
is stopped on `.stop()`, on leaving the `with` block, and at interpreter exit; the children also exit
by themselves when the test process dies, because the harness holds their stdin open and they exit on
its EOF.

The IdP is `upstream/idp.mjs` (oidc-provider on the Node 22 from `upstream/node_modules`, installed by
`tests/e2e/install.sh`); the MCP server is `mcp_server.py` (official MCP Python SDK).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

E2E_DIR = Path(__file__).resolve().parent
UPSTREAM_DIR = E2E_DIR / "upstream"
IDP_SCRIPT = UPSTREAM_DIR / "idp.mjs"
MCP_SERVER_SCRIPT = E2E_DIR / "mcp_server.py"

DEFAULT_READY_TIMEOUT = 30.0

__all__ = [
    "HarnessError",
    "ManagedProcess",
    "McpServerProc",
    "Upstream",
    "node_binary",
    "node_available",
    "start_mcp_server",
    "start_upstream",
    "upstream_login",
    "parse_redirect",
]


class HarnessError(RuntimeError):
    """A harness process failed to start, or an upstream interaction went somewhere unexpected."""


# ------------------------------------------------------------------------------------------------
# node


def node_binary() -> Path:
    """The Node 22 binary from the `node` npm package pinned in upstream/package.json."""
    return UPSTREAM_DIR / "node_modules" / ".bin" / "node"


def node_available() -> bool:
    """True when `install.sh` has run: the pinned node and oidc-provider are in upstream/node_modules."""
    return node_binary().exists() and (UPSTREAM_DIR / "node_modules" / "oidc-provider" / "package.json").exists()


# ------------------------------------------------------------------------------------------------
# process management

_live: set[ManagedProcess] = set()  # strong refs: a process nobody references is still stopped at exit


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        proc.stop()


class ManagedProcess:
    """A child process that announces readiness with a `{"ready": true, ...}` JSON line on stdout.

    stdout is read by a thread: the first JSON object with "ready": true becomes `.ready_info`, every
    other line goes to the log file together with stderr (`.log_path`, `.log_text()`), so the pipe
    never fills up.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> None:
        self.name = name
        self.argv = argv
        self.ready_info: dict[str, Any] = {}
        log = tempfile.NamedTemporaryFile(prefix=f"e2e-{name}-", suffix=".log", delete=False)
        self.log_path = Path(log.name)
        self._log = log
        self._log_lock = threading.Lock()
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._proc = subprocess.Popen(
            argv,
            cwd=str(cwd) if cwd else None,
            env=full_env,
            stdin=subprocess.PIPE,  # held open: the child exits on EOF, i.e. when we die
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,  # our terminal's Ctrl-C is not theirs; we stop them ourselves
        )
        _live.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _write_log(self, data: bytes) -> None:
        with self._log_lock:
            if not self._log.closed:
                self._log.write(data)
                self._log.flush()

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        announced = False
        for raw in self._proc.stdout:
            if not announced:
                try:
                    message = json.loads(raw)
                except ValueError:
                    message = None
                if isinstance(message, dict) and message.get("ready") is True:
                    announced = True
                    self._events.put(message)
                    continue
            self._write_log(raw)
        self._events.put(None)  # EOF: the process closed stdout (it is exiting)

    def _wait_ready(self, timeout: float) -> None:
        try:
            message = self._events.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(
                f"{self.name} did not report ready within {timeout:.0f}s\n--- log ---\n{self.log_text()}"
            ) from None
        if message is None:
            code = self._proc.wait(timeout=5)
            raise HarnessError(f"{self.name} exited with code {code} before ready\n--- log ---\n{self.log_text()}")
        self.ready_info = message

    def log_text(self, limit: int = 20_000) -> str:
        """The tail of the process's stderr and extra stdout."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:]

    def is_running(self) -> bool:
        return self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process: close stdin, SIGTERM, then SIGKILL. Idempotent; returns the exit code."""
        proc = self._proc
        if proc.poll() is None:
            try:
                if proc.stdin:
                    proc.stdin.close()
            except OSError:
                pass
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        self._reader.join(timeout=timeout)
        with self._log_lock:
            if not self._log.closed:
                self._log.close()
        _live.discard(self)
        return proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# the upstream IdP


class Upstream(ManagedProcess):
    """The running IdP. Endpoints come from its discovery document, fetched once at start."""

    def __init__(self, config: Mapping[str, Any], *, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        if not node_available():
            raise HarnessError(f"{node_binary()} is missing: run tests/e2e/install.sh")
        self.config = dict(config)
        self._runtime_clients: dict[str, dict[str, Any]] = {}  # added with add_client()
        cfg = {"port": 0, **self.config, "exit_on_stdin_eof": True}
        super().__init__(
            "idp",
            [str(node_binary()), str(IDP_SCRIPT)],
            env={"IDP_CONFIG": json.dumps(cfg)},
            cwd=UPSTREAM_DIR,
            ready_timeout=ready_timeout,
        )
        self.issuer: str = self.ready_info["issuer"]
        self.port: int = self.ready_info["port"]
        self.url: str = self.ready_info["base_url"]  # origin; interaction and /__ admin routes live here
        try:
            self.metadata: dict[str, Any] = self._admin("GET", self.discovery_url).json()
        except BaseException:
            self.stop()
            raise

    # endpoints ----------------------------------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @property
    def authorization_endpoint(self) -> str:
        return self.metadata["authorization_endpoint"]

    @property
    def token_endpoint(self) -> str:
        return self.metadata["token_endpoint"]

    @property
    def userinfo_endpoint(self) -> str:
        return self.metadata["userinfo_endpoint"]

    @property
    def revocation_endpoint(self) -> str | None:
        return self.metadata.get("revocation_endpoint")

    @property
    def introspection_endpoint(self) -> str | None:
        return self.metadata.get("introspection_endpoint")

    def server_config(self, client_id: str, **overrides: Any) -> dict[str, Any]:
        """An MCP-server configuration document (DESIGN §3) pointing at this IdP for `client_id`.

        `slug`, `name` and `mcp_url` are not known here: pass them as overrides.
        """
        client = next((c for c in self.config.get("clients", []) if c["client_id"] == client_id), None)
        if client is None:
            client = self._runtime_clients.get(client_id)
        if client is None:
            raise KeyError(f"unknown client {client_id!r}")
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "userinfo_endpoint": self.userinfo_endpoint,
            "revocation_endpoint": self.revocation_endpoint,
            "client_id": client_id,
            "client_secret": client.get("client_secret", ""),
            "token_endpoint_auth_methods_supported": [client.get("token_endpoint_auth_method", "client_secret_basic")],
            "scopes": ["openid", "profile", "email", "offline_access"],
            "use_pkce": True,
        }
        doc.update(overrides)
        return doc

    # admin endpoints ----------------------------------------------------------------------------

    def _admin(self, method: str, url: str, payload: Any = None) -> httpx.Response:
        response = httpx.request(method, url, json=payload, timeout=10)
        response.raise_for_status()
        return response

    def stats(self) -> dict[str, Any]:
        """GET /__stats: token-endpoint calls by grant_type and client, userinfo, revocation, logins..."""
        return self._admin("GET", f"{self.url}/__stats").json()

    def token_calls(self, grant_type: str, client_id: str | None = None) -> int:
        """How many token-endpoint calls with this grant_type (optionally: by this client) were made."""
        token = self.stats()["token"]
        if client_id is None:
            return token["by_grant_type"].get(grant_type, 0)
        return token["by_client"].get(client_id, {}).get(grant_type, 0)

    def reset_stats(self) -> None:
        self._admin("POST", f"{self.url}/__stats/reset")

    def set_config(self, **settings: Any) -> dict[str, Any]:
        """POST /__config: e.g. access_token_ttl=5, rotate_refresh_tokens=False, token_delay_ms=500,
        token_failures={"count": 1, "status": 503, "error": "temporarily_unavailable"}."""
        return self._admin("POST", f"{self.url}/__config", settings).json()

    def add_client(self, client: Mapping[str, Any]) -> None:
        """POST /__clients: add or replace a client while the IdP runs."""
        self._admin("POST", f"{self.url}/__clients", dict(client))
        self._runtime_clients[client["client_id"]] = dict(client)

    def revoke_grants(self, client_id: str | None = None, account_id: str | None = None) -> int:
        """Revoke matching grants (and all their tokens) at the IdP; returns how many."""
        payload = {k: v for k, v in {"client_id": client_id, "account_id": account_id}.items() if v}
        return self._admin("POST", f"{self.url}/__revoke_grants", payload).json()["revoked"]


def start_upstream(config: Mapping[str, Any], *, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> Upstream:
    """Start the IdP (see upstream/idp.mjs for every config key). Port 0 unless config says otherwise."""
    return Upstream(config, ready_timeout=ready_timeout)


# ------------------------------------------------------------------------------------------------
# the internal MCP server


class McpServerProc(ManagedProcess):
    """The running internal MCP server; `.url` is its streamable-HTTP endpoint."""

    def __init__(
        self,
        *,
        userinfo_url: str | None = None,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
    ) -> None:
        argv = [sys.executable, str(MCP_SERVER_SCRIPT), "--port", "0", "--exit-on-stdin-eof", *(args or [])]
        if userinfo_url:
            argv += ["--userinfo-url", userinfo_url]
        super().__init__("mcp-server", argv, env=env, cwd=E2E_DIR, ready_timeout=ready_timeout)
        self.url: str = self.ready_info["url"]
        self.port: int = self.ready_info["port"]
        self.base_url: str = self.url.rsplit("/", 1)[0]

    def stats(self) -> dict[str, Any]:
        """GET /__stats: HTTP requests that reached /mcp by method, 401s, the last request's headers."""
        return httpx.get(f"{self.base_url}/__stats", timeout=10).raise_for_status().json()


def start_mcp_server(
    userinfo_url: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    args: list[str] | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
) -> McpServerProc:
    """Start the internal MCP server.

    env: extra environment, e.g. {"REQUIRE_BEARER": "1"} or {"REQUIRE_BEARER": "userinfo"}.
    args: extra CLI flags: "--stateless", "--json-response", "--allow-any-host".
    """
    return McpServerProc(userinfo_url=userinfo_url, env=env, args=args, ready_timeout=ready_timeout)


# ------------------------------------------------------------------------------------------------
# driving the IdP's login/consent pages like a browser without JavaScript


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, str] = {}  # form id -> action
        self.prompt: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and a.get("id") and a.get("action"):
            self.forms[a["id"]] = a["action"]
        if tag == "main" and a.get("data-prompt"):
            self.prompt = a["data-prompt"]


def _request(client: Any, method: str, url: str, data: Mapping[str, str] | None = None) -> Any:
    """One request without following redirects, for httpx.Client or requests.Session."""
    if isinstance(client, httpx.Client):
        return client.request(method, url, data=data, follow_redirects=False)
    return client.request(method, url, data=data, allow_redirects=False)  # requests.Session


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def upstream_login(
    client: Any,
    authorize_url: str,
    username: str,
    *,
    abort: bool = False,
    max_steps: int = 10,
) -> str:
    """Log in at the upstream IdP and return the redirect back to the RP, without following it.

    client: an httpx.Client or requests.Session (keeps the IdP's cookies, like a browser would).
    authorize_url: the IdP authorization URL the RP redirected to (the Location of its redirect).
    abort: press "Cancel" instead: the returned URL then carries error=access_denied.

    Follows redirects while they stay on the IdP's origin, posts the login form (and the consent
    form when the IdP runs with auto_consent=false), and returns the first Location that leaves the
    IdP: the RP's redirect_uri with code (or error), state and iss.
    """
    idp_origin = _origin(authorize_url)
    url, method, data = authorize_url, "GET", None
    for _ in range(max_steps):
        response = _request(client, method, url, data)
        if response.status_code in (301, 302, 303, 307, 308):
            location = urljoin(url, response.headers["location"])
            if _origin(location) != idp_origin:
                return location
            url, method, data = location, "GET", None
            continue
        if response.status_code != 200:
            raise HarnessError(f"IdP answered {response.status_code} at {url}:\n{response.text[:2000]}")
        page = _FormParser()
        page.feed(response.text)
        if abort and "abort" in page.forms:
            url, method, data = urljoin(url, page.forms["abort"]), "POST", {}
        elif page.prompt == "login" and "login" in page.forms:
            url, method, data = urljoin(url, page.forms["login"]), "POST", {"login": username}
        elif page.prompt == "consent" and "confirm" in page.forms:
            url, method, data = urljoin(url, page.forms["confirm"]), "POST", {}
        else:
            raise HarnessError(f"unexpected IdP page at {url}:\n{response.text[:2000]}")
    raise HarnessError(f"no redirect back to the RP after {max_steps} steps")


def parse_redirect(location: str) -> dict[str, str]:
    """Query parameters of a redirect URL as a flat dict (code, state, iss, error, ...)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
