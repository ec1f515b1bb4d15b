"""``private_key_jwt`` client authentication (RFC 7523 §2.2, OpenID Connect Core §9) for clients identified
by a Client ID Metadata Document.

A metadata-document client that names ``private_key_jwt`` (ChatGPT's does) authenticates at the token and
revocation endpoints with a JWT signed by its own key: ``client_assertion_type`` =
``urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and ``client_assertion`` = the JWT. It is
accepted when:

- it is signed with an asymmetric algorithm (RS/PS/ES 256-512, EdDSA; never ``none`` nor HMAC) by a key of
  the client's document: its inline ``jwks`` or the set at its ``jwks_uri``, fetched under the outbound
  rules of metadata documents (timeout, size, public addresses only, no redirects) and cached for the
  document's HTTP cache lifetime; an unknown ``kid`` refetches the set at most once per
  ``JWKS_REFETCH_SECONDS`` (key rotation);
- ``iss`` and ``sub`` are the client's ``client_id``; ``aud`` names this server's token endpoint (or, as
  RFC 7523 allows, its issuer);
- ``exp`` is in the future and at most ``MAX_ASSERTION_LIFETIME`` ahead, ``iat`` (if present) not in the
  future, both with ``LEEWAY_SECONDS`` of clock skew;
- its ``jti`` was never seen before for this client: each ``jti`` is remembered (shared cache) until the
  assertion expires, so a captured assertion cannot be replayed.

Every failure is ``invalid_client`` with a description that names the rule, never the key material.
"""

import hashlib
import json
import logging
import time

import jwt
from django.core.cache import cache
from oauth2_provider.cimd import CIMDError
from oauth2_provider.settings import oauth2_settings

from oauthproxy.core.exceptions import InvalidClient, InvalidRequest
from oauthproxy.models import Client, McpServer

logger = logging.getLogger(__name__)

PRIVATE_KEY_JWT = "private_key_jwt"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
MAX_ASSERTION_LENGTH = 8192
MAX_ASSERTION_LIFETIME = 600  # seconds between now and exp
LEEWAY_SECONDS = 30
JWKS_MIN_CACHE_SECONDS = 60
JWKS_MAX_CACHE_SECONDS = 3600
JWKS_REFETCH_SECONDS = 60
JWKS_MAX_KEYS = 20
_JTI_KEY = "oauthproxy:client-assertion:jti:"
_JWKS_KEY = "oauthproxy:client-assertion:jwks:"
_JWKS_REFETCH_KEY = "oauthproxy:client-assertion:jwks-refetch:"


def client_assertion_subject(*, assertion: str, assertion_type: str | None) -> str:
    """The ``client_id`` an assertion claims (its ``sub``), read before verification to find the client.
    Raises ``InvalidClient`` for an assertion that is not a readable JWT of the jwt-bearer type."""
    if assertion_type != ASSERTION_TYPE:
        raise InvalidClient(f"client_assertion_type must be {ASSERTION_TYPE}.")
    if len(assertion) > MAX_ASSERTION_LENGTH:
        raise InvalidClient("The client assertion is too long.")
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise InvalidClient("The client assertion is not a readable JWT.")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise InvalidClient("The client assertion has no sub (the client_id).")
    return subject


def client_assertion_authenticate(*, server: McpServer, client: Client, assertion: str) -> None:
    """Verify *assertion* for *client* at *server* (the rules of this module's docstring); return quietly
    or raise ``InvalidClient``. A verified ``jti`` is spent: the same assertion is refused next time."""
    if client.token_endpoint_auth_method != PRIVATE_KEY_JWT:
        raise InvalidClient("This client does not authenticate with private_key_jwt.")
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        raise InvalidClient("The client assertion is not a readable JWT.")
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        raise InvalidClient(f"The client assertion must be signed with one of {', '.join(ALGORITHMS)}.")
    key = _signing_key(client=client, kid=header.get("kid"), algorithm=algorithm)
    now = time.time()
    try:
        claims = jwt.decode(
            assertion,
            key=key,
            algorithms=[algorithm],
            audience=[server.issuer_url + "/token", server.issuer_url],
            issuer=client.client_id,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "iss", "sub", "aud", "jti"]},
        )
    except jwt.InvalidSignatureError:
        raise InvalidClient("The client assertion's signature does not verify with the client's keys.")
    except jwt.ExpiredSignatureError:
        raise InvalidClient("The client assertion has expired.")
    except jwt.InvalidAudienceError:
        raise InvalidClient(f"The client assertion's aud must be this server's token endpoint "
                            f"{server.issuer_url}/token.")
    except jwt.InvalidIssuerError:
        raise InvalidClient("The client assertion's iss must be the client_id.")
    except jwt.PyJWTError as exc:
        raise InvalidClient(f"The client assertion is not acceptable ({type(exc).__name__}).")
    if claims.get("sub") != client.client_id:
        raise InvalidClient("The client assertion's sub must be the client_id.")
    if not isinstance(claims["exp"], int | float) or claims["exp"] > now + MAX_ASSERTION_LIFETIME + LEEWAY_SECONDS:
        raise InvalidClient(f"The client assertion must expire within {MAX_ASSERTION_LIFETIME} seconds.")
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti or len(jti) > 512:
        raise InvalidClient("The client assertion's jti must be a non-empty string.")
    _jti_spend(server=server, client=client, jti=jti, expires=claims["exp"], now=now)


def client_auth_methods_choose(document: dict) -> tuple[str, list[str]]:
    """The method a metadata-document client authenticates with, and every method it accepts, from its
    ``token_endpoint_auth_method`` (preferred, absent means ``none``) and ``token_endpoint_auth_methods_supported``.

    The proxy supports ``none`` and, when the document carries keys (``jwks_uri`` or ``jwks``),
    ``private_key_jwt``. The client's preference wins when supported; otherwise the first supported method
    it lists. Raises ``InvalidRequest`` (its description explains) when it names none the proxy supports."""
    preferred = document.get("token_endpoint_auth_method") or "none"
    listed = document.get("token_endpoint_auth_methods_supported")
    named = [preferred] + (list(listed) if isinstance(listed, list) else [])
    has_keys = bool(document.get("jwks_uri")) or isinstance(document.get("jwks"), dict)
    supported = ["none", PRIVATE_KEY_JWT] if has_keys else ["none"]
    accepted = [method for method in dict.fromkeys(named) if isinstance(method, str) and method in supported]
    if not accepted:
        hint = "" if has_keys or PRIVATE_KEY_JWT not in named else " (private_key_jwt needs jwks_uri or jwks)"
        raise InvalidRequest(
            "Clients identified by a metadata document authenticate with token_endpoint_auth_method "
            f"\"none\" or \"private_key_jwt\"{hint}."
        )
    return accepted[0], accepted


def client_accepts_public_auth(client: Client) -> bool:
    """A private_key_jwt client whose document also lists ``none`` may present no assertion at all."""
    if client.token_endpoint_auth_method != PRIVATE_KEY_JWT:
        return True
    return "none" in (client.metadata or {}).get("token_endpoint_auth_methods_supported", [])


# -- keys -------------------------------------------------------------------------------------------


def _signing_key(*, client: Client, kid: str | None, algorithm: str):
    metadata = client.metadata or {}
    if isinstance(metadata.get("jwks"), dict):
        key = _key_find(metadata["jwks"], kid=kid, algorithm=algorithm)
    else:
        url = metadata.get("jwks_uri")
        if not isinstance(url, str) or not url:
            raise InvalidClient("The client's metadata document has no jwks_uri or jwks.")
        key = _key_find(_jwks_get(url), kid=kid, algorithm=algorithm)
        if key is None and cache.add(_JWKS_REFETCH_KEY + _digest(url), 1, JWKS_REFETCH_SECONDS):
            key = _key_find(_jwks_get(url, refresh=True), kid=kid, algorithm=algorithm)  # rotated keys
    if key is None:
        raise InvalidClient("No key of the client's key set matches the client assertion (kid and alg).")
    return key


def _key_find(jwks: dict, *, kid: str | None, algorithm: str):
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list):
        return None
    for entry in keys[:JWKS_MAX_KEYS]:
        if not isinstance(entry, dict) or entry.get("kty") in (None, "oct"):
            continue  # a symmetric key is never a client's public key
        if kid is not None and entry.get("kid") != kid:
            continue
        if entry.get("use") not in (None, "sig") or entry.get("alg") not in (None, algorithm):
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=algorithm)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        return key.key
    return None


def _jwks_get(url: str, *, refresh: bool = False) -> dict:
    cache_key = _JWKS_KEY + _digest(url)
    if not refresh and (cached := cache.get(cache_key)) is not None:
        return json.loads(cached)
    jwks, max_age = jwks_fetch(url)
    if not isinstance(jwks.get("keys"), list):
        raise InvalidClient("The client's jwks_uri does not serve a JWK Set.")
    cache.set(cache_key, json.dumps(jwks), min(max(max_age, JWKS_MIN_CACHE_SECONDS), JWKS_MAX_CACHE_SECONDS))
    return jwks


def jwks_fetch(url: str) -> tuple[dict, int]:
    """GET a JWK Set under the metadata-document fetch rules (the configured ``CIMD_METADATA_FETCHER``: public
    addresses only, a total deadline, a size cap, no redirects): ``(json_object, cache_seconds)``."""
    try:
        return oauth2_settings.CIMD_METADATA_FETCHER().fetch(url)
    except CIMDError as exc:
        raise InvalidClient(f"The client's jwks_uri could not be used: {exc}")


def _jti_spend(*, server: McpServer, client: Client, jti: str, expires: float, now: float) -> None:
    key = _JTI_KEY + _digest(f"{server.pk}\x00{client.client_id}\x00{jti}")
    ttl = max(int(expires - now) + LEEWAY_SECONDS, 1)
    if not cache.add(key, 1, ttl):
        logger.warning("client assertion replayed by %s at %s", client.client_id, server.slug)
        raise InvalidClient("The client assertion was already used (jti replayed).")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
