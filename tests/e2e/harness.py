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

Driving the proxy (it runs as a real process, see `proxy.py`):

    client = McpOAuthClient(f"{proxy_url}/mcp/demo", username="alice")   # official SDK + its OAuth provider
    anyio.run(client.call_tool, "whoami")       # 401 -> discovery -> DCR (or CIMD) -> authorize -> token
    client.http, client.authorizations, client.storage.tokens

The user's browser leg (`authorize_in_browser`) follows the proxy's redirects with one cookie jar, presses
Approve or Deny on the consent page (`submit_consent`), logs in at the IdP (`upstream_login`) and stops at
the redirect to the client. `start_redirect_receiver()` is a native client's loopback redirect receiver
(for a real browser), `start_document_server()` serves a client ID metadata document on loopback.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

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
    "AuthorizationFailed",
    "BrowserOutcome",
    "LoopbackServer",
    "McpOAuthClient",
    "MemoryTokenStorage",
    "authorize_in_browser",
    "bearer_of",
    "find_exception",
    "page_text",
    "sleep_until",
    "start_document_server",
    "start_redirect_receiver",
    "submit_consent",
    "tool_text",
    "wait_until",
]


class HarnessError(RuntimeError):
    """A harness process failed to start, or an upstream interaction went somewhere unexpected."""


# ------------------------------------------------------------------------------------------------
# node


# Debian's Chromium, launched the way this workplace allows (Playwright's own browser download cannot work
# here; without the background-networking flags Chromium keeps dialling out to a closed network).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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
        pass_fds: tuple[int, ...] = (),
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
            pass_fds=pass_fds,  # e.g. a listening socket the child serves on
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

    def introspect(self, token: str, client_id: str) -> dict[str, Any]:
        """RFC 7662 introspection at the IdP, authenticated as `client_id` (its own tokens only):
        {"active": bool, "exp": ..., "sub": ..., "scope": ...}."""
        client = next((c for c in self.config.get("clients", []) if c["client_id"] == client_id), None)
        client = client or self._runtime_clients[client_id]
        data, auth = {"token": token}, None
        if client.get("token_endpoint_auth_method") == "client_secret_post":
            data.update(client_id=client_id, client_secret=client["client_secret"])
        else:
            # RFC 6749 2.3.1: form-urlencode both before Basic (oidc-provider decodes them)
            auth = httpx.BasicAuth(quote(client_id, safe=""), quote(client["client_secret"], safe=""))
        if not self.introspection_endpoint:
            raise HarnessError("the IdP runs without introspection")
        response = httpx.post(self.introspection_endpoint, data=data, auth=auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def userinfo_status(self, access_token: str) -> int:
        """The status the IdP's userinfo endpoint answers for this access token (200, or 401 when expired)."""
        headers = {"Authorization": f"Bearer {access_token}"}
        return httpx.get(self.userinfo_endpoint, headers=headers, timeout=10).status_code

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


# ------------------------------------------------------------------------------------------------
# driving the proxy's pages (consent) and the whole browser leg of an authorization, without JavaScript


class _HtmlForm:
    def __init__(self, action: str | None, method: str) -> None:
        self.action = action
        self.method = method
        self.fields: list[tuple[str, str]] = []
        self.buttons: list[dict[str, str]] = []  # {"name", "value", "label"}


class _PageParser(HTMLParser):
    """Forms of a page: their fields (as a browser would submit them) and their submit buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_HtmlForm] = []
        self._form: _HtmlForm | None = None
        self._button: dict[str, str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self._form = _HtmlForm(a.get("action"), (a.get("method") or "get").upper())
            self.forms.append(self._form)
        elif self._form is None:
            return
        elif tag == "input":
            kind = a.get("type", "text").lower()
            if kind in ("submit", "image"):
                self._form.buttons.append(
                    {"name": a.get("name", ""), "value": a.get("value", ""), "label": a.get("value", "")}
                )
            elif kind in ("checkbox", "radio"):
                if "checked" in a and a.get("name"):
                    self._form.fields.append((a["name"], a.get("value", "on")))
            elif kind not in ("button", "reset", "file") and a.get("name"):
                self._form.fields.append((a["name"], a.get("value", "")))
        elif tag == "button" and a.get("type", "submit").lower() == "submit":
            self._button = {"name": a.get("name", ""), "value": a.get("value", ""), "label": ""}
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None and self._form is not None:
            self._button["label"] = " ".join("".join(self._text).split())
            self._form.buttons.append(self._button)
            self._button = None
        elif tag == "form":
            self._form = None


_DECISIONS = {
    "approve": re.compile(r"\b(approve|allow|authori[sz]e|accept|grant)\b", re.I),
    "deny": re.compile(r"\b(deny|reject|decline|refuse|cancel)\b", re.I),
}


def submit_consent(client: Any, page_url: str, html: str, decision: str) -> Any:
    """Press the Approve (or Deny) button of the consent page like a browser: the form's fields (CSRF
    token, hidden request id, checked boxes) plus the pressed button's name=value. Returns the response
    (not followed)."""
    pattern = _DECISIONS[decision]
    parser = _PageParser()
    parser.feed(html)
    for form in parser.forms:
        for button in form.buttons:
            if any(pattern.search(button[k] or "") for k in ("label", "value", "name")):
                data = list(form.fields)
                if button["name"]:
                    data.append((button["name"], button["value"]))
                action = urljoin(page_url, form.action) if form.action else page_url
                if form.method != "POST":
                    raise HarnessError(f"the consent form uses {form.method}, not POST")
                if isinstance(client, httpx.Client):
                    return client.post(action, data=dict(data), follow_redirects=False)
                return client.post(action, data=data, allow_redirects=False)
    raise HarnessError(f"no {decision!r} button on the page at {page_url}:\n{html[:3000]}")


@dataclass
class BrowserOutcome:
    """Where the browser leg of an authorization ended: the redirect to the MCP client's redirect URI."""

    location: str
    params: dict[str, str]
    consent_pages: list[str] = field(default_factory=list)  # HTML of each consent page shown
    denied_pages: list[str] = field(default_factory=list)  # HTML of the proxy's "no access" page, if shown
    trail: list[tuple[str, str, int]] = field(default_factory=list)  # (method, url, status) in order

    @property
    def error(self) -> str | None:
        return self.params.get("error")


def authorize_in_browser(
    client: httpx.Client,
    authorize_url: str,
    *,
    redirect_uri: str,
    username: str = "alice",
    consent: str = "approve",
    upstream_abort: bool = False,
    before_callback: Callable[[str], None] | None = None,
    max_steps: int = 20,
) -> BrowserOutcome:
    """The user's part of an authorization, through the proxy's pages and the upstream IdP's.

    Starts at the proxy's authorize URL and follows it like a browser (one cookie jar: `client`): the
    consent page (Approve or Deny pressed, `consent`), the upstream login (`upstream_login`; Cancel when
    `upstream_abort`), the proxy's callback, until the proxy redirects to `redirect_uri`, which is not
    contacted. `before_callback(url)` runs just before the browser follows the IdP's redirect to the
    proxy's callback (e.g. to stop the IdP). Raises HarnessError on anything else (an error page, a 500).
    """
    outcome = BrowserOutcome(location="", params={})
    proxy_origin = _origin(authorize_url)
    response = client.get(authorize_url, follow_redirects=False)
    for _ in range(max_steps):
        outcome.trail.append((response.request.method, str(response.request.url), response.status_code))
        if response.status_code in (301, 302, 303, 307, 308):
            location = urljoin(str(response.request.url), response.headers["location"])
            if location.split("?", 1)[0] == redirect_uri:
                outcome.location = location
                outcome.params = parse_redirect(location)
                return outcome
            if _origin(location) != proxy_origin:  # the upstream IdP
                back = upstream_login(client, location, username, abort=upstream_abort)
                outcome.trail.append(("GET", location, 0))  # status 0: the IdP's pages, see upstream_login
                if _origin(back) != proxy_origin:
                    raise HarnessError(f"the IdP redirected to {back}, not to the proxy")
                if before_callback is not None:
                    before_callback(back)
                location = back
            response = client.get(location, follow_redirects=False)
            continue
        page_url = str(response.request.url)
        if response.status_code == 403 and 'id="return-to-client"' in response.text:
            # The server's access policy refused the user: the page's link takes them back to the client.
            outcome.denied_pages.append(response.text)
            link = unescape(response.text.split('id="return-to-client" href="', 1)[1].split('"', 1)[0])
            if link.split("?", 1)[0] != redirect_uri:
                raise HarnessError(f"the access-denied page links to {link}, not to the client")
            outcome.location = link
            outcome.params = parse_redirect(link)
            return outcome
        if response.status_code == 200 and "text/html" in response.headers.get("content-type", ""):
            outcome.consent_pages.append(response.text)
            response = submit_consent(client, page_url, response.text, consent)
            continue
        raise HarnessError(
            f"proxy answered {response.status_code} at {page_url}: {page_text(response.text)[:2000]}\n"
            f"trail: {outcome.trail}"
        )
    raise HarnessError(f"no redirect to {redirect_uri} after {max_steps} steps; trail: {outcome.trail}")


def page_text(html: str) -> str:
    """The visible text of an HTML page, whitespace collapsed (for error messages and assertions)."""
    html = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", html)
    text = re.sub(r"(?s)<[^>]+>", " ", html)
    return " ".join(unescape(text).split())


# ------------------------------------------------------------------------------------------------
# the official MCP client (MCP Python SDK) with its OAuth client provider


class AuthorizationFailed(Exception):
    """The authorization ended with an OAuth error redirect to the client (error, state, ...)."""

    def __init__(self, params: dict[str, str], outcome: Any = None) -> None:
        super().__init__(f"authorization failed: {params}")
        self.params = params
        self.outcome = outcome


def find_exception(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`kind` anywhere in an exception's groups, causes and contexts (the SDK wraps transport errors)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        stack.extend(getattr(current, "exceptions", ()) or ())
        stack.extend([current.__cause__, current.__context__])
    return None


class MemoryTokenStorage:
    """The SDK's TokenStorage protocol, in memory: what a client keeps between runs (tokens, client info)."""

    def __init__(self) -> None:
        self.tokens: Any = None
        self.client_info: Any = None
        self.token_history: list[Any] = []

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens) -> None:
        self.tokens = tokens
        self.token_history.append(tokens)

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info) -> None:
        self.client_info = client_info


@dataclass
class HttpEvent:
    """One HTTP exchange the MCP client made (its OAuth requests included)."""

    method: str
    url: str
    status: int
    form: dict[str, str]
    error: str = ""  # the OAuth error of a refusal: a 401's WWW-Authenticate, or an OAuth endpoint's JSON body

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


@dataclass
class AuthorizationRecord:
    authorize_url: str
    params: dict[str, str]  # the authorization request's query parameters
    outcome: Any  # BrowserOutcome, or the final URL for a custom authorize function


class McpOAuthClient:
    """An MCP client app built on the official SDK: `mcp.Client` over streamable HTTP, authenticated by
    `mcp.client.auth.OAuthClientProvider` (discovery from the 401, DCR or CIMD, authorization code + PKCE +
    resource, token, refresh), with its tokens kept in `storage` between runs.

    The user's browser is `browser` (an httpx.Client with cookies) driven by `authorize_in_browser`, or
    `authorize`, an async function (authorize_url, redirect_uri) -> final redirect URL (e.g. Playwright).
    `http` records every HTTP exchange the SDK made; `authorizations` every time it sent the user to
    authorize.
    """

    def __init__(
        self,
        server_url: str,
        *,
        username: str = "alice",
        storage: MemoryTokenStorage | None = None,
        redirect_uri: str | None = None,
        client_name: str = "E2E MCP client",
        client_metadata_url: str | None = None,
        consent: str = "approve",
        upstream_abort: bool = False,
        before_callback: Callable[[str], None] | None = None,
        authorize: Callable[[str, str], Any] | None = None,
        mode: str = "legacy",
    ) -> None:
        self.server_url = server_url
        self.username = username
        self.storage = storage or MemoryTokenStorage()
        self.redirect_uri = redirect_uri or f"http://127.0.0.1:{_free_port()}/callback"
        self.client_name = client_name
        self.client_metadata_url = client_metadata_url
        self.consent = consent
        self.upstream_abort = upstream_abort
        self.before_callback = before_callback
        self.authorize = authorize
        self.mode = mode
        self.browser = httpx.Client(timeout=30)
        self.http: list[HttpEvent] = []
        self.authorizations: list[AuthorizationRecord] = []
        self._pending_url: str | None = None

    # the SDK's pieces -----------------------------------------------------------------------------

    def new_provider(self):
        """A fresh OAuthClientProvider over this client's storage (a new run of the client app)."""
        from mcp.client.auth import OAuthClientProvider
        from mcp.shared.auth import OAuthClientMetadata

        metadata = OAuthClientMetadata(
            client_name=self.client_name,
            redirect_uris=[self.redirect_uri],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        )
        provider = OAuthClientProvider(
            server_url=self.server_url,
            client_metadata=metadata,
            storage=self.storage,
            redirect_handler=self._redirect_handler,
            callback_handler=self._callback_handler,
        )
        if self.client_metadata_url:
            # The SDK accepts only https client_metadata_url values (as the CIMD draft says); on loopback
            # the document is served over http, which the proxy accepts only with
            # CIMD_ALLOW_PRIVATE_ADDRESSES. Everything else about the CIMD path is the SDK's own.
            provider.context.client_metadata_url = self.client_metadata_url
        return provider

    def http_client(self, provider=None, headers: Mapping[str, str] | None = None):
        import httpx2

        async def record(response) -> None:
            request = response.request
            form: dict[str, str] = {}
            if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
            self.http.append(
                HttpEvent(request.method, str(request.url), response.status_code, form, await _oauth_error(response))
            )

        return httpx2.AsyncClient(
            auth=provider,
            headers=dict(headers or {}),
            timeout=httpx2.Timeout(30, read=60),
            event_hooks={"response": [record]},
        )

    @contextlib.asynccontextmanager
    async def connect(self, provider=None, *, mode: str | None = None, bearer: str | None = None):
        """One MCP session through `provider` (default: a new one over the storage), or with a fixed
        bearer token and no OAuth at all."""
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        if bearer is None and provider is None:
            provider = self.new_provider()
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        http_client = self.http_client(None if bearer else provider, headers)
        async with http_client:
            async with Client(
                streamable_http_client(self.server_url, http_client=http_client), mode=mode or self.mode
            ) as client:
                yield client

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None, *, provider=None) -> Any:
        """One run of the client app: connect, call one tool, disconnect. Returns the CallToolResult."""
        async with self.connect(provider) as client:
            return await client.call_tool(name, dict(arguments or {}))

    # the user's browser ---------------------------------------------------------------------------

    async def _redirect_handler(self, authorization_url: str) -> None:
        self._pending_url = authorization_url

    async def _callback_handler(self):
        import anyio
        from mcp.shared.auth import AuthorizationCodeResult

        url, self._pending_url = self._pending_url, None
        if url is None:
            raise HarnessError("callback handler called before the redirect handler")
        if self.authorize is not None:
            final = await self.authorize(url, self.redirect_uri)
            outcome: Any = final
            params = parse_redirect(final)
        else:
            outcome = await anyio.to_thread.run_sync(self._browse, url)
            params = outcome.params
        self.authorizations.append(AuthorizationRecord(url, parse_redirect(url), outcome))
        if "code" not in params:
            raise AuthorizationFailed(params, outcome)
        return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))

    def _browse(self, url: str) -> BrowserOutcome:
        return authorize_in_browser(
            self.browser,
            url,
            redirect_uri=self.redirect_uri,
            username=self.username,
            consent=self.consent,
            upstream_abort=self.upstream_abort,
            before_callback=self.before_callback,
        )

    # what happened --------------------------------------------------------------------------------

    def requests(self, *, path_suffix: str = "", method: str | None = None, since: int = 0) -> list[HttpEvent]:
        return [e for e in self.http[since:] if e.path.endswith(path_suffix) and (method is None or e.method == method)]

    def close(self) -> None:
        self.browser.close()


async def _oauth_error(response) -> str:
    """The OAuth error a refused answer names: RFC 6750's `error` in WWW-Authenticate (the gateway), else
    RFC 6749's in a JSON body (the token endpoint). Only JSON bodies are read: an event stream never is."""
    if response.status_code < 400:
        return ""
    challenge = re.search(r'\berror="([^"]*)"', response.headers.get("www-authenticate", ""))
    if challenge:
        return challenge.group(1)
    if not response.headers.get("content-type", "").startswith("application/json"):
        return ""
    try:
        body = json.loads(await response.aread())
    except ValueError:
        return ""
    return str(body.get("error", "")) if isinstance(body, dict) else ""


def wait_until(deadline: float) -> None:
    """Let wall-clock time pass until `deadline` (a time.time() value). For token lifetimes, which is what
    the tests using it are about; never a stand-in for waiting on a process to become ready."""
    remaining = deadline - time.time()
    if remaining > 0:
        time.sleep(remaining)


async def sleep_until(deadline: float) -> None:
    """`wait_until` for async code (same purpose: token lifetimes)."""
    import anyio

    remaining = deadline - time.time()
    if remaining > 0:
        await anyio.sleep(remaining)


def bearer_of(result: Any) -> str:
    """The token from the `echo_auth` tool's answer ("Bearer <token>"): what the internal server received."""
    scheme, _, token = tool_text(result).partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AssertionError(f"the internal MCP server received no bearer token: {tool_text(result)!r}")
    return token


def _free_port() -> int:
    """A port nothing listens on right now (for redirect URIs that are never contacted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_text(result: Any) -> str:
    """The text of a CallToolResult; fails with the result when the tool reported an error."""
    if getattr(result, "is_error", False):
        raise AssertionError(f"tool error: {result}")
    return result.content[0].text


# ------------------------------------------------------------------------------------------------
# small loopback HTTP servers: a native client's redirect receiver, a client metadata document


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (port chosen by the kernel) answering with `handler(request)`.

    handler gets (method, path_with_query, headers) and returns (status, headers, body). Every request is
    recorded in `.requests` and put on `.queue` (wait for one with `.next_request(timeout)`).
    """

    def __init__(self, handler: Callable[[str, str, Mapping[str, str]], tuple[int, dict[str, str], bytes]]) -> None:
        outer = self
        self.requests: list[tuple[str, str]] = []
        self.queue: queue.Queue[tuple[str, str]] = queue.Queue()

        class Handler(_QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                outer.requests.append(("GET", self.path))
                status, headers, body = handler("GET", self.path, dict(self.headers))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.queue.put(("GET", self.path))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="e2e-loopback", daemon=True)
        self._thread.start()

    def next_request(self, timeout: float = 30) -> tuple[str, str]:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise HarnessError(f"no request reached {self.url} within {timeout:.0f}s") from None

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redirect_receiver(path: str = "/callback") -> LoopbackServer:
    """What a native MCP client runs to receive the authorization response (RFC 8252 loopback redirect)."""

    def handle(method: str, target: str, headers: Mapping[str, str]):
        if urlsplit(target).path != path:
            return 404, {"Content-Type": "text/plain"}, b"not found"
        body = b"<!doctype html><title>Done</title><p id='done'>Authorization finished; close this window.</p>"
        return 200, {"Content-Type": "text/html; charset=utf-8"}, body

    server = LoopbackServer(handle)
    server.redirect_uri = f"{server.url}{path}"  # type: ignore[attr-defined]
    return server


def start_document_server(documents: Mapping[str, Any], *, cache_control: str = "max-age=300") -> LoopbackServer:
    """Serves JSON documents by path (e.g. a client ID metadata document), application/json."""

    def handle(method: str, target: str, headers: Mapping[str, str]):
        document = documents.get(urlsplit(target).path)
        if document is None:
            return 404, {"Content-Type": "application/json"}, b'{"error": "not found"}'
        return 200, {"Content-Type": "application/json", "Cache-Control": cache_control}, json.dumps(document).encode()

    return LoopbackServer(handle)
