// A real OpenID provider (node-oidc-provider) standing in for the company IdP in end-to-end tests.
//
// Run with the pinned Node 22 (oidc-provider 9 needs it):
//   IDP_CONFIG='{"port":0,"clients":[...]}' node_modules/.bin/node idp.mjs
// or pass the JSON as the first argument. Once it accepts connections it prints ONE JSON line on stdout:
//   {"ready":true,"issuer":"http://127.0.0.1:PORT","port":PORT,"base_url":"http://127.0.0.1:PORT"}
// Everything else (oidc-provider warnings, errors) goes to stderr.
//
// Configuration (all optional except clients, which may also be added later with POST /__clients):
//   host                  "127.0.0.1"
//   port                  0 = pick a free port
//   issuer_path           "" (e.g. "/realms/test" for a Keycloak-like issuer with a path)
//   issuer                default http://HOST:PORT + issuer_path (a path here must equal issuer_path)
//   clients               [{client_id, client_secret, redirect_uris, token_endpoint_auth_method
//                           ("client_secret_basic" | "client_secret_post" | "none"),
//                           grant_types (default ["authorization_code","refresh_token"]), scope?}]
//   access_token_ttl      30 (seconds)
//   refresh_token_ttl     14 days (seconds)
//   rotate_refresh_tokens true: each refresh returns a new refresh token, the old one is consumed;
//                         presenting a consumed one again revokes the whole grant (oidc-provider behaviour)
//   refresh_token_policy  "always": issue a refresh token whenever the client may use the
//                         refresh_token grant (reliable for tests);
//                         "offline_access": oidc-provider's default, a refresh token only when the
//                         offline_access scope was granted, which it keeps only with prompt=consent
//   pkce_required         true (S256 is the only method oidc-provider 9 supports)
//   auto_consent          true: the login POST also grants every requested scope/claim, so a single
//                         POST completes the interaction, even with prompt=consent.
//                         false: a separate consent interaction needs POST /interaction/:uid/confirm
//   resource_indicators   true: RFC 8707 on; a `resource` the IdP does not know -> invalid_target
//                         (a strict upstream). Tokens requested without `resource` stay opaque
//                         and usable at userinfo. false: the `resource` parameter is ignored.
//   strict_client_id      false; true rejects a token/revocation/introspection request that sends
//                         client_id in the body as well as in a Basic Authorization header
//   clock_tolerance       15 (oidc-provider's default): seconds an expired token is still accepted, e.g. at
//                         userinfo; 0 makes expiry exact (tests of upstream token expiry need that)
//   token_delay_ms        0; delay every token-endpoint response (to widen concurrency windows)
//   token_failures        {count, status, error}: answer the next `count` token requests with an error
//   extra_scopes          extra scope names the IdP knows (besides openid offline_access profile email groups)
//   account_groups        {"<username>": ["group", ...]}: the `groups` claim (scope `groups`) of each user,
//                         released in the ID token and at userinfo; changeable at run time (POST /__config)
//   exit_on_stdin_eof     false; true exits when stdin closes (the test harness sets it, so the IdP dies
//                         with the test process even when that one is killed)
//
// Interaction (login/consent) endpoints, drivable without JavaScript:
//   GET  /interaction/:uid          HTML page with a form for the pending prompt (login or consent)
//   POST /interaction/:uid/login    login=<username>; any username is accepted, sub = username
//   POST /interaction/:uid/confirm  grants the requested scopes (only needed with auto_consent=false)
//   POST /interaction/:uid/abort    the user denies: access_denied back to the RP
//
// Test-only admin endpoints (no authentication; loopback test server only):
//   GET  /__stats          counters (token calls by grant_type, by client, errors, userinfo, ...)
//   POST /__stats/reset    zero the counters
//   GET  /__config         current runtime settings
//   POST /__config         JSON: change access_token_ttl, refresh_token_ttl, rotate_refresh_tokens,
//                          refresh_token_policy, auto_consent, strict_client_id, token_delay_ms,
//                          token_failures at run time
//   POST /__clients        JSON client metadata (as in `clients`): add or replace a client
//   POST /__revoke_grants  JSON {client_id?, account_id?}: revoke matching grants and all their tokens
//                          (the next refresh answers invalid_grant, userinfo 401)

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

import Provider from 'oidc-provider';

// --------------------------------------------------------------------------------------------------
// configuration

function readConfig() {
  const raw = process.argv[2] ?? process.env.IDP_CONFIG ?? '{}';
  try {
    return JSON.parse(raw);
  } catch (err) {
    console.error(`idp: IDP_CONFIG is not valid JSON: ${err.message}`);
    process.exit(2);
  }
}

const input = readConfig();

// Settings that may change at run time (POST /__config) live here; the provider's callbacks read them.
const settings = {
  access_token_ttl: input.access_token_ttl ?? 30,
  refresh_token_ttl: input.refresh_token_ttl ?? 14 * 24 * 60 * 60,
  rotate_refresh_tokens: input.rotate_refresh_tokens ?? true,
  refresh_token_policy: input.refresh_token_policy ?? 'always',
  pkce_required: input.pkce_required ?? true,
  auto_consent: input.auto_consent ?? true,
  strict_client_id: input.strict_client_id ?? false,
  token_delay_ms: input.token_delay_ms ?? 0,
  token_failures: input.token_failures ?? null,
  account_groups: input.account_groups ?? {},
};
const RUNTIME_KEYS = new Set([
  'access_token_ttl', 'refresh_token_ttl', 'rotate_refresh_tokens', 'refresh_token_policy',
  'auto_consent', 'strict_client_id', 'token_delay_ms', 'token_failures', 'pkce_required', 'account_groups',
]);

const host = input.host ?? '127.0.0.1';
const issuerPath = (input.issuer_path ?? '').replace(/\/$/, '');

// --------------------------------------------------------------------------------------------------
// storage: a plain in-memory adapter. oidc-provider's bundled memory adapter is an LRU capped at
// ~1000 entries, which a soak test can overflow (evicting live grants and refresh tokens); this one
// keeps everything until it expires.

const store = new Map(); // "Model:id" -> {payload, expiresAt}
const grantIndex = new Map(); // grantId -> Set of "Model:id"
const uidIndex = new Map(); // session uid -> session id
const userCodeIndex = new Map(); // device user code -> id
const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);
// Keep records a little past their expiry: oidc-provider checks `exp` itself and must be able to
// tell "expired" from "unknown" (it answers differently).
const RETENTION_SLACK_S = 60;

function getLive(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.payload;
}

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number'
      ? Date.now() + (expiresIn + RETENTION_SLACK_S) * 1000
      : undefined;
    store.set(key, { payload, expiresAt });
    if (GRANTABLE.has(this.model) && payload.grantId) {
      if (!grantIndex.has(payload.grantId)) grantIndex.set(payload.grantId, new Set());
      grantIndex.get(payload.grantId).add(key);
    }
    if (this.model === 'Session' && payload.uid) uidIndex.set(payload.uid, id);
    if (payload.userCode) userCodeIndex.set(payload.userCode, id);
  }

  async find(id) {
    return getLive(this.key(id));
  }

  async findByUid(uid) {
    const id = uidIndex.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = userCodeIndex.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = getLive(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantIndex.get(grantId) ?? []) store.delete(key);
    grantIndex.delete(grantId);
  }
}

// Drop expired records now and then so a long soak does not grow without bound.
setInterval(() => {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt !== undefined && entry.expiresAt <= now) store.delete(key);
  }
}, 30_000).unref();

// --------------------------------------------------------------------------------------------------
// statistics for GET /__stats

function emptyStats() {
  return {
    token: {
      total: 0,
      by_grant_type: {}, // grant_type -> count of calls (successful or not)
      success_by_grant_type: {}, // grant_type -> count of 2xx answers
      errors: {}, // grant_type -> {error code -> count}
      // client_id -> {grant_type -> count}, for requests that reached oidc-provider (not those
      // answered by token_failures or strict_client_id)
      by_client: {},
    },
    authorization: 0, // hits on the authorization endpoint
    logins: 0, // successful login POSTs
    consents: 0, // successful confirm POSTs
    aborts: 0, // abort POSTs
    userinfo: { total: 0, ok: 0, failed: 0 },
    revocation: { total: 0, by_client: {} },
    introspection: { total: 0 },
  };
}
let stats = emptyStats();

function bump(obj, key, by = 1) {
  obj[key] = (obj[key] ?? 0) + by;
}

// --------------------------------------------------------------------------------------------------
// provider configuration

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), use: 'sig', alg: 'RS256', kid: crypto.randomUUID() };

function clientMetadata(c) {
  const metadata = {
    client_id: c.client_id,
    redirect_uris: c.redirect_uris ?? [],
    token_endpoint_auth_method: c.token_endpoint_auth_method ?? 'client_secret_basic',
    grant_types: c.grant_types ?? ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  };
  if (metadata.token_endpoint_auth_method !== 'none') metadata.client_secret = c.client_secret;
  if (c.scope) metadata.scope = c.scope;
  if (c.application_type) metadata.application_type = c.application_type;
  return metadata;
}

function account(sub) {
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        name: `Test User ${sub}`,
        preferred_username: sub,
        email: `${sub}@example.test`,
        email_verified: true,
        groups: settings.account_groups[sub] ?? [],
      };
    },
  };
}

function buildProvider(issuer) {
  const configuration = {
    adapter: TestAdapter,
    jwks: { keys: [signingJwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', 'profile', 'email', 'groups', ...(input.extra_scopes ?? [])],
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
    },
    // Scope-released claims (email, groups) in the ID token from the token endpoint too, as company IdPs
    // configure it (OIDC's default keeps them for userinfo only); both places carry them.
    conformIdTokenClaims: false,
    findAccount: async (ctx, sub) => account(sub),
    clockTolerance: input.clock_tolerance ?? 15,
    responseTypes: ['code'],
    features: {
      devInteractions: { enabled: false }, // ours below is drivable over plain HTTP
      revocation: { enabled: input.revocation ?? true },
      introspection: { enabled: input.introspection ?? true },
      userinfo: { enabled: true },
      // Enabled with the library default getResourceServerInfo, which throws invalid_target for
      // every resource: a request without `resource` gets an opaque token valid at userinfo, and a
      // forwarded `resource` is refused like a strict IdP does.
      resourceIndicators: { enabled: input.resource_indicators ?? true },
    },
    pkce: { required: () => settings.pkce_required },
    ttl: {
      AccessToken: () => settings.access_token_ttl,
      RefreshToken: () => settings.refresh_token_ttl,
      AuthorizationCode: 60,
      IdToken: 3600,
      Interaction: 3600,
      Session: 24 * 3600,
      Grant: 14 * 24 * 3600,
    },
    // Called for the authorization_code grant: decides whether a refresh token comes with it.
    issueRefreshToken: async (ctx, client, code) => {
      if (!client.grantTypeAllowed('refresh_token')) return false;
      if (settings.refresh_token_policy === 'offline_access') return code.scopes.has('offline_access');
      return true;
    },
    // Tokens outlive the browser session at the IdP (the usual enterprise setup); the library default
    // ties them to the session unless offline_access was granted.
    expiresWithSession: async () => false,
    rotateRefreshToken: () => settings.rotate_refresh_tokens,
    interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
    // Every static client of the IdP is served from the adapter (see addClient), so the default
    // `clients` list stays empty.
    clients: [],
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = `<!DOCTYPE html><html><head><title>IdP error</title></head><body>
<h1>IdP error</h1><pre id="error">${escapeHtml(out.error)}</pre>
<pre id="error_description">${escapeHtml(out.error_description ?? '')}</pre></body></html>`;
    },
  };
  return new Provider(issuer, configuration);
}

// Clients live in the adapter (as if dynamically registered), so tests can add or replace them while
// the IdP runs, e.g. once the proxy's callback URL is known. Client.find validates the metadata.
async function addClient(provider, c) {
  if (!c?.client_id) throw new Error('client_id is required');
  const metadata = clientMetadata(c);
  await new TestAdapter('Client').upsert(c.client_id, metadata);
  try {
    await provider.Client.find(c.client_id);
  } catch (err) {
    await new TestAdapter('Client').destroy(c.client_id);
    throw new Error(`invalid client ${c.client_id}: ${err.error_description ?? err.message}`);
  }
  return metadata;
}

// --------------------------------------------------------------------------------------------------
// helpers for our own routes

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (ch) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[ch]));
}

async function readRawBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readForm(ctx) {
  return querystring.parse(await readRawBody(ctx.req));
}

async function readJson(ctx) {
  const raw = await readRawBody(ctx.req);
  return raw ? JSON.parse(raw) : {};
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = JSON.stringify(body);
}

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body>${body}</body></html>`;
}

// Build (or extend) the grant that covers everything the authorization request asked for.
async function grantEverythingRequested(provider, interaction, accountId) {
  const { params, prompt: { details } } = interaction;
  let grant;
  if (interaction.grantId) grant = await provider.Grant.find(interaction.grantId);
  if (!grant) grant = new provider.Grant({ accountId, clientId: params.client_id });

  // `params.scope` is the request's scope after oidc-provider's filtering (offline_access is already
  // dropped there when the request had no prompt=consent).
  if (params.scope) grant.addOIDCScope(params.scope);
  if (details?.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
  if (params.claims) {
    const claims = JSON.parse(params.claims);
    grant.addOIDCClaims([
      ...Object.keys(claims.userinfo ?? {}),
      ...Object.keys(claims.id_token ?? {}),
    ]);
  }
  if (details?.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(details?.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  return grant.save();
}

// --------------------------------------------------------------------------------------------------
// middleware: interactions, admin endpoints, token-endpoint instrumentation

function interactionRoutes(provider) {
  return async function interactionMiddleware(ctx, next) {
    const m = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/.exec(ctx.path);
    if (!m) return next();
    const [, uid, action] = m;
    ctx.set('Cache-Control', 'no-store');

    let interaction;
    try {
      interaction = await provider.interactionDetails(ctx.req, ctx.res);
    } catch (err) {
      ctx.status = 400;
      ctx.type = 'html';
      ctx.body = page('Interaction error', `<h1>Interaction error</h1><pre id="error">${escapeHtml(err.message)}</pre>`);
      return undefined;
    }
    if (interaction.uid !== uid) {
      ctx.status = 400;
      ctx.body = page('Interaction error', '<pre id="error">interaction uid mismatch</pre>');
      return undefined;
    }
    const promptName = interaction.prompt.name;
    const clientId = interaction.params.client_id;

    if (!action && ctx.method === 'GET') {
      const abortForm = `<form id="abort" method="post" action="/interaction/${uid}/abort">
  <button type="submit">Cancel</button></form>`;
      let body;
      if (promptName === 'login') {
        body = `<h1>Sign in to the test IdP</h1>
<p>Client: <code id="client_id">${escapeHtml(clientId)}</code></p>
<form id="login" method="post" action="/interaction/${uid}/login">
  <label>Username <input name="login" autofocus required></label>
  <button type="submit">Sign in</button>
</form>${abortForm}`;
      } else {
        body = `<h1>Authorize ${escapeHtml(clientId)}</h1>
<p>Scopes: <code id="scope">${escapeHtml(interaction.params.scope ?? '')}</code></p>
<form id="confirm" method="post" action="/interaction/${uid}/confirm">
  <button type="submit">Allow</button>
</form>${abortForm}`;
      }
      ctx.type = 'html';
      ctx.body = page(`IdP ${promptName}`, `<main data-prompt="${escapeHtml(promptName)}">${body}</main>`);
      return undefined;
    }
    if (!action || ctx.method !== 'POST') {
      ctx.status = 405;
      return undefined;
    }

    let result;
    if (action === 'abort') {
      stats.aborts += 1;
      result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
    } else if (action === 'login') {
      const form = await readForm(ctx);
      const login = typeof form.login === 'string' ? form.login.trim() : '';
      if (!login || promptName !== 'login') {
        ctx.status = 400;
        ctx.body = page('Login error', `<pre id="error">${login ? 'no login pending' : 'login is required'}</pre>`);
        return undefined;
      }
      stats.logins += 1;
      result = { login: { accountId: login } };
      if (settings.auto_consent) {
        // Consent in the same step: with result.consent set, oidc-provider does not ask for the
        // consent prompt on resume, even when the request carried prompt=consent.
        result.consent = { grantId: await grantEverythingRequested(provider, interaction, login) };
      }
    } else {
      if (promptName !== 'consent') {
        ctx.status = 400;
        ctx.body = page('Consent error', '<pre id="error">no consent pending</pre>');
        return undefined;
      }
      stats.consents += 1;
      result = {
        consent: { grantId: await grantEverythingRequested(provider, interaction, interaction.session.accountId) },
      };
    }
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
    ctx.status = 303;
    ctx.redirect(returnTo);
    return undefined;
  };
}

async function revokeGrants({ client_id: clientId, account_id: accountId } = {}) {
  const adapter = new TestAdapter('Grant');
  let revoked = 0;
  for (const key of [...store.keys()]) {
    if (!key.startsWith('Grant:')) continue;
    const payload = getLive(key);
    if (!payload) continue;
    if (clientId && payload.clientId !== clientId) continue;
    if (accountId && payload.accountId !== accountId) continue;
    const grantId = key.slice('Grant:'.length);
    await adapter.revokeByGrantId(grantId);
    await adapter.destroy(grantId);
    revoked += 1;
  }
  return revoked;
}

function adminRoutes(provider) {
  return async function adminMiddleware(ctx, next) {
    if (!ctx.path.startsWith('/__')) return next();
    try {
      if (ctx.path === '/__stats' && ctx.method === 'GET') {
        return sendJson(ctx, 200, stats);
      }
      if (ctx.path === '/__stats/reset' && ctx.method === 'POST') {
        stats = emptyStats();
        return sendJson(ctx, 200, stats);
      }
      if (ctx.path === '/__config' && ctx.method === 'GET') {
        return sendJson(ctx, 200, settings);
      }
      if (ctx.path === '/__config' && ctx.method === 'POST') {
        const changes = await readJson(ctx);
        const unknown = Object.keys(changes).filter((k) => !RUNTIME_KEYS.has(k));
        if (unknown.length) return sendJson(ctx, 400, { error: `not changeable at run time: ${unknown.join(', ')}` });
        Object.assign(settings, changes);
        return sendJson(ctx, 200, settings);
      }
      if (ctx.path === '/__clients' && ctx.method === 'POST') {
        const metadata = await addClient(provider, await readJson(ctx));
        return sendJson(ctx, 200, { client_id: metadata.client_id });
      }
      if (ctx.path === '/__revoke_grants' && ctx.method === 'POST') {
        return sendJson(ctx, 200, { revoked: await revokeGrants(await readJson(ctx)) });
      }
      return sendJson(ctx, 404, { error: 'unknown admin endpoint' });
    } catch (err) {
      return sendJson(ctx, 400, { error: err.message });
    }
  };
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Wraps the provider's own endpoints: counts calls, and applies the test knobs to the token endpoint.
function instrumentation() {
  return async function instrumentationMiddleware(ctx, next) {
    const isTokenLike = ctx.method === 'POST'
      && ['/token', '/token/revocation', '/token/introspection'].includes(ctx.path);
    let form = {};
    if (isTokenLike && ctx.is('application/x-www-form-urlencoded')) {
      // Read the body ourselves (to see grant_type even when the request fails, and for
      // strict_client_id); oidc-provider then uses ctx.request.body instead of the drained stream.
      const raw = await readRawBody(ctx.req);
      ctx.request.body = raw;
      form = querystring.parse(raw);
    }

    if (ctx.path === '/token' && ctx.method === 'POST') {
      const grantType = typeof form.grant_type === 'string' ? form.grant_type : '(none)';
      stats.token.total += 1;
      bump(stats.token.by_grant_type, grantType);
      const failure = settings.token_failures;
      if (settings.token_delay_ms > 0) await sleep(settings.token_delay_ms);
      if (failure && failure.count > 0) {
        failure.count -= 1;
        stats.token.errors[grantType] ??= {};
        bump(stats.token.errors[grantType], failure.error ?? 'server_error');
        return sendJson(ctx, failure.status ?? 500, {
          error: failure.error ?? 'server_error',
          error_description: 'injected failure (token_failures)',
        });
      }
      if (settings.strict_client_id && form.client_id !== undefined && ctx.get('authorization')) {
        stats.token.errors[grantType] ??= {};
        bump(stats.token.errors[grantType], 'invalid_request');
        return sendJson(ctx, 400, {
          error: 'invalid_request',
          error_description: 'client_id must not be sent in both the Authorization header and the body',
        });
      }
      await next();
      const clientId = ctx.oidc?.client?.clientId ?? (typeof form.client_id === 'string' ? form.client_id : '(unknown)');
      stats.token.by_client[clientId] ??= {};
      bump(stats.token.by_client[clientId], grantType);
      if (ctx.status >= 200 && ctx.status < 300) {
        bump(stats.token.success_by_grant_type, grantType);
      } else {
        stats.token.errors[grantType] ??= {};
        let error = 'unknown';
        try {
          error = (typeof ctx.body === 'string' ? JSON.parse(ctx.body) : ctx.body)?.error ?? error;
        } catch { /* not JSON */ }
        bump(stats.token.errors[grantType], error);
      }
      return undefined;
    }

    if (isTokenLike && settings.strict_client_id && form.client_id !== undefined && ctx.get('authorization')) {
      return sendJson(ctx, 400, {
        error: 'invalid_request',
        error_description: 'client_id must not be sent in both the Authorization header and the body',
      });
    }

    await next();

    switch (ctx.oidc?.route) {
      case 'authorization':
        stats.authorization += 1;
        break;
      case 'userinfo':
        stats.userinfo.total += 1;
        if (ctx.status === 200) stats.userinfo.ok += 1;
        else stats.userinfo.failed += 1;
        break;
      case 'revocation':
        stats.revocation.total += 1;
        bump(stats.revocation.by_client, ctx.oidc?.client?.clientId ?? '(unknown)');
        break;
      case 'introspection':
        stats.introspection.total += 1;
        break;
      default:
    }
    return undefined;
  };
}

// --------------------------------------------------------------------------------------------------
// start

async function main() {
  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(input.port ?? 0, host, resolve);
  });
  const { port } = server.address();
  const hostForUrl = host.includes(':') ? `[${host}]` : host;
  const baseUrl = `http://${hostForUrl}:${port}`;
  const issuer = input.issuer ?? `${baseUrl}${issuerPath}`;
  if (new URL(issuer).pathname.replace(/\/$/, '') !== issuerPath) {
    throw new Error('the issuer path must equal issuer_path');
  }

  const provider = buildProvider(issuer);
  // Plain http on loopback: oidc-provider accepts http issuers; cookies are set without `secure`
  // because the connection is not TLS (ctx.secure is false and proxy mode stays off).
  provider.use(instrumentation());
  provider.use(adminRoutes(provider));
  provider.use(interactionRoutes(provider));
  provider.on('server_error', (ctx, err) => console.error('idp server_error:', err));

  for (const c of input.clients ?? []) await addClient(provider, c);

  const callback = provider.callback();
  server.on('request', (req, res) => {
    // The provider's routes live under the issuer path; interactions and admin routes at the root.
    const url = req.url ?? '/';
    if (issuerPath && (url === issuerPath || url.startsWith(`${issuerPath}/`) || url.startsWith(`${issuerPath}?`))) {
      // Like an express mount: oidc-provider derives the mount path (for the endpoint URLs it
      // prints) from originalUrl minus url.
      req.originalUrl = url;
      req.url = url.slice(issuerPath.length) || '/';
    }
    callback(req, res);
  });

  if (input.exit_on_stdin_eof) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      server.close();
      server.closeAllConnections();
      process.exit(0);
    });
  }

  process.stdout.write(`${JSON.stringify({
    ready: true, issuer, port, base_url: baseUrl,
  })}\n`);
}

main().catch((err) => {
  console.error('idp: failed to start:', err);
  process.exit(1);
});
